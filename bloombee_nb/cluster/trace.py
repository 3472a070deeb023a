"""What one step through a chain cost, as the client saw it (``RemoteChain.forward`` returns it;
sessions, widgets and benchmarks read it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepTrace:
    """What one step cost: wall time seen by the client, compute time of each stage on its worker."""

    tokens: int                         # positions processed in this step (per sequence)
    stage_wall_s: tuple[float, ...]     # star: round trip per stage; chain: one entry, the whole traversal
    stage_compute_s: tuple[float, ...]  # span forward per stage, worker clock
    bytes_sent: int                     # frame bytes the client sent
    bytes_received: int                 # frame bytes the client received
    relay: str = "star"
    hidden_bytes: int = 0               # uncompressed bytes of the hidden states of one hop
    hop_wire_bytes: tuple[int, ...] = ()  # hidden-state frame bytes on each hop (chain: N+1, star: 2N)

    @property
    def wall_s(self) -> float:
        return sum(self.stage_wall_s)

    @property
    def wire_bytes(self) -> int:
        """Hidden-state bytes that crossed links in this step, as sent (compressed or not)."""
        return sum(self.hop_wire_bytes)

    @property
    def raw_bytes(self) -> int:
        """The same hidden states uncompressed: what a raw wire would have carried."""
        return self.hidden_bytes * len(self.hop_wire_bytes)


def merge_traces(results: list, relay: str, tokens: int, hidden_bytes: int, wall_s: float) -> StepTrace:
    """One step's trace from the relays it took (one, or one per micro-batch and chunk); each
    result is a relay's ``(out, walls, computes, sent, hops)``."""
    if len(results) == 1:
        out, walls, computes, sent, hops = results[0]
        return StepTrace(tokens, tuple(walls), tuple(c for c, _ in computes), sent, len(out), relay, hidden_bytes,
                         tuple(hops))
    computes = [sum(c[i][0] for _, _, c, _, _ in results) for i in range(len(results[0][2]))]
    hops = [sum(r[4][i] for r in results) for i in range(len(results[0][4]))]
    return StepTrace(tokens, (wall_s,), tuple(computes), sum(r[3] for r in results), sum(len(r[0]) for r in results),
                     relay, hidden_bytes, tuple(hops))

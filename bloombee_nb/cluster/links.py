"""Which codec each sender uses on each link of a chain: the client's per stage it sends to (chain
relay: only the first), each stage's for its one outgoing link. A mixin of ``RemoteChain``."""

from __future__ import annotations

import torch

from .. import transport
from .loading import settle


class LinkCodecs:
    """Per-link codec policies of a chain. The chain provides ``relay``, ``placement``, ``actors``,
    ``shared``, ``timeout_s`` and ``broadcast``."""

    def _init_codecs(self, compression: str | None, min_compress_bytes: int) -> None:
        n = len(self.actors)
        self.client_policies = [transport.CodecPolicy()] * n
        self.stage_policies = [transport.CodecPolicy()] * n
        self.compression = compression  # the setting: None, a codec label, or "auto" (chosen per link)
        if compression and compression != "auto":
            # one codec on every link; frames under min_compress_bytes stay raw (headers outweigh
            # the gain on decode-sized frames: see benchmarks/results/compression.md)
            fixed = transport.CodecPolicy.fixed(transport.Codec.parse(compression), min_compress_bytes)
            self.set_policies([fixed] * n, [fixed] * n)

    def hops(self) -> list[tuple[int, int]]:
        """The links hidden states cross, as (sender, receiver) with -1 for the client."""
        n = len(self.actors)
        if self.relay == "chain" and n > 1:
            return [(-1, 0), *((i, i + 1) for i in range(n - 1)), (n - 1, -1)]
        return [*((-1, i) for i in range(n)), *((i, -1) for i in range(n))]

    def set_policies(self, client_policies: list, stage_policies: list) -> None:
        """Install who encodes what: the client's policy per destination stage, each stage's own (a
        shared stage keeps its own: other clients' steps leave it too)."""
        self.client_policies, self.stage_policies = list(client_policies), list(stage_policies)
        for st, a, p in zip(self.placement.stages, self.actors, stage_policies):
            if self.shared:
                break
            settle(st, a, "set_compression", p.to_dict(), timeout_s=self.timeout_s)

    def choose_compression(self, bandwidth_Bps: dict[tuple[int, int], float], sample: torch.Tensor) -> None:
        """Per link, the codec that pays for itself: each sender calibrates every candidate on
        ``sample`` (a real hidden state) on its own machine, and :meth:`CodecPolicy.choose` picks
        by frame size for that link's measured bandwidth. ``bandwidth_Bps`` maps each of
        :meth:`hops` to bytes/s; a hop that is missing stays raw."""
        frame = transport.encode(sample)
        stage_stats = [[tuple(transport.CodecStats(transport.Codec.parse(c.pop("codec")), **c) for c in st)
                        for st in per_size] for per_size in self.broadcast("calibrate_codecs", frame)]
        client_stats = transport.calibrate_sizes(sample)
        client_policies, stage_policies = list(self.client_policies), list(self.stage_policies)
        for (src, dst), bw in bandwidth_Bps.items():
            if src == -1:
                client_policies[dst] = transport.CodecPolicy.choose(client_stats, bw)
            else:
                stage_policies[src] = transport.CodecPolicy.choose(stage_stats[src], bw)
        self.set_policies(client_policies, stage_policies)

    def link_codecs(self) -> list[tuple[int, int, transport.CodecPolicy]]:
        """(sender, receiver, policy) for each hop, -1 being the client: what the link map shows."""
        return [(s, d, self.client_policies[d] if s == -1 else self.stage_policies[s]) for s, d in self.hops()]

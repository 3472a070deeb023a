"""The chain of stage actors a model runs through, seen from the client.

Two relays, same results:

- ``"chain"`` (default): the client sends the hidden states to the first stage, each stage
  forwards its output straight to the next, and the last stage answers the client's pending
  ``collect`` call. Per token: one traversal of the chain (N+1 one-way hops).
- ``"star"`` (Petals-style, kept for comparison): the client calls each stage in turn and relays
  every intermediate result itself. Per token: N round trips through the client.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import torch
from distributed import Client

from .. import transport
from ..errors import BloombeeError, StageUnavailableError
from .placement import Placement, StageSpec
from .stage import StageActor

#: Seconds an actor call may take before its worker counts as gone. Dask never resolves a call
#: whose arguments fail to serialise, so every call carries a timeout.
DEFAULT_CALL_TIMEOUT_S = 120.0


RELAYS = ("chain", "star")


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

    @property
    def wall_s(self) -> float:
        return sum(self.stage_wall_s)


class RemoteChain:
    """Actor handles for a :class:`Placement`, with calls that time out and name the lost worker."""

    def __init__(self, client: Client, placement: Placement, futures: list, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 relay: str = "chain", compression: str | None = None, min_compress_bytes: int = 64 << 10):
        if relay not in RELAYS:
            raise ValueError(f"relay must be one of {RELAYS}, got {relay!r}")
        self.client, self.placement, self.timeout_s, self.relay = client, placement, timeout_s, relay
        self._futures = futures  # an actor lives as long as its future is held
        self.actors = client.gather(futures)
        for a, b, spec in zip(self.actors, self.actors[1:], placement.stages[1:]):
            a.set_next(b, unavailable_message(spec), self.actors[-1]).result(timeout=timeout_s)
        # one codec for every link for now; frames under min_compress_bytes stay raw (headers
        # outweigh the gain on decode-sized frames: see benchmarks/results/compression.md)
        self.codec = transport.Codec.parse(compression) if compression else transport.RAW
        self.min_compress_bytes = min_compress_bytes
        if compression:
            for a in self.actors:
                a.set_compression(str(self.codec), min_compress_bytes).result(timeout=timeout_s)
        self._steps = itertools.count()
        self._acks: list[asyncio.Future] = []  # chain mode: first-stage acceptances not yet checked

    @classmethod
    def create(cls, client: Client, placement: Placement, path: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
               relay: str = "chain", compression: str | None = None, **stage_kwargs) -> "RemoteChain":
        """Start one StageActor per stage, all loading in parallel, each pinned to its worker."""
        futures = [
            client.submit(StageActor, path, st.start, st.end, actor=True, pure=False,
                          workers=[st.worker], allow_other_workers=False, **stage_kwargs)
            for st in placement.stages
        ]
        return cls(client, placement, futures, timeout_s, relay, compression)

    def broadcast(self, method: str, *args) -> list:
        """Call ``method`` on every stage concurrently; the first failure is raised after all answered."""
        futures = [getattr(a, method)(*args) for a in self.actors]
        results, first_error = [], None
        for st, fut in zip(self.placement.stages, futures):
            try:
                results.append(fut.result(timeout=self.timeout_s))
            except BloombeeError as exc:
                first_error = first_error or exc
            except (OSError, TimeoutError, KeyError, RuntimeError) as exc:
                first_error = first_error or _unavailable(st, exc)
        if first_error is not None:
            raise first_error
        return results

    def forward(self, session_id: str, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, StepTrace]:
        """Run ``hidden`` through every stage in order; returns the last stage's output.

        The relay runs as one coroutine on the client's event loop: one thread hand-off per step
        (each hand-off costs ~0.5 ms on a busy 2-core machine).
        """
        pos, mask = transport.encode(position_ids), transport.encode(attention_mask)
        relay = self._relay_chain if self.relay == "chain" and len(self.actors) > 1 else self._relay_star
        frame = transport.encode(hidden, self.codec, min_compress_bytes=self.min_compress_bytes)
        frame, walls, computes, sent = self.client.sync(relay, session_id, frame, pos, mask)
        trace = StepTrace(hidden.shape[1], tuple(walls), tuple(computes), sent, len(frame), self.relay,
                          hidden.numel() * hidden.element_size())
        return transport.decode(frame), trace

    async def _relay_star(self, session_id: str, frame: bytes, pos: bytes, mask: bytes):
        walls, computes, sent = [], [], 0
        for i, actor in enumerate(self.actors):
            t0 = time.perf_counter()
            sent += len(frame) + len(pos) + len(mask)
            frame, (compute_s,) = await self._await(i, actor.forward(session_id, frame, pos, mask))
            walls.append(time.perf_counter() - t0)
            computes.append(compute_s)
        return frame, walls, computes, sent

    async def _relay_chain(self, session_id: str, frame: bytes, pos: bytes, mask: bytes):
        await self._check_acks()
        step, t0 = next(self._steps), time.perf_counter()
        collect = asyncio.ensure_future(self._await(len(self.actors) - 1, self.actors[-1].collect(
            session_id, step, self.timeout_s)))
        ack = asyncio.ensure_future(self._await(0, self.actors[0].forward(session_id, frame, pos, mask, step)))
        await asyncio.wait({collect, ack}, return_when=asyncio.FIRST_COMPLETED)
        if ack.done() and ack.exception() is not None:  # a stage refused the step: say which error
            collect.cancel()
            raise ack.exception()
        out, computes = await collect  # a failure anywhere in the chain arrives here, typed
        if not ack.done():
            self._acks.append(ack)  # the first stage's answer is still on its way; checked next step
        return out, [time.perf_counter() - t0], list(computes), len(frame) + len(pos) + len(mask)

    async def _check_acks(self):
        done = [a for a in self._acks if a.done()]
        self._acks = [a for a in self._acks if not a.done()]
        for a in done:
            if a.exception() is not None:
                raise a.exception()

    async def _await(self, i: int, future):
        try:
            return await asyncio.wait_for(_awaitable(future), self.timeout_s)
        except BloombeeError:
            raise
        except (OSError, asyncio.TimeoutError, TimeoutError, KeyError, RuntimeError) as exc:
            raise _unavailable(self.placement.stages[i], exc) from exc

    def info(self) -> list[dict]:
        return self.broadcast("info")

    def release(self) -> None:
        """Drop the actors: their workers free the spans' memory."""
        self.actors, self._futures = [], []


async def _awaitable(future):
    return await future


def unavailable_message(stage: StageSpec) -> str:
    return (f"the worker {stage.worker} hosting layers {stage.start}–{stage.end - 1} did not answer. It is gone or "
            "overloaded: check the cluster (bb.connect(...).workers()) and load the model again so its spans are "
            "placed on live workers.")


def _unavailable(stage: StageSpec, exc: BaseException) -> StageUnavailableError:
    return StageUnavailableError(f"{unavailable_message(stage)} [{type(exc).__name__}: {exc}]")

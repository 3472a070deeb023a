"""Noticing, within bounded time, that a chain's stage is gone or hung — and naming its worker.

- a worker process that dies closes its connections: steps through it fail at once (``relay.py``);
- every call also has a timeout: a hung worker never answers;
- while a call waits longer than ``interval_s``, a watchdog asks the scheduler which workers it
  still has (a killed worker is gone from it at once, while a call to its address would retry
  connecting for Dask's 30 s connect timeout) and pings every stage on its worker's event loop
  (``StageActor.ping``, answered even while a long step computes): a stage silent for
  ``ping_timeout_s`` fails the call as hung.

:func:`ping_stages` asks every stage the same way on demand (a recovery checks which workers
still answer).
"""

from __future__ import annotations

import asyncio

from ..errors import BloombeeError, StageHungError, StageUnavailableError
from .placement import Placement


class Watchdog:
    def __init__(self, client, placement: Placement, ping, interval_s: float | None, ping_timeout_s: float):
        """``ping(i)``: a coroutine pinging stage ``i``; ``interval_s`` None: no watchdog."""
        self.client, self.placement, self.ping = client, placement, ping
        self.interval_s, self.ping_timeout_s = interval_s, ping_timeout_s

    async def watched(self, call):
        """Await ``call``; once it has waited ``interval_s``, the watchdog runs beside it and fails
        it as soon as a stage's worker is found lost. A call done sooner cost one timer: the call
        runs in the caller's task (no task of its own, no ``asyncio.wait``), which the watchdog
        cancels when it finds a loss (a decode step is ~1 ms of event-loop work, issue 18)."""
        if self.interval_s is None:
            return await call
        me, watch = asyncio.current_task(), []

        def start():
            watch.append(asyncio.ensure_future(self._watch()))
            watch[0].add_done_callback(lambda w: None if w.cancelled() or w.exception() is None else me.cancel())

        timer = asyncio.get_running_loop().call_later(self.interval_s, start)
        try:
            return await call
        except asyncio.CancelledError:
            found = watch[0] if watch and watch[0].done() and not watch[0].cancelled() else None
            if found is None or found.exception() is None:
                raise
            me.uncancel()
            raise found.exception() from None
        finally:
            timer.cancel()
            for w in watch:
                w.cancel()

    async def _watch(self):
        """Raises once a stage's worker is gone from the scheduler (checked every ``interval_s``)
        or has not answered a ping for ``ping_timeout_s``."""
        pings, since = None, 0.0
        loop = asyncio.get_running_loop()
        stages = self.placement.stages
        try:
            while True:
                gone = await self.gone_from_scheduler()
                if gone:
                    raise StageUnavailableError(lost_message(self.placement, gone, "left the cluster "
                                                "(the scheduler lost it)"), workers=gone)
                if pings is None:
                    pings, since = {i: asyncio.ensure_future(self.ping(i)) for i in range(len(stages))}, loop.time()
                else:
                    silent = [stages[i].worker for i, p in pings.items()
                              if not p.done() or p.cancelled() or p.exception() is not None]
                    if not silent:
                        pings = None
                    elif loop.time() - since >= self.ping_timeout_s or all(p.done() for p in pings.values()):
                        raise StageHungError(lost_message(self.placement, silent, f"did not answer a ping "
                                             f"within {self.ping_timeout_s:.0f}s (hung)"), workers=silent)
                await asyncio.sleep(self.interval_s)
        finally:
            for p in (pings or {}).values():
                p.cancel()

    async def gone_from_scheduler(self) -> list[str]:
        try:
            present = (await self.client.scheduler.identity(n_workers=-1))["workers"]
        except (OSError, KeyError, TypeError):
            return []  # the scheduler did not answer: only our own calls can tell
        return [w for w in dict.fromkeys(self.placement.workers) if w not in present]


def lost_message(placement: Placement, workers: list[str], what: str) -> str:
    spans = ", ".join(f"{s.worker} (layers {s.start}–{s.end - 1})" for s in placement.stages if s.worker in workers)
    return f"{spans} {what}"


def ping_stages(client, workers, actors, timeout_s: float, skip=()) -> dict[str, dict | None]:
    """worker address -> its stage's ``StageActor.ping`` answer (``workers[i]`` hosts ``actors[i]``),
    ``None`` where the worker did not answer within ``timeout_s`` or its call failed. Workers in
    ``skip`` are not pinged."""
    async def one(actor):
        try:
            return await asyncio.wait_for(awaitable(actor.ping()), timeout_s)
        except (OSError, asyncio.TimeoutError, TimeoutError, KeyError, RuntimeError, BloombeeError):
            return None

    asked = [(w, a) for w, a in zip(workers, actors) if w not in skip]

    async def every():
        return await asyncio.gather(*(one(a) for _, a in asked))

    return dict(zip([w for w, _ in asked], client.sync(every)))


async def awaitable(future):
    """An actor call's future as a coroutine, for ``asyncio.wait_for``."""
    return await future

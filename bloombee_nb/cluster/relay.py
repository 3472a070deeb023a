"""The client's side of the step protocol: send a step along a route, get its delivery back.

One relay per chain. It opens one delivery stream (``bloombee_attach``, see ``wire.py``) to each
worker its routes go through, sends every step to its first hop over the Dask client's own
connection pool (one-way ``bloombee_step`` messages: persistent connections, no reply per hop),
and resolves the step when its :class:`~.protocol.Delivery` arrives on a stream. Star and chain
are two routes of this one relay: star sends one hop per step and gets each stage's output back,
chain sends the whole route and gets the last stage's.

A worker that dies closes its stream: every step routed through it fails at once with
:class:`~bloombee_nb.errors.StageUnavailableError` naming it, without waiting for a timeout.
A hung worker is the watchdog's business (``liveness.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import connect
from distributed.comm.core import CommClosedError

from ..errors import StageHungError, StageUnavailableError
from ..transport.emulation import hold
from .protocol import Delivery, Entry, StageRef, Step


class Relay:
    def __init__(self, client, owner: str):
        self.client, self.owner = client, owner
        self.reply_to = f"{owner}/{uuid.uuid4().hex[:12]}"
        self._streams: dict[str, object] = {}                     # worker -> our delivery stream from it
        self._attaching: dict[str, asyncio.Future] = {}
        self._pending: dict[int, tuple[asyncio.Future, frozenset[str]]] = {}  # step id -> (delivery, its workers)
        self._ids = itertools.count()
        self._readers: set[asyncio.Task] = set()
        self.closed = False

    async def send(self, hops: tuple[StageRef, ...], entries: tuple[Entry, ...], timeout_s: float) -> Delivery:
        """``entries`` along ``hops``; returns the delivery (whose entries carry their own errors),
        or raises the error that stopped the whole step (a stage gone, or silent past ``timeout_s``)."""
        workers = frozenset(h.worker for h in hops)
        if not workers <= self._streams.keys():
            await asyncio.gather(*(self._attach(w, hops) for w in workers))
        step = Step(next(self._ids), self.owner, self.reply_to, hops, entries)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending[step.id] = (done, workers)
        timer = None
        try:
            await hold(step.nbytes())  # emulated client link (benchmarks only)
            try:
                await self.client.rpc(hops[0].worker).bloombee_step(step=step.to_msg(), reply=False)
            except (OSError, CommClosedError) as exc:
                raise _gone(hops[0], exc) from exc
            timer = loop.call_later(timeout_s, _expire, done, lambda: StageHungError(
                f"step {step.id} did not come back from {_describe(hops)} within {timeout_s:.0f}s; a stage is "
                "overloaded or gone", workers=tuple(sorted(workers))))
            delivery = await done  # (a timer, not asyncio.wait_for: no task per step)
        finally:
            if timer is not None:
                timer.cancel()
            self._pending.pop(step.id, None)
        if delivery.error is not None:
            raise delivery.error
        return delivery

    async def _attach(self, worker: str, hops) -> None:
        """Our delivery stream from ``worker`` (opened once; every later step reuses it)."""
        if worker in self._streams:
            return
        if worker not in self._attaching:
            self._attaching[worker] = asyncio.ensure_future(self._open(worker))
        try:
            await asyncio.shield(self._attaching[worker])
        except (OSError, CommClosedError) as exc:
            self._attaching.pop(worker, None)
            raise _gone(next(h for h in hops if h.worker == worker), exc) from exc

    async def _open(self, worker: str) -> None:
        comm = await connect(worker, **self.client.connection_args)
        await comm.write({"op": "bloombee_attach", "reply_to": self.reply_to, "reply": False})
        # the worker answers once the stream is registered: a step sent before that (on another
        # connection) could finish first and find nowhere to deliver — a decode step that runs as it
        # arrives (stage.py) finishes in milliseconds, while a new connection's handshake can take longer
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
        answer = await asyncio.wait_for(comm.read(), timeout)
        if answer != "attached":
            raise CommClosedError(f"the worker answered the delivery stream with {answer!r}")
        self._streams[worker] = comm
        self._attaching.pop(worker, None)
        task = asyncio.ensure_future(self._read(worker, comm))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _read(self, worker: str, comm) -> None:
        try:
            while True:
                delivery = Delivery.from_msg(await comm.read())
                waiting = self._pending.get(delivery.id)
                if waiting is not None and not waiting[0].done():
                    waiting[0].set_result(delivery)
        except (CommClosedError, OSError) as exc:
            if self._streams.get(worker) is comm:
                del self._streams[worker]
            if not self.closed:
                error = StageUnavailableError(f"the worker {worker} closed its connection (it died or left) "
                                              f"[{type(exc).__name__}: {exc}]", workers=(worker,))
                for done, workers in list(self._pending.values()):
                    if worker in workers and not done.done():
                        done.set_exception(error)

    async def close(self) -> None:
        """Close the streams: the workers forget this relay."""
        self.closed = True
        comms, self._streams = list(self._streams.values()), {}
        for comm in comms:
            try:
                await comm.close()
            except (CommClosedError, OSError):
                pass
        for task in list(self._readers):
            task.cancel()


def on_loop(client, func, *args):
    """``await func(*args)`` on the Dask client's event loop, waited for in the caller's thread: what
    ``client.sync`` does, in fewer event-loop turns (``asyncio.run_coroutine_threadsafe``: one
    thread-safe call and one task, where ``sync`` adds a Tornado coroutine, a ``gen.moment`` and a
    callback). The hand-off every decode step makes (issue 18); an asynchronous client, or a call
    from the loop's own thread, goes through ``client.sync`` as before."""
    loop = client.loop.asyncio_loop
    if client.asynchronous or _running_loop() is loop:
        return client.sync(func, *args)
    future = asyncio.run_coroutine_threadsafe(func(*args), loop)
    try:
        return future.result()
    except KeyboardInterrupt:
        future.cancel()  # as client.sync does: the step's coroutine is cancelled on the loop
        raise


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _expire(done: asyncio.Future, error) -> None:
    if not done.done():
        done.set_exception(error())


def _describe(hops) -> str:
    return " → ".join(h.describe() for h in hops)


def _gone(hop: StageRef, exc: BaseException) -> StageUnavailableError:
    return StageUnavailableError(f"the worker {hop.describe()} did not answer. It is gone or overloaded: check the "
                                 "cluster (bb.connect(...).workers()) and load the model again so its spans are "
                                 f"placed on live workers. [{type(exc).__name__}: {exc}]", workers=(hop.worker,))

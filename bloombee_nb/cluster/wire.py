"""The stages' side of the step protocol: two Dask comm handlers on each worker that hosts a stage.

- ``bloombee_step`` (one-way, ``reply=False``): a :class:`~.protocol.Step` for a stage of this
  worker, from a client or from the stage before it. It is handed to the stage named by its first
  hop (the worker's Dask actor of that key) and the handler returns at once: the connection is
  free for the next step while this one queues and runs. One exception, for one user's latency: a
  decode step that a one-session stage runs as it arrives is sent on from the handler itself
  (``StageActor.accept`` returns the coroutine, which Dask awaits in the connection's task), so the
  connection is busy for that one decode step's layers.
- ``bloombee_attach``: a client's stream for :class:`~.protocol.Delivery` values — the client
  opens one connection per worker it routes through, waits for the worker's ``"attached"`` on it,
  and deliveries for it are written on it as steps finish here. A client that disconnects is forgotten; a connection that closes tells the
  client at once that the worker is gone (``relay.py``).

Steps go from stage to stage over the worker's own Dask connection pool (``worker.rpc``):
persistent connections, frames as Dask serialises bytes, TLS when the cluster has it. Nothing
here is a second RPC layer: the handlers are Dask's, registered like any worker extension's.
"""

from __future__ import annotations

import logging

from distributed.comm.core import CommClosedError
from distributed.core import Status

from ..errors import StageUnavailableError
from ..transport.emulation import hold
from .protocol import Delivery, Step

logger = logging.getLogger(__name__)


class StageWire:
    """The worker extension behind the handlers (one per worker; ``StageWire.of(worker)``)."""

    name = "bloombee_wire"

    def __init__(self, worker):
        self.worker = worker
        self.streams: dict[str, object] = {}   # reply_to -> the client's delivery stream (a Dask comm)
        self.leaving = False                   # the worker is leaving: no new stage loads here (stage.begin_leaving)
        worker.handlers["bloombee_step"] = self.on_step
        worker.handlers["bloombee_attach"] = self.on_attach

    @classmethod
    def of(cls, worker) -> "StageWire":
        """This worker's wire, installed on first use (the first stage loaded here)."""
        wire = worker.extensions.get(cls.name)
        if wire is None:
            wire = worker.extensions[cls.name] = cls(worker)
        return wire

    # ---- handlers ------------------------------------------------------------------------------
    def on_step(self, step: dict):
        return self.dispatch(Step.from_msg(step))

    async def on_attach(self, comm, reply_to: str):
        """Keep ``comm`` as ``reply_to``'s delivery stream until it closes (the client left)."""
        self.streams[reply_to] = comm
        try:
            await comm.write("attached")  # the client sends steps once its stream is known here (relay.py)
            while True:
                await comm.read()  # the client writes nothing here; a read ends when it disconnects
        except (CommClosedError, OSError):
            pass
        finally:
            if self.streams.get(reply_to) is comm:
                del self.streams[reply_to]
        return Status.dont_reply

    # ---- what stages call ----------------------------------------------------------------------
    def dispatch(self, step: Step):
        """Hand ``step`` to its first hop's stage, here; a stage that is not here fails the step.
        Returns what the stage returns: ``None``, or a coroutine sending the step on that the caller
        awaits (``StageActor.accept``: a decode step that ran at once)."""
        stage = self.worker.state.actors.get(step.here.key)
        if stage is None or not hasattr(stage, "accept"):
            error = StageUnavailableError(f"{step.here.describe()} is not hosted there any more (the span was "
                                          "unhosted or its model closed); route through live stages",
                                          workers=(step.here.worker,))
            self.worker.loop.add_callback(self.deliver, step, Delivery(step.id, error=error))
            return None
        return stage.accept(step)

    async def send(self, step: Step) -> None:
        """``step`` on to its next hop (a stage on this worker or another)."""
        await hold(step.nbytes())  # emulated link out of this worker (benchmarks only)
        if step.here.worker == self.worker.address:
            onward = self.dispatch(step)
            if onward is not None:
                await onward
            return
        try:
            await self.worker.rpc(step.here.worker).bloombee_step(step=step.to_msg(), reply=False)
        except (OSError, CommClosedError) as exc:  # the next worker is gone
            error = StageUnavailableError(
                f"the worker {step.here.describe()} did not answer. It is gone or overloaded: the session moves "
                f"to live workers [{type(exc).__name__}: {exc}]", workers=(step.here.worker,))
            await self.deliver(step, Delivery(step.id, error=error))

    async def deliver(self, step: Step, delivery: Delivery) -> None:
        """``delivery`` to the client that sent ``step`` (dropped if it has gone: nobody waits)."""
        comm = self.streams.get(step.reply_to)
        if comm is None:
            logger.info("step %s: its client %s is not attached here any more; delivery dropped",
                        step.id, step.reply_to)
            return
        await hold(sum(e.nbytes() for e in delivery.entries))
        try:
            await comm.write(delivery.to_msg())
        except (CommClosedError, OSError):
            pass  # the client left while we were writing

"""The Dask actor that hosts one stage: a :class:`SpanRunner` behind frame-in / frame-out methods.

Methods are ``async``: they run on the worker's event loop, and every touch of the span's state
(compute, open/close/rollback) is pushed to one private thread, so steps are serialised without
ever blocking the loop — a stage waiting on the next stage never holds up other sessions, and
two chains that cross the same workers in opposite orders cannot deadlock.

Two ways to run a step:

- star (``step=None``): the caller gets this span's output back and relays it itself;
- chain (``step=<n>``): the output goes straight on to the next stage (without waiting for it);
  the last stage hands it to the client's pending :meth:`collect` call. Hidden states cross each
  link once, and nothing travels back along the chain: a stage that fails reports its typed
  error to the last stage, which delivers it to ``collect`` instead of an output.

Speculative decoding: a step may carry a token tree (``tree``: its parents ``[T]`` as a frame) and
the accepted path of the previous tree step (``keep``: ``(past_len, frame of [B, K] node indices)``),
which is compacted before the step runs, so keeping a path costs no round trip of its own. Both
travel with the hidden states along the chain. Without them a step is exactly as before.

Every tensor is a frame (``bytes``) decoded here; every error raised is a typed
:mod:`bloombee_nb.errors` exception that reaches the caller with its type, and leaves every
other session on this stage untouched.

Leaving: when its worker is asked to leave (``bloombee-nb worker`` gets SIGTERM,
:func:`begin_leaving`), a stage answers new steps and sessions with :class:`StageLeavingError`
— its clients replay their sessions elsewhere — and still closes sessions and answers pings, so
the worker can exit once no session is left on it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .. import transport
from ..errors import BloombeeError, StageHungError, StageLeavingError, StageUnavailableError
from ..model.span import SpanRunner
from ..transport.emulation import hold


#: Set in a worker process that is leaving: no new stage loads there.
_LEAVING = False


class StageActor:
    def __init__(self, path: str, start: int, end: int, dtype: str | None = None, num_threads: int = 1,
                 max_kv_bytes: int | None = None, max_sessions: int | None = None,
                 allow_unverified_architecture: bool = False, weight_offload: float = 0.0, kv_offload: float = 0.0):
        self.address = _worker_address()
        if _LEAVING:
            raise StageLeavingError(f"the worker {self.address} is leaving and takes no new spans; place the "
                                    "model on other workers", workers=(self.address,))
        self.leaving = False
        torch.set_num_threads(num_threads)  # workers otherwise run torch single-threaded
        kw = {k: v for k, v in dict(max_kv_bytes=max_kv_bytes, max_sessions=max_sessions).items() if v is not None}
        self.runner = SpanRunner(path, start, end, getattr(torch, dtype) if dtype else None,
                                 allow_unverified_architecture=allow_unverified_architecture,
                                 weight_offload=weight_offload, kv_offload=kv_offload, **kw)
        self.max_frame_bytes = transport.frame.DEFAULT_MAX_BYTES
        self.next = self.last = self._next_worker = None  # chain mode: the next and the last stage's actor handles
        self._sending: set[asyncio.Task] = set()  # outputs on their way to the next stage
        self.out_policy = transport.CodecPolicy()  # which codec this stage's outgoing frames use, by size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bloombee-stage")
        self._outputs: dict[tuple[str, int], asyncio.Future] = {}  # last stage: outputs awaiting collect()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def set_next(self, actor, unavailable_message: str, last=None, next_worker: str | None = None) -> None:
        """Chain mode: where this stage's output goes (``next_worker``: its address), what to say if it
        cannot get there, and the last stage (where failures are reported)."""
        self.next, self._next_unavailable, self.last = actor, unavailable_message, last
        self._next_worker = next_worker

    def set_compression(self, policy: dict) -> None:
        """How to encode outgoing frames: a :class:`~bloombee_nb.transport.CodecPolicy` as a dict."""
        self.out_policy = transport.CodecPolicy.from_dict(policy)

    async def calibrate_codecs(self, sample: bytes) -> list[list[dict]]:
        """Encode/decode cost and ratio of each candidate codec on this machine, for growing row
        counts of ``sample`` (a real hidden state): what the client chooses this stage's codec from."""
        def run():
            stats = transport.calibrate_sizes(transport.decode(sample, self.max_frame_bytes))
            return [[dict(codec=str(c.codec), raw_nbytes=c.raw_nbytes, wire_nbytes=c.wire_nbytes,
                          encode_s=c.encode_s, decode_s=c.decode_s) for c in st] for st in stats]
        return await self._run(run)

    async def open_session(self, session_id: str, batch: int, max_length: int) -> None:
        self._check_staying()
        await self._run(self.runner.open, session_id, batch, max_length)

    async def ping(self) -> dict:
        """Answered on the worker's event loop, even while a step computes: alive, leaving, sessions."""
        return {"leaving": self.leaving, "sessions": len(self.runner.sessions)}

    def _check_staying(self) -> None:
        if self.leaving:
            raise StageLeavingError(f"the worker {self.address} hosting layers {self.runner.start}–"
                                    f"{self.runner.end - 1} is leaving the cluster; the session moves to other "
                                    "workers", workers=(self.address,))

    async def close_session(self, session_id: str) -> None:
        for key in [k for k in self._outputs if k[0] == session_id]:
            self._outputs.pop(key).cancel()
        await self._run(self.runner.close, session_id)

    async def rollback(self, session_id: str, length: int) -> None:
        await self._run(self.runner.rollback, session_id, length)

    async def keep_path(self, session_id: str, past_len: int, keep: list) -> None:
        """Speculation: keep only the accepted path of the last tree step (see ``SpanRunner.keep_path``)."""
        await self._run(self.runner.keep_path, session_id, past_len, keep)

    def _compute(self, session_id: str, hidden: bytes, position_ids: bytes, attention_mask: bytes,
                 tree: bytes | None = None, keep: tuple[int, bytes] | None = None):
        h = transport.decode(hidden, self.max_frame_bytes)
        pos = transport.decode(position_ids, self.max_frame_bytes)
        mask = transport.decode(attention_mask, self.max_frame_bytes)
        parents = None if tree is None else transport.decode(tree, self.max_frame_bytes)
        t0 = time.perf_counter()
        if keep is not None:  # the accepted path of the previous tree step, before this step runs
            self.runner.keep_path(session_id, keep[0], transport.decode(keep[1], self.max_frame_bytes))
        out = self.runner.forward(session_id, h, pos, mask, parents)
        compute_s = time.perf_counter() - t0
        return transport.encode(out, self.out_policy.codec_for(out.numel() * out.element_size())), compute_s

    async def forward(self, session_id: str, hidden: bytes, position_ids: bytes, attention_mask: bytes,
                      step: int | None = None, computes: tuple = (), tree: bytes | None = None,
                      keep: tuple[int, bytes] | None = None) -> tuple[bytes | None, tuple]:
        """One step of one session. Star: returns (output frame, ((compute seconds, output frame
        bytes) of each stage so far)).

        Chain: returns (None, …) as soon as this stage has computed and sent its output on; an
        error here or downstream reaches the client through the last stage's ``collect``.

        ``tree`` (a frame of int64 parents ``[T]``) makes the step a token tree; ``keep``
        (``past_len``, a frame of int64 ``[B, K]`` paths) first keeps the accepted path of the last
        tree step (see :meth:`SpanRunner.keep_path`).
        """
        try:
            self._check_staying()
            out, compute_s = await self._run(self._compute, session_id, hidden, position_ids, attention_mask,
                                             tree, keep)
        except BaseException as exc:
            if step is not None:
                await self._report(session_id, step, exc)
            raise
        computes = (*computes, (compute_s, len(out)))
        if step is None:
            await hold(len(out))  # emulated link out of this worker (benchmarks only)
            return out, computes
        if self.next is None:
            await hold(len(out))
            self._output(session_id, step).set_result((out, computes))
            return None, computes
        task = asyncio.ensure_future(self._send_on(session_id, out, position_ids, attention_mask, step, computes,
                                                   tree, keep))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return None, computes

    async def _send_on(self, session_id, out, position_ids, attention_mask, step, computes, tree=None,
                       keep=None) -> None:
        try:
            await hold(len(out) + len(position_ids) + len(attention_mask) + extra_nbytes(tree, keep))
            await self.next.forward(session_id, out, position_ids, attention_mask, step, computes, tree, keep)
        except BloombeeError:
            pass  # the stage that raised it has reported it to the last stage
        except (OSError, RuntimeError, TimeoutError) as exc:  # the next worker is gone
            named = (self._next_worker,) if self._next_worker else ()
            await self._report(session_id, step, StageUnavailableError(
                f"{self._next_unavailable} [{type(exc).__name__}: {exc}]", workers=named))

    async def _report(self, session_id: str, step: int, exc: BaseException) -> None:
        """Chain mode: make the client's ``collect`` of ``step`` raise ``exc``."""
        if self.next is None:
            await self.fail(session_id, step, exc)
        elif self.last is not None:
            try:
                await self.last.fail(session_id, step, exc)
            except (OSError, RuntimeError, TimeoutError):
                pass  # the last stage is gone: the client's collect fails by itself

    async def fail(self, session_id: str, step: int, exc: BaseException) -> None:
        """Last stage: deliver an upstream failure of ``step`` to the client's ``collect``."""
        fut = self._output(session_id, step)
        if not fut.done():
            fut.set_exception(exc)

    def _output(self, session_id: str, step: int) -> asyncio.Future:
        key = (session_id, step)
        if key not in self._outputs:
            self._outputs[key] = asyncio.get_running_loop().create_future()
        return self._outputs[key]

    async def collect(self, session_id: str, step: int, timeout_s: float) -> tuple[bytes, tuple[float, ...]]:
        """Last stage: wait for the chain's output of ``step`` (called by the client with forward)."""
        fut = self._output(session_id, step)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except asyncio.TimeoutError:
            raise StageHungError(
                f"step {step} of session {session_id!r} did not reach the last stage within {timeout_s:.0f}s; "
                "an earlier stage is overloaded or gone") from None
        finally:
            if fut.done():
                self._outputs.pop((session_id, step), None)

    async def info(self) -> dict:
        return await self._run(self.runner.info)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:  # constructed outside a worker (tests of the class itself)
        return "local"


def begin_leaving(worker) -> list[StageActor]:
    """This worker process is leaving: every stage it hosts refuses new steps and sessions
    (:class:`StageLeavingError`), and no new stage loads here. Returns the stages."""
    global _LEAVING
    _LEAVING = True
    stages = hosted_stages(worker)
    for st in stages:
        st.leaving = True
    return stages


def hosted_stages(worker) -> list[StageActor]:
    """The stage actors a Dask worker hosts now (its actor registry)."""
    return [a for a in list(worker.state.actors.values()) if isinstance(a, StageActor)]


def open_sessions(worker) -> int:
    """Sessions still open on the stages this worker hosts."""
    return sum(len(st.runner.sessions) for st in hosted_stages(worker))


def extra_nbytes(tree: bytes | None, keep: tuple[int, bytes] | None) -> int:
    """Bytes a step's speculation frames add to the message that carries it."""
    return (len(tree) if tree is not None else 0) + (len(keep[1]) + 8 if keep is not None else 0)

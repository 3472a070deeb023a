"""The Dask actor that hosts one stage: a :class:`SpanRunner` behind the step protocol.

A step reaches a stage through one entry point, :meth:`StageActor.accept`, from the worker's
``bloombee_step`` handler (``wire.py``): the step's entries join the stage's queue
(``batching.py``: merging, fair share between clients, order within a session), run on one
private thread, and the step goes on to its next hop — or, at the end of its route, is delivered
to its client. A step carries its own route (``protocol.py``), so the stage keeps no routing
state: star and chain, private and swarm sessions are the same path. Control (open, close,
roll back, keep a path, ping, info) are actor methods.

Every touch of the span's state runs on one private thread, so the worker's event loop does not
block on long work: a ping is answered while a prompt computes, and two chains that cross the same
workers in opposite orders cannot deadlock. One exception, for latency: a decode-sized batch
(one new position per row, at most ``INLINE_ROWS`` rows, weights resident) found with the thread
idle runs on the event loop itself — the hand-off to a thread and back costs more than the
difference to a one-user decode step (benchmarks/results/latency_*.md), and the loop is held no
longer than one decode step. On a stage holding one session, such a step that finds the queue
empty does not even queue: it runs as it arrives and leaves from the handler that received it
(:meth:`StageActor.accept`).

Speculative decoding: an entry may carry a token tree (``tree``: its parents ``[T]`` as a frame)
and the accepted path of the previous tree step (``keep``: ``(past_len, frame of [B, K] node
indices)``), which is compacted before the step runs, so keeping a path costs no round trip of
its own. Both travel with the hidden states along the route.

Every tensor is a frame (``bytes``) decoded here; every error is a typed :mod:`bloombee_nb.errors`
exception that travels with its entry to the client, and leaves every other session on this stage
untouched. An entry that fails goes on as a skip, so the stages after this one do not wait for its
``seq``.

Replay logs: a session opened with ``log=True`` (a swarm client's, on every stage of its route but
the last) keeps this stage's output frame of each of its steps, by the position the step started
at, as sent (compressed). When a later stage of the route is lost and a replica takes its place,
the client asks this stage to send its logged outputs on to the replica (an entry with
``from_log``) instead of replaying the whole history through every stage: only the replaced
stage recomputes. A rollback drops what it undoes; the log costs ``hidden_size`` values per
position, against the KV's ``2 × layers × kv_dim``.

Ownership: a session is bound to the client that opened it (``owner``): only that client may send
it steps, close it, roll it back or keep a path of it. A refused step goes back to its sender
only, and does not move the owner's order.

Leaving: when its worker is asked to leave (``bloombee-nb worker`` gets SIGTERM,
:func:`begin_leaving`), a stage answers new steps and sessions with :class:`StageLeavingError`
— its clients replay their sessions elsewhere — and still closes sessions and answers pings, so
the worker can exit once no session is left on it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from .. import transport
from ..errors import SessionOwnerError, StageLeavingError
from ..model.merge import forward_many
from ..model.span import SpanRunner
from ..transport.choice import timed_s
from .batching import Job, StageQueue, job, skip
from .policy import check_allowed
from .protocol import Delivery, Entry, StageRef, Step
from .wire import StageWire

#: A decode batch of at most this many rows may run on the event loop (module doc).
INLINE_ROWS = 8


class StageActor:
    def __init__(self, path: str, start: int, end: int, dtype: str | None = None, num_threads: int = 1,
                 max_kv_bytes: int | None = None, max_sessions: int | None = None,
                 allow_unverified_architecture: bool = False, weight_offload: float = 0.0, kv_offload: float = 0.0,
                 micro_batch: int | None = None, merge: bool = True, device: str | None = None,
                 quantize: str | None = None,  # quantized spans (issue 19): passed to SpanRunner unchanged
                 inline_decode: bool = True):
        worker = _this_worker()
        self.address = worker.address if worker is not None else "local"
        self.wire = StageWire.of(worker) if worker is not None else None
        check_allowed(path)
        if self.wire is not None and self.wire.leaving:
            raise StageLeavingError(f"the worker {self.address} is leaving and takes no new spans; place the "
                                    "model on other workers", workers=(self.address,))
        self.leaving = False
        torch.set_num_threads(num_threads)  # workers otherwise run torch single-threaded
        kw = {k: v for k, v in dict(max_kv_bytes=max_kv_bytes, max_sessions=max_sessions, device=device,
                                    quantize=quantize).items() if v is not None}
        self.runner = SpanRunner(path, start, end, getattr(torch, dtype) if dtype else None,
                                 allow_unverified_architecture=allow_unverified_architecture,
                                 weight_offload=weight_offload, kv_offload=kv_offload, **kw)
        self.max_frame_bytes = transport.frame.DEFAULT_MAX_BYTES
        self._owners: dict[str, str] = {}           # session -> the client that opened it
        self._logs: dict[str, dict[int, bytes]] = {}  # session -> {first position: output frame} (module doc)
        self._tasks: set[asyncio.Task] = set()      # steps being taken through the queue and sent on
        self.out_policy = transport.CodecPolicy()   # which codec this stage's outgoing frames use, by size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bloombee-stage")
        self._on_thread = 0                         # calls running or waiting on the private thread
        self.inline_decode = inline_decode          # decode batches may run on the event loop (module doc)
        self.queue = StageQueue(self._run_batch)
        self.set_batching(micro_batch, merge)

    async def _run(self, fn, *args):
        self._on_thread += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._on_thread -= 1

    @property
    def micro_batch(self) -> int | None:
        return self.queue.micro_batch

    @property
    def merge(self) -> bool:
        return self.queue.merge

    def set_batching(self, micro_batch: int | None = None, merge: bool = True) -> None:
        """At most ``micro_batch`` rows per forward (None: no limit); ``merge=False`` runs every step alone."""
        if micro_batch is not None and int(micro_batch) < 1:
            raise ValueError(f"micro_batch must be a positive number of rows or None, got {micro_batch}")
        self.queue.micro_batch, self.queue.merge = (None if micro_batch is None else int(micro_batch)), bool(merge)

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

    # ---- sessions (control) ----------------------------------------------------------------------
    async def open_session(self, session_id: str, batch: int, max_length: int, owner: str | None = None,
                           log: bool = False) -> None:
        """Reserve a session's KV; ``owner``: the client that may later step it, close it, roll it
        back or keep its paths. Its owner opening it again (a client re-routed after losing another
        stage, replaying its history) starts it afresh. ``log``: keep the session's outputs (module
        doc: Replay logs)."""
        self._check_staying()
        if owner is not None and session_id in self.runner.sessions and self._owners.get(session_id) == owner:
            await self.close_session(session_id, owner)
        await self._run(self.runner.open, session_id, batch, max_length)
        self.queue.next_seq[session_id] = 0
        if log:
            self._logs[session_id] = {}
        if owner is not None:
            self._owners[session_id] = owner

    def _check_owner(self, session_id: str, owner: str | None) -> None:
        held = self._owners.get(session_id)
        if held is not None and owner != held:
            raise SessionOwnerError(f"session {session_id[:8]}… on layers {self.runner.start}–{self.runner.end - 1} "
                                    "belongs to another client; a client can only use its own sessions")

    def session_owners(self) -> list[tuple[str, str]]:
        """(session, the client that opened it or "") for every session open here."""
        return [(sid, self._owners.get(sid, "")) for sid in list(self.runner.sessions)]

    def sessions_by_owner(self) -> dict[str, int]:
        """owner -> open sessions here (sessions opened without an owner count under "")."""
        out: dict[str, int] = {}
        for sid in list(self.runner.sessions):
            owner = self._owners.get(sid, "")
            out[owner] = out.get(owner, 0) + 1
        return out

    async def ping(self) -> dict:
        """Answered on the worker's event loop, even while a step computes: alive, leaving, sessions."""
        return {"leaving": self.leaving, "sessions": len(self.runner.sessions), "queued": len(self.queue),
                "clients": len(set(self._owners.values()))}

    def _check_staying(self) -> None:
        if self.leaving:
            raise StageLeavingError(f"the worker {self.address} hosting layers {self.runner.start}–"
                                    f"{self.runner.end - 1} is leaving the cluster; the session moves to other "
                                    "workers", workers=(self.address,))

    async def close_session(self, session_id: str, owner: str | None = None) -> None:
        self._check_owner(session_id, owner)
        await self._run(self.runner.close, session_id)
        self.queue.next_seq.pop(session_id, None)
        self._owners.pop(session_id, None)
        self._logs.pop(session_id, None)

    async def rollback(self, session_id: str, length: int, owner: str | None = None) -> None:
        self._check_owner(session_id, owner)
        await self._run(self.runner.rollback, session_id, length)
        log = self._logs.get(session_id)
        for start in [k for k in log or () if k >= length]:  # the client's history drops those steps too
            del log[start]

    async def keep_path(self, session_id: str, past_len: int, keep: list, owner: str | None = None) -> None:
        """Speculation: keep only the accepted path of the last tree step (see ``SpanRunner.keep_path``)."""
        self._check_owner(session_id, owner)
        await self._run(self.runner.keep_path, session_id, past_len, keep)

    async def set_seq(self, session_id: str, seq: int) -> None:
        """The client's count of the session's steps, after a step that failed somewhere: stages that
        never saw it stop waiting for it (answered at once, not queued)."""
        self.queue.set_seq(session_id, seq)

    async def skip(self, session_id: str, seq: int) -> None:
        """Step ``seq`` of the session failed before it got here: stop waiting for it."""
        await self.queue.submit(skip(session_id, seq))

    # ---- steps ---------------------------------------------------------------------------------
    def accept(self, step: Step, reply=None):
        """The one entry point of a step (module doc): its entries join the queue; once they ran,
        the step goes on to its next hop, or is delivered to its client at the end of its route
        (``reply``: a callable taking the step as it leaves, instead — :meth:`forward`).

        The one session's decode step on a stage that holds one session, finding the queue empty
        and the thread idle, runs here and now on the event loop (module doc: latency), and what is
        returned is the coroutine that sends it on: the caller (the worker's ``bloombee_step``
        handler, which Dask awaits in the connection's own task) awaits it, so the step leaves
        without a task or a loop turn of its own. Anything else — several entries or sessions (their
        steps arriving together merge in the queue), a replayed or failed entry, a prompt, a busy
        stage — takes the queue, and ``None`` is returned."""
        if reply is None:
            onward = self._take_now(step)
            if onward is not None:
                return self._pass_on(step, onward)
        task = asyncio.ensure_future(self._take(step, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    def _take_now(self, step: Step) -> Step | None:
        """``step`` run on this stage now (:meth:`accept`), as it leaves; ``None`` if it must queue."""
        if len(step.entries) != 1 or len(self.runner.sessions) > 1:
            return None
        e = step.entries[0]
        if e.failed or e.from_log is not None or self._admit(step.owner, e).failed:
            return None
        j = self._job(step.owner, e)
        if not (self._inline([j]) and self.queue.take_now(j)):
            return None
        (r,) = self._compute_jobs([j])
        self.queue.ran([j])
        return step.onwards((e.failing(r) if isinstance(r, BaseException) else e.done_by(*r),))

    async def _pass_on(self, step: Step, onward: Step) -> None:
        """``onward`` (``step`` after this stage) to its next hop, or delivered to its client."""
        if onward.hops:
            await self.wire.send(onward)
        else:
            await self.wire.deliver(step, Delivery(step.id, onward.entries))

    async def _take(self, step: Step, reply) -> None:
        entries = [self._admit(step.owner, e) for e in step.entries]
        results = await asyncio.gather(*(self._logged(e) if e.from_log is not None and not e.failed else
                                         self.queue.submit(self._job(step.owner, e)) for e in entries),
                                       return_exceptions=True)
        done = tuple(e if e.failed else e.failing(r) if isinstance(r, BaseException) else
                     r if isinstance(r, Entry) else e.done_by(*r) for e, r in zip(entries, results))
        onward = step.onwards(done)
        if reply is not None:
            reply(onward)
        else:
            await self._pass_on(step, onward)

    def _admit(self, owner: str, e: Entry) -> Entry:
        """``e`` as it may run here: refused (another client's session: its order does not move),
        or failed because this stage is leaving (the owner's order moves on)."""
        if e.failed:
            return e
        try:
            self._check_owner(e.session, owner or None)
        except SessionOwnerError as exc:
            return e.failing(exc, keep_order=False)
        try:
            self._check_staying()
        except StageLeavingError as exc:
            return e.failing(exc)
        return e

    async def _logged(self, e: Entry) -> Entry:
        """A replayed entry as this stage's logged output of the step that started at ``from_log``,
        sent on without running (module doc: Replay logs)."""
        frame = self._logs.get(e.session, {}).get(e.from_log)
        if frame is None:
            from ..errors import UnknownSessionError

            raise UnknownSessionError(f"layers {self.runner.start}–{self.runner.end - 1} hold no logged output of "
                                      f"session {e.session[:8]}… at position {e.from_log}; replay its whole history")
        return replace(e, hidden=frame, from_log=None)

    def _job(self, owner: str, e: Entry) -> Job:
        if e.failed:
            return skip(e.session, e.seq)
        return job(e.session, (e.hidden, e.position_ids, e.attention_mask), e.tree, e.keep, e.seq,
                   self.max_frame_bytes, self._owners.get(e.session, owner))

    async def forward(self, session_id: str, hidden: bytes, position_ids: bytes, attention_mask: bytes,
                      tree: bytes | None = None, keep: tuple[int, bytes] | None = None, seq: int | None = None,
                      owner: str | None = None) -> tuple[bytes, tuple]:
        """One step of one session on this stage alone, answered to the caller: (output frame,
        ((compute seconds, output frame bytes),)). The same path as every step (:meth:`accept`),
        with the caller as its end; a failure raises its typed error."""
        left = asyncio.get_running_loop().create_future()
        entry = Entry(session_id, hidden, position_ids, attention_mask, seq, tree, keep)
        self.accept(Step(0, owner or "", "", (StageRef(self.address, "", self.runner.start, self.runner.end),),
                         (entry,)), reply=left.set_result)
        (out,) = (await left).entries
        if out.failed:
            raise out.error
        return out.hidden, out.computes

    async def _run_batch(self, batch: list[Job]) -> list:
        if self._inline(batch):
            return self._compute_jobs(batch)  # on the loop: the thread is idle, so nothing else touches the span
        return await self._run(self._compute_jobs, batch)

    def _inline(self, batch: list[Job]) -> bool:
        return (self.inline_decode and self._on_thread == 0 and self.runner.streamer is None
                and all(j.tokens <= 1 and j.tree is None for j in batch) and sum(j.rows for j in batch) <= INLINE_ROWS)

    def _compute(self, j: Job):
        hidden, position_ids, attention_mask = j.frames
        h = transport.decode(hidden, self.max_frame_bytes)
        pos = transport.decode(position_ids, self.max_frame_bytes)
        mask = transport.decode(attention_mask, self.max_frame_bytes)
        parents = None if j.tree is None else transport.decode(j.tree, self.max_frame_bytes)
        t0 = time.perf_counter()
        if j.keep is not None:  # the accepted path of the previous tree step, before this step runs
            self.runner.keep_path(j.session_id, j.keep[0], transport.decode(j.keep[1], self.max_frame_bytes))
        start = self._start(j.session_id)
        out = self.runner.forward(j.session_id, h, pos, mask, parents)
        compute_s = time.perf_counter() - t0
        return self._log(j.session_id, start, self._encode(out)), compute_s

    def _start(self, session_id: str) -> int | None:
        """Where a step of a logged session starts (its KV length now)."""
        s = self.runner.sessions.get(session_id) if session_id in self._logs else None
        return None if s is None else s.length

    def _log(self, session_id: str, start: int | None, frame: bytes) -> bytes:
        log = self._logs.get(session_id)
        if log is not None and start is not None:
            log[start] = frame
        return frame

    def _encode(self, out: torch.Tensor) -> bytes:
        return transport.encode(out, self.out_policy.codec_for(out.numel() * out.element_size()))

    def _compute_jobs(self, batch: list[Job]) -> list:
        """On the private thread: each job's (output frame, compute seconds), or its exception."""
        if len(batch) == 1:
            j = batch[0]
            if j.skip:
                return [(b"", 0.0)]
            try:
                return [self._compute(j)]
            except Exception as exc:  # noqa: BLE001 — raised to this step's caller
                return [exc]
        steps, results = [], [None] * len(batch)
        for i, j in enumerate(batch):
            try:
                steps.append((i, (j.session_id, *(transport.decode(f, self.max_frame_bytes) for f in j.frames))))
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        starts = [self._start(st[0]) for _, st in steps]
        t0 = time.perf_counter()
        outs = forward_many(self.runner, [st for _, st in steps])
        compute_s = time.perf_counter() - t0
        for (i, st), start, out in zip(steps, starts, outs):
            results[i] = out if isinstance(out, BaseException) else (self._log(st[0], start, self._encode(out)),
                                                                      compute_s)
        return results

    async def speed(self, repeats: int = 5) -> float:
        """Seconds per layer of a one-row decode step here, measured now on a throwaway session
        (``timed_s``, as the profiler times a worker): what the swarm weighs this lender's span by
        (``plan/swarm.py``)."""
        def run():
            r, sid = self.runner, f"speed-probe-{id(self)}"
            r.open(sid, 1, 1)
            one = torch.ones(1, 1, dtype=torch.long)

            def step():
                r.forward(sid, torch.zeros(1, 1, r.hidden_size, dtype=r.dtype), one - 1, one)
                r.rollback(sid, 0)
            try:
                return timed_s(step, repeats, min_batch_s=0) / (r.end - r.start)
            finally:
                r.close(sid)
        return await self._run(run)

    async def info(self) -> dict:
        info = await self._run(self.runner.info)
        return {**info, "micro_batch": self.micro_batch, "merge": self.merge, "queued": len(self.queue),
                "steps": self.queue.steps, "forwards": self.queue.forwards, "at_once": self.queue.at_once}


def _this_worker():
    """The Dask worker this runs in (None outside one: tests of the class itself)."""
    from distributed import get_worker

    try:
        return get_worker()
    except ValueError:
        return None


def begin_leaving(worker) -> list[StageActor]:
    """This worker process is leaving: every stage it hosts refuses new steps and sessions
    (:class:`StageLeavingError`), and no new stage loads here. Returns the stages."""
    StageWire.of(worker).leaving = True
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

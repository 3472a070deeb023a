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

Batching (``micro_batch``, ``merge``): steps wait in one queue and run one batch at a time on the
private thread. Plain steps of different sessions with the same number of new positions that are
waiting together run as one forward of at most ``micro_batch`` rows (``model/merge.py``: the
layers run once on the stacked rows, attention per session against its own cache). Decode steps
and long steps (prefill chunks) take turns: after a long step, the decode steps waiting go first,
so a long prompt, sent in chunks, never stalls other sessions' decoding for its whole length.
Between clients (sessions' owners), the least-served client's steps go first (``fairness.py``).
``merge=False`` runs one step at a time in arrival order (the Petals-style server).

Order within a session: a step may carry ``seq``, its index among the session's steps. Chunks of
one prompt are sent without waiting for each other and may overtake each other between stages;
a stage runs a session's step ``seq`` only after ``seq - 1``. A step that fails on a stage is
passed on as a skip (:meth:`skip`), so the stages after it do not wait for it.

Every tensor is a frame (``bytes``) decoded here; every error raised is a typed
:mod:`bloombee_nb.errors` exception that reaches the caller with its type, and leaves every
other session on this stage untouched.

Swarm (``cluster/swarm.py``): a hosted stage serves many clients, each routing its own chain
through the swarm's replicas, so "the next stage" is per session: ``open_session(route=...)``
gives each session its :class:`Route`; a stage without one uses the chain-wide ``set_next``. A
session is bound to the client that opened it (``owner``): only that client may send it steps,
close it, roll it back or keep a path of it, and the stage never tells anyone its id.

Leaving: when its worker is asked to leave (``bloombee-nb worker`` gets SIGTERM,
:func:`begin_leaving`), a stage answers new steps and sessions with :class:`StageLeavingError`
— its clients replay their sessions elsewhere — and still closes sessions and answers pings, so
the worker can exit once no session is left on it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .. import transport
from ..errors import BloombeeError, SessionOwnerError, StageHungError, StageLeavingError, StageUnavailableError
from ..model.merge import forward_many
from ..model.span import SpanRunner
from ..transport.emulation import hold
from .fairness import FairShare
from .policy import check_allowed


#: Set in a worker process that is leaving: no new stage loads there.
_LEAVING = False
#: The session id under which the last stage keeps a group's outputs (:meth:`StageActor.forward_group`).
GROUP = "\x00group"


@dataclass(eq=False)
class _Job:
    """One step waiting in a stage's queue."""

    session_id: str
    frames: tuple                 # (hidden, position_ids, attention_mask) frames
    tree: bytes | None
    keep: tuple | None
    seq: int | None               # index among the session's steps (None: no order to keep)
    rows: int                     # batch rows (from the hidden frame's header; 0 if unreadable)
    tokens: int                   # new positions per row
    done: asyncio.Future = field(repr=False, default=None)
    skip: bool = False            # only advances the session's order (a step that failed upstream)

    @property
    def plain(self) -> bool:
        return self.tree is None and self.keep is None and self.rows > 0 and not self.skip


@dataclass(frozen=True)
class Route:
    """Where one session's output goes from this stage, in chain relay."""

    next: object | None = None      # the next stage's actor handle (None: this stage is the session's last)
    last: object | None = None      # the session's last stage: where failures are reported
    next_worker: str | None = None  # the next stage's worker address (named in errors)
    unavailable: str = ""           # what to say when the next stage cannot be reached


class StageActor:
    def __init__(self, path: str, start: int, end: int, dtype: str | None = None, num_threads: int = 1,
                 max_kv_bytes: int | None = None, max_sessions: int | None = None,
                 allow_unverified_architecture: bool = False, weight_offload: float = 0.0, kv_offload: float = 0.0,
                 micro_batch: int | None = None, merge: bool = True, device: str | None = None,
                 quantize: str | None = None):  # quantized spans (issue 19): passed to SpanRunner unchanged
        self.address = _worker_address()
        check_allowed(path)
        if _LEAVING:
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
        self._chain_route = Route()                 # chain mode: where every session's output goes (set_next)
        self._routes: dict[str, Route] = {}         # session -> its own route (swarm clients)
        self._owners: dict[str, str] = {}           # session -> the client that opened it
        self._sending: set[asyncio.Task] = set()  # outputs on their way to the next stage
        self.out_policy = transport.CodecPolicy()  # which codec this stage's outgoing frames use, by size
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bloombee-stage")
        self._outputs: dict[tuple[str, int], asyncio.Future] = {}  # last stage: outputs awaiting collect()
        self.micro_batch, self.merge = None, True
        self.set_batching(micro_batch, merge)
        self._queue: list[_Job] = []               # steps waiting to run (module doc: Batching)
        self._pump: asyncio.Task | None = None     # the coroutine running them
        self._after_long = False                   # the last batch was a long step: decode steps go next
        self._next_seq: dict[str, int] = {}        # session -> seq of its next step
        self.fair = FairShare()                    # each client's share of this stage (fairness.py)
        self.merged_steps = self.batches = 0       # counters (info): steps run, forwards they took

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def set_next(self, actor, unavailable_message: str, last=None, next_worker: str | None = None) -> None:
        """Chain mode: where this stage's output goes (``next_worker``: its address), what to say if it
        cannot get there, and the last stage (where failures are reported)."""
        self._chain_route = Route(actor, last, next_worker, unavailable_message)

    def set_batching(self, micro_batch: int | None = None, merge: bool = True) -> None:
        """At most ``micro_batch`` rows per forward (None: no limit); ``merge=False`` runs every step alone."""
        if micro_batch is not None and int(micro_batch) < 1:
            raise ValueError(f"micro_batch must be a positive number of rows or None, got {micro_batch}")
        self.micro_batch, self.merge = (None if micro_batch is None else int(micro_batch)), bool(merge)

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

    async def open_session(self, session_id: str, batch: int, max_length: int, route: Route | None = None,
                           owner: str | None = None) -> None:
        """Reserve a session's KV; ``route``: where its outputs go (else the chain-wide next stage);
        ``owner``: the client that may later close it, roll it back or keep its paths. Its owner
        opening it again (a swarm client re-routed after losing another stage, replaying its
        history) starts it afresh."""
        self._check_staying()
        if owner is not None and session_id in self.runner.sessions and self._owners.get(session_id) == owner:
            await self.close_session(session_id, owner)
        await self._run(self.runner.open, session_id, batch, max_length)
        self._next_seq[session_id] = 0
        if route is not None:
            self._routes[session_id] = route
        if owner is not None:
            self._owners[session_id] = owner

    def _route(self, session_id: str) -> Route:
        return self._routes.get(session_id, self._chain_route)

    def _owner_error(self, session_id: str, owner: str | None) -> SessionOwnerError | None:
        try:
            self._check_owner(session_id, owner)
        except SessionOwnerError as exc:
            return exc
        return None

    def _check_owner(self, session_id: str, owner: str | None) -> None:
        held = self._owners.get(session_id)
        if held is not None and owner != held:
            raise SessionOwnerError(f"session {session_id[:8]}… on layers {self.runner.start}–{self.runner.end - 1} "
                                    "belongs to another client; a client can only use its own sessions")

    def sessions_by_owner(self) -> dict[str, int]:
        """owner -> open sessions here (sessions opened without an owner count under "")."""
        out: dict[str, int] = {}
        for sid in list(self.runner.sessions):
            owner = self._owners.get(sid, "")
            out[owner] = out.get(owner, 0) + 1
        return out

    async def ping(self) -> dict:
        """Answered on the worker's event loop, even while a step computes: alive, leaving, sessions."""
        return {"leaving": self.leaving, "sessions": len(self.runner.sessions), "queued": len(self._queue),
                "clients": len(set(self._owners.values()))}

    def _check_staying(self) -> None:
        if self.leaving:
            raise StageLeavingError(f"the worker {self.address} hosting layers {self.runner.start}–"
                                    f"{self.runner.end - 1} is leaving the cluster; the session moves to other "
                                    "workers", workers=(self.address,))

    async def close_session(self, session_id: str, owner: str | None = None) -> None:
        self._check_owner(session_id, owner)
        for key in [k for k in self._outputs if k[0] == session_id]:
            self._outputs.pop(key).cancel()
        await self._run(self.runner.close, session_id)
        self._next_seq.pop(session_id, None)
        self._routes.pop(session_id, None)
        self._owners.pop(session_id, None)

    async def rollback(self, session_id: str, length: int, owner: str | None = None) -> None:
        self._check_owner(session_id, owner)
        await self._run(self.runner.rollback, session_id, length)

    async def keep_path(self, session_id: str, past_len: int, keep: list, owner: str | None = None) -> None:
        """Speculation: keep only the accepted path of the last tree step (see ``SpanRunner.keep_path``)."""
        self._check_owner(session_id, owner)
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
                      keep: tuple[int, bytes] | None = None, seq: int | None = None,
                      owner: str | None = None) -> tuple[bytes | None, tuple]:
        """One step of one session. Star: returns (output frame, ((compute seconds, output frame
        bytes) of each stage so far)).

        Chain: returns (None, …) as soon as this stage has computed and sent its output on; an
        error here or downstream reaches the client through the last stage's ``collect``.

        ``tree`` (a frame of int64 parents ``[T]``) makes the step a token tree; ``keep``
        (``past_len``, a frame of int64 ``[B, K]`` paths) first keeps the accepted path of the last
        tree step (see :meth:`SpanRunner.keep_path`). ``seq``: the step's index among the session's
        steps; it runs after step ``seq - 1`` (module doc). ``owner``: the client sending it, which
        must be the one that opened the session.
        """
        try:
            self._check_staying()
            self._check_owner(session_id, owner)
            out, compute_s = await self._submit(_job(session_id, (hidden, position_ids, attention_mask), tree, keep,
                                                      seq, self.max_frame_bytes))
        except SessionOwnerError:
            raise  # to the sender only: reporting it would reach the owner's collect, skipping its order
        except BaseException as exc:
            if step is not None:
                await self._report(session_id, step, exc)
                if seq is not None and self._route(session_id).next is not None:
                    self._spawn(self._skip_on(session_id, seq))
            raise
        computes = (*computes, (compute_s, len(out)))
        if step is None:
            await hold(len(out))  # emulated link out of this worker (benchmarks only)
            return out, computes
        if self._route(session_id).next is None:
            await hold(len(out))
            self._output(session_id, step).set_result((out, computes))
            return None, computes
        self._spawn(self._send_on(session_id, out, position_ids, attention_mask, step, computes, tree, keep, seq,
                                  owner))
        return None, computes

    async def forward_group(self, entries: list, step: int, owner: str | None = None) -> None:
        """Chain mode: the steps of several sessions travelling as one message — a micro-batch of the
        client's concurrent sessions. ``entries``: ``[session_id, hidden frame, position_ids frame,
        attention_mask frame, seq, computes]`` each; they join the queue together (and so run as one
        forward where they can), and travel on together. An entry that failed on an earlier stage
        holds its exception instead of a frame: it is skipped here (its session's order moves on)
        and delivered with the others by the last stage's :meth:`collect` of ``(GROUP, step)``."""
        try:
            self._check_staying()
        except StageLeavingError as exc:
            entries = [[sid, exc, pos, mask, seq, c] for sid, _, pos, mask, seq, c in entries]
        entries = [[sid, self._owner_error(sid, owner) or hidden, pos, mask, seq, c]
                   for sid, hidden, pos, mask, seq, c in entries]
        jobs = [_Job(sid, (), None, None, None if isinstance(hidden, SessionOwnerError) else seq, 0, 0, skip=True)
                if isinstance(hidden, BaseException)
                else _job(sid, (hidden, pos, mask), None, None, seq, self.max_frame_bytes)
                for sid, hidden, pos, mask, seq, _ in entries]
        results = await asyncio.gather(*(self._submit(j) for j in jobs), return_exceptions=True)
        out = []
        for (sid, hidden, pos, mask, seq, computes), job, res in zip(entries, jobs, results):
            if job.skip:
                out.append([sid, hidden, pos, mask, seq, computes])
            elif isinstance(res, BaseException):
                out.append([sid, res, pos, mask, seq, computes])
            else:
                out.append([sid, res[0], pos, mask, seq, (*computes, (res[1], len(res[0])))])
        if self._chain_route.next is None:
            await hold(sum(len(e[1]) for e in out if isinstance(e[1], bytes)))
            self._output(GROUP, step).set_result(out)
        else:
            self._spawn(self._send_group(out, step, owner))

    async def _send_group(self, entries: list, step: int, owner: str | None = None) -> None:
        try:
            await hold(sum(len(e[1]) + len(e[2]) + len(e[3]) for e in entries if isinstance(e[1], bytes)))
            await self._chain_route.next.forward_group(entries, step, owner)
        except BloombeeError as exc:
            await self._report(GROUP, step, exc)  # e.g. the next stage is leaving: every entry fails with it
        except (OSError, RuntimeError, TimeoutError) as exc:  # the next worker is gone
            await self._report(GROUP, step, self._next_gone(self._route(GROUP), exc))

    async def set_seq(self, session_id: str, seq: int) -> None:
        """The client's count of the session's steps, after a step that failed somewhere: stages that
        never saw it stop waiting for it (answered at once, not queued)."""
        if session_id in self._next_seq:
            self._next_seq[session_id] = int(seq)
            self._start_pump()

    async def skip(self, session_id: str, seq: int) -> None:
        """Step ``seq`` of the session failed before it got here: stop waiting for it, and tell the
        stages after this one."""
        await self._submit(_Job(session_id, (), None, None, seq, 0, 0, skip=True))
        if self._route(session_id).next is not None:
            await self._skip_on(session_id, seq)

    async def _skip_on(self, session_id: str, seq: int) -> None:
        try:
            await self._route(session_id).next.skip(session_id, seq)
        except (BloombeeError, OSError, RuntimeError, TimeoutError):
            pass  # the next stage is gone: its sessions recover elsewhere anyway

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    # ---- the queue ----------------------------------------------------------------------------
    async def _submit(self, job: _Job):
        """Queue ``job``; returns its (output frame, compute seconds) once a batch ran it."""
        job.done = asyncio.get_running_loop().create_future()
        self._queue.append(job)
        self._start_pump()
        return await job.done

    def _start_pump(self) -> None:
        """Run the queue's ready steps, unless the coroutine doing so is already running."""
        if self._queue and (self._pump is None or self._pump.done()):
            self._pump = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """Run batches while steps are ready (a step waiting for its session's earlier step is not)."""
        while batch := self._next_batch():
            try:
                results = await self._run(self._compute_jobs, batch)
            except BaseException as exc:  # noqa: BLE001 — the thread itself failed: every step of the batch fails
                results = [exc] * len(batch)
            self.batches += 1
            self.merged_steps += len(batch)
            for job, res in zip(batch, results):
                if job.seq is not None and job.session_id in self._next_seq:
                    self._next_seq[job.session_id] = max(self._next_seq[job.session_id], job.seq + 1)
                if not job.done.done():
                    job.done.set_exception(res) if isinstance(res, BaseException) else job.done.set_result(res)

    def _owner_of(self, job: _Job) -> str:
        return self._owners.get(job.session_id, "")

    def _ready(self, job: _Job) -> bool:
        want = self._next_seq.get(job.session_id)
        return job.seq is None or want is None or job.seq <= want

    def _next_batch(self) -> list[_Job]:
        """The steps to run next (module doc: Batching), taken out of the queue; the least-served
        client's steps first (``fairness.py``)."""
        ready = [j for j in self._queue if self._ready(j)]
        if not ready:
            return []
        ready = self.fair.order(ready, self._owner_of)
        first = ready[0]
        if self.merge and first.plain:
            decode = [j for j in ready if j.plain and j.tokens == 1]
            if decode and (first.tokens == 1 or self._after_long):
                first = decode[0]  # decode steps waiting behind a long one go first, once after each long step
            batch, rows, sessions = [], 0, set()
            for j in ready:
                if (j.plain and j.tokens == first.tokens and j.session_id not in sessions
                        and (not batch or self.micro_batch is None or rows + j.rows <= self.micro_batch)):
                    batch.append(j)
                    rows += j.rows
                    sessions.add(j.session_id)
        else:
            batch = [first]
        self._after_long = batch[0].tokens > 1
        for j in batch:
            self.fair.charge(self._owner_of(j), max(j.rows, 1) * max(j.tokens, 1))
        taken = set(map(id, batch))
        self._queue = [j for j in self._queue if id(j) not in taken]
        return batch

    def _compute_jobs(self, batch: list[_Job]) -> list:
        """On the private thread: each job's (output frame, compute seconds), or its exception."""
        if len(batch) == 1:
            job = batch[0]
            if job.skip:
                return [(b"", 0.0)]
            try:
                return [self._compute(job.session_id, *job.frames, job.tree, job.keep)]
            except Exception as exc:  # noqa: BLE001 — raised to this step's caller
                return [exc]
        steps, results = [], [None] * len(batch)
        for i, job in enumerate(batch):
            try:
                steps.append((i, (job.session_id, *(transport.decode(f, self.max_frame_bytes) for f in job.frames))))
            except Exception as exc:  # noqa: BLE001
                results[i] = exc
        t0 = time.perf_counter()
        outs = forward_many(self.runner, [st for _, st in steps])
        compute_s = time.perf_counter() - t0
        for (i, _), out in zip(steps, outs):
            results[i] = out if isinstance(out, BaseException) else (
                transport.encode(out, self.out_policy.codec_for(out.numel() * out.element_size())), compute_s)
        return results

    async def _send_on(self, session_id, out, position_ids, attention_mask, step, computes, tree=None,
                       keep=None, seq=None, owner=None) -> None:
        try:
            await hold(len(out) + len(position_ids) + len(attention_mask) + extra_nbytes(tree, keep))
            route = self._route(session_id)
            await route.next.forward(session_id, out, position_ids, attention_mask, step, computes, tree, keep, seq,
                                     owner)
        except BloombeeError:
            pass  # the stage that raised it has reported it to the last stage
        except (OSError, RuntimeError, TimeoutError) as exc:  # the next worker is gone
            await self._report(session_id, step, self._next_gone(self._route(session_id), exc))

    @staticmethod
    def _next_gone(route: Route, exc: BaseException) -> StageUnavailableError:
        """What the client gets when this stage's output cannot reach the next stage."""
        named = (route.next_worker,) if route.next_worker else ()
        return StageUnavailableError(f"{route.unavailable} [{type(exc).__name__}: {exc}]", workers=named)

    async def _report(self, session_id: str, step: int, exc: BaseException) -> None:
        """Chain mode: make the client's ``collect`` of ``step`` raise ``exc``."""
        route = self._route(session_id)
        if route.next is None:
            await self.fail(session_id, step, exc)
        elif route.last is not None:
            try:
                await route.last.fail(session_id, step, exc)
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
        info = await self._run(self.runner.info)
        return {**info, "micro_batch": self.micro_batch, "merge": self.merge, "queued": len(self._queue),
                "steps": self.merged_steps, "forwards": self.batches}


def _job(session_id: str, frames: tuple, tree, keep, seq, max_bytes: int) -> _Job:
    """A queued step; its rows and new positions come from the hidden frame's header (an
    unreadable header makes a job that runs alone and fails with the frame's typed error)."""
    try:
        shape = transport.frame.read_header(frames[0], max_bytes).shape
        rows, tokens = (shape[0], shape[1]) if len(shape) == 3 else (0, 0)
    except Exception:  # noqa: BLE001 — reported when the step runs
        rows, tokens = 0, 0
    return _Job(session_id, frames, tree, keep, seq, rows, tokens)


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

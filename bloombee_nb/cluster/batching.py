"""A stage's queue: which waiting steps run next, and which run together as one forward.

Steps wait in one queue and run one batch at a time. Plain steps of different sessions with the
same number of new positions that are waiting together run as one forward of at most
``micro_batch`` rows (``model/merge.py``: the layers run once on the stacked rows, attention per
session against its own cache) — whichever clients sent them. Decode steps and long steps (prefill
chunks) take turns: after a long step, the decode steps waiting go first, so a long prompt, sent in
chunks, never stalls other sessions' decoding for its whole length. Between clients (sessions'
owners), the least-served client's steps go first (``fairness.py``). ``merge=False`` runs one step
at a time in arrival order (the Petals-style server).

Order within a session: a step may carry ``seq``, its index among the session's steps. Chunks of
one prompt are sent without waiting for each other and may overtake each other between stages; a
session's step ``seq`` runs only after ``seq - 1``. A step that failed upstream arrives as a skip:
it runs nothing and only moves its session's order on.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .. import transport
from .fairness import FairShare


@dataclass(eq=False)
class Job:
    """One step of one session waiting in a stage's queue."""

    session_id: str
    frames: tuple                 # (hidden, position_ids, attention_mask) frames
    tree: bytes | None
    keep: tuple | None
    seq: int | None               # index among the session's steps (None: no order to keep)
    rows: int                     # batch rows (from the hidden frame's header; 0 if unreadable)
    tokens: int                   # new positions per row
    owner: str = ""               # the client the session belongs to (fair share)
    skip: bool = False            # only advances the session's order (a step that failed upstream)
    done: asyncio.Future = field(repr=False, default=None)

    @property
    def plain(self) -> bool:
        return self.tree is None and self.keep is None and self.rows > 0 and not self.skip


def job(session_id: str, frames: tuple, tree, keep, seq, max_bytes: int, owner: str = "") -> Job:
    """A queued step; its rows and new positions come from the hidden frame's header (an
    unreadable header makes a job that runs alone and fails with the frame's typed error)."""
    try:
        shape = transport.frame.read_header(frames[0], max_bytes).shape
        rows, tokens = (shape[0], shape[1]) if len(shape) == 3 else (0, 0)
    except Exception:  # noqa: BLE001 — reported when the step runs
        rows, tokens = 0, 0
    return Job(session_id, frames, tree, keep, seq, rows, tokens, owner)


def skip(session_id: str, seq: int | None) -> Job:
    return Job(session_id, (), None, None, seq, 0, 0, skip=True)


class StageQueue:
    """Steps waiting on one stage, run in batches by ``run_batch(jobs) -> [result or exception]``
    (called on the event loop; it hands the work to the stage's thread)."""

    def __init__(self, run_batch, micro_batch: int | None = None, merge: bool = True):
        self.run_batch = run_batch
        self.micro_batch, self.merge = micro_batch, merge
        self.jobs: list[Job] = []
        self.next_seq: dict[str, int] = {}        # session -> seq of its next step
        self.fair = FairShare()                    # each client's share of this stage (fairness.py)
        self._pump: asyncio.Task | None = None     # the coroutine running batches
        self._after_long = False                   # the last batch was a long step: decode steps go next
        self.steps = self.forwards = 0             # counters (info): steps run, forwards they took
        self.at_once = 0                           # steps that ran without queueing (take_now)

    def __len__(self) -> int:
        return len(self.jobs)

    async def submit(self, job: Job):
        """Queue ``job``; returns its result once a batch ran it (or raises its exception)."""
        job.done = asyncio.get_running_loop().create_future()
        self.jobs.append(job)
        self.start()
        return await job.done

    def start(self) -> None:
        """Run the ready steps, unless the coroutine doing so is already running."""
        if self.jobs and (self._pump is None or self._pump.done()):
            self._pump = asyncio.ensure_future(self._drain())

    def set_seq(self, session_id: str, seq: int) -> None:
        if session_id in self.next_seq:
            self.next_seq[session_id] = int(seq)
            self.start()

    async def _drain(self) -> None:
        while batch := self.next_batch():
            try:
                results = await self.run_batch(batch)
            except BaseException as exc:  # noqa: BLE001 — the thread itself failed: every step of the batch fails
                results = [exc] * len(batch)
            self.ran(batch)
            for j, res in zip(batch, results):
                if not j.done.done():
                    j.done.set_exception(res) if isinstance(res, BaseException) else j.done.set_result(res)

    def take_now(self, job: Job) -> bool:
        """Whether ``job`` may run at once, without queueing: nothing waits or runs and its turn in
        its session has come (the caller runs it, then calls :meth:`ran`). A lone decode step skips
        the queue's task hops this way (``stage.py``: latency)."""
        if self.jobs or (self._pump is not None and not self._pump.done()) or not self._ready(job):
            return False
        self._taking([job])
        self.at_once += 1
        return True

    def _taking(self, batch: list[Job]) -> None:
        """``batch`` runs next: whether decode steps go first after it, and its clients' charge."""
        self._after_long = batch[0].tokens > 1
        for j in batch:
            self.fair.charge(j.owner, max(j.rows, 1) * max(j.tokens, 1))

    def ran(self, batch: list[Job]) -> None:
        """``batch`` ran (one forward): count it and move its sessions' order on."""
        self.forwards += 1
        self.steps += len(batch)
        for j in batch:
            if j.seq is not None and j.session_id in self.next_seq:
                self.next_seq[j.session_id] = max(self.next_seq[j.session_id], j.seq + 1)

    def _ready(self, j: Job) -> bool:
        want = self.next_seq.get(j.session_id)
        return j.seq is None or want is None or j.seq <= want

    def next_batch(self) -> list[Job]:
        """The steps to run next (module doc), taken out of the queue."""
        ready = [j for j in self.jobs if self._ready(j)]
        if not ready:
            return []
        ready = self.fair.order(ready, lambda j: j.owner)
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
        self._taking(batch)
        taken = set(map(id, batch))
        self.jobs = [j for j in self.jobs if id(j) not in taken]
        return batch

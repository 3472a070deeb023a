"""A session's history and its recovery: what ``InferenceSession`` replays when a stage is lost.

The history (``SentCall``) is every call that changed the stages' KV caches, as sent (see
``session.py``'s module doc for what it holds and how its memory is bounded). When a call fails with
:class:`~bloombee_nb.errors.StageUnavailableError`, the session asks its model for a chain of live
workers and replays:

- **everything**, on every stage of the new chain (opened afresh there): a private model's
  re-placed spans, or whenever the rest does not apply;
- **only the new stages' part** (a *splice*): a swarm client re-routed around a lost replica keeps
  the stages that held the session; only the stages new to its route replay the history, their
  input being the logged outputs of the stage before them (``cluster/stage.py``: Replay logs) or,
  from stage 0, the history's own hidden states. The kept stages drop what the failed step left on
  them (and, with a kept path waiting, go back to before its tree step, which then goes through
  every stage again). Then every stage continues the session's count of steps.

Another loss while replaying starts over, replaying everything, up to ``MAX_RECOVERIES`` times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..cluster.protocol import StageSessions, splice
from ..errors import BloombeeError, StageUnavailableError
from .recovery import RecoveryEvent, spans_of

#: Recoveries one call may go through before its StageUnavailableError reaches the caller.
MAX_RECOVERIES = 3


@dataclass(frozen=True)
class SentCall:
    """One call that changed the stages' KV caches, as sent: what a session replays after a failure."""

    kind: str    # "step" | "keep" | "rollback"
    base: int    # the first position it changed: a rollback to <= base undoes it entirely
    after: int   # positions the stages held after it
    args: tuple  # step: (hidden, position_ids, attention_mask, tree_parents, keep);
                 # keep: (past_len, keep); rollback: (length,)


class SessionHistory:
    """The history and recovery half of :class:`~bloombee_nb.generate.session.InferenceSession`
    (its ``model``, ``chain``, ``stages``, ``history``, ``length`` and kept-path state)."""

    def _record(self, kind: str, base: int, after: int, args: tuple) -> None:
        if self.model.auto_recover:
            self.history.append(SentCall(kind, base, after, _kept(args)))

    def _truncate(self, length: int) -> None:
        """After a rollback to ``length``: drop the calls it undid entirely, remember the rollback
        where a kept call reaches past it (a step is replayed whole: same shapes, same KV)."""
        while self.history and self.history[-1].base >= length:
            self.history.pop()
        if self.history and self.history[-1].after > length:
            self._record("rollback", length, length, (length,))

    def _send(self, call, step: bool = False):
        """``call(chain)`` on this session's chain; when a stage is lost, recover and send it again.
        ``step``: the call is a step (after which a splice may replay on the new stages alone)."""
        for attempt in range(MAX_RECOVERIES + 1):
            t0 = time.perf_counter()
            try:
                return call(self.chain)
            except StageUnavailableError as exc:
                if not self.model.auto_recover or attempt == MAX_RECOVERIES:
                    raise
                self._recover(exc, time.perf_counter() - t0, step)

    def _recover(self, exc: StageUnavailableError, detect_s: float, step: bool = False) -> None:
        """Move to a chain of live workers and replay the history there (another loss while
        replaying starts over, up to ``MAX_RECOVERIES`` times, replaying everything)."""
        for attempt in range(MAX_RECOVERIES):
            try:
                return self._move(exc, detect_s, partial=step and attempt == 0)
            except StageUnavailableError as again:
                if attempt == MAX_RECOVERIES - 1:
                    raise
                exc, detect_s = again, 0.0

    def _move(self, exc: StageUnavailableError, detect_s: float, partial: bool = False) -> None:
        at, t0, old = time.time(), time.perf_counter(), self.chain
        chain, lost, reused = self.model.deployment.replacement_chain(old, exc)
        self.chain, rebuild_s = chain, time.perf_counter() - t0
        new = self._splice(old, chain) if partial else None
        if self._opened_on is not None and self._opened_on is not chain:
            _close_quietly(self._opened_on, self.stages, keep=chain)
            self._opened_on = None
        t1 = time.perf_counter()
        replayed, replayed_on = 0, 0
        if new is not None:
            try:
                replayed, replayed_on = self._replay_on(new), len(new)
            except StageUnavailableError:
                raise  # the next move replays everything
            except BloombeeError:  # e.g. a stage without the log: everything then, opened afresh everywhere
                self._opened_on, new = None, None
        if new is None and self.batch is not None:
            replayed, replayed_on = self._replay(), len(chain.refs)
        names = self.model.deployment.worker_names
        event = RecoveryEvent(at, self.session_id, lost, spans_of(old.placement, names),
                              spans_of(chain.placement, names), detect_s, 0.0 if reused else rebuild_s,
                              time.perf_counter() - t1, replayed, reused, str(exc), replayed_on)
        self.recoveries.append(event)
        self.model.events.append(event)

    def _splice(self, old, chain) -> range | None:
        """The stages of ``chain`` that alone need the session's history, when the rest of it are
        the stages of ``old`` that hold the session now and log their outputs (a swarm re-route
        around a lost replica); None when the whole history must replay."""
        if (self._opened_on is not old or self.stages is None or not self._logged(old)
                or self.ragged or chain.micro_batch != old.micro_batch or chain.prefill_chunk != old.prefill_chunk
                or (self._keep is not None and self._tree_step() is None)):
            return None
        return splice(old.refs, chain.refs)

    def _logged(self, chain) -> bool:
        """Whether this session's stages on ``chain`` log their outputs: a swarm chain's, so that a lost
        stage's replica alone replays (``DeployConfig.replay_logs``)."""
        return chain.shared and self.model.auto_recover and self.model.deployment.options.replay_logs

    def _tree_step(self) -> SentCall | None:
        """With a kept path waiting for the next step: the history's last call, the tree step it
        keeps a path of (else None)."""
        last = self.history[-1] if self.history else None
        if last is None or last.kind != "step" or last.args[3] is None:
            return None
        return last if last.after - last.args[0].shape[1] == self._keep[0] else None

    def _replay_on(self, new: range) -> int:
        """The session moves to a chain whose stages outside ``new`` already hold it: those drop
        whatever the failed step left on them, the stages ``new`` open it and replay the history
        from the logged outputs of the stage before them (module doc), then every stage continues
        the session's count of steps."""
        chain, stages = self.chain, self.stages
        kept = [i for i in range(len(chain.refs)) if i not in new]
        self._opened_on = chain  # from here on a failure closes it on these stages too (the next move)
        # a kept path waiting for the next step: the failed step may have kept it on some stages and
        # not others, so every stage goes back to before the tree and the tree step is sent again
        tree = self._tree_step() if self._keep is not None else None
        history = self.history[:-1] if tree is not None else self.history
        chain.rollback(stages, self._keep[0] if tree is not None else self.length, only=kept)
        fresh = chain.open_session(self.session_id, self.batch, self.max_length, log=True, only=new)
        _resend(history,
                lambda run: chain.replay(fresh, [c.args for c in run], only=new,
                                         starts=[c.after - c.args[0].shape[1] for c in run]),
                lambda *args: chain.keep_path(fresh, *args, only=new),
                lambda *args: chain.rollback(fresh, *args, only=new))
        if tree is not None and tree.args[4] is not None:  # the path it kept of the tree before it
            chain.keep_path(fresh, *tree.args[4], only=new)
        chain.set_seqs(stages)
        if tree is not None:  # through every stage, as it was first sent, less the path kept above
            chain.replay(stages, [(*tree.args[:4], None)])
        return len(self.history)

    def _replay(self) -> int:
        """Open the session on the current chain and re-send every call of the history, in order:
        runs of steps go at once (the stages keep their order), kept paths and rollbacks alone."""
        self._open_on(self.chain)
        _resend(self.history, lambda run: self.chain.replay(self.stages, [c.args for c in run]),
                lambda *args: self.chain.keep_path(self.stages, *args),
                lambda *args: self.chain.rollback(self.stages, *args))
        return len(self.history)


def _resend(history: list[SentCall], steps, keep, rollback) -> None:
    """``history`` in order: each run of steps at once (``steps(run)``: the stages keep their
    order), kept paths (``keep(*args)``) and rollbacks (``rollback(*args)``) alone."""
    run: list[SentCall] = []
    for call in [*history, None]:
        if call is not None and call.kind == "step":
            run.append(call)
            continue
        if run:
            steps(run)
            run = []
        if call is not None:
            (keep if call.kind == "keep" else rollback)(*call.args)


def _kept(args: tuple) -> tuple:
    """The call's tensors as the history keeps them: on the CPU and never aliasing a caller's tensor."""
    def own(x):
        return x.detach().to("cpu", copy=True) if isinstance(x, torch.Tensor) else x

    return tuple((a[0], own(a[1])) if isinstance(a, tuple) else own(a) for a in args)


def _close_quietly(chain, sessions: StageSessions, keep=None) -> None:
    """Best effort: a stage that is gone or hung has nothing left to free (and is not waited for).
    A chain released since the session opened on it (the model re-placed after another session's
    failure) still reaches the hosted stages it leaves behind (``chain.left_behind``), which would
    otherwise keep the session forever (the swarm churn soak found 4); a private chain's stages went
    with it. Stages that ``keep`` (the chain the session moves to) shares are left alone: the session
    re-opens there, and a close arriving after that would undo it."""
    staying = {a.key for a in keep.actors} if keep is not None else set()
    stages = chain.reachable
    for sub in sessions.ids:
        for actor in [a for a in stages if a.key not in staying]:
            try:  # each stage on its own: a lost one (its handle raises at once) must not spare the others
                actor.close_session(sub, chain.owner)  # not awaited: fire and forget
            except (BloombeeError, OSError, RuntimeError, KeyError):
                pass

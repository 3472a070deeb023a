"""An inference session: KV caches that live on the stages, seen by transformers as a ``Cache``.

``generate()`` only ever asks a cache for its length and, for assisted generation, to ``crop``
itself; both map onto the stages (``crop`` is a rollback on every stage). Beam search would
need a KV reorder on the stages and is refused with a clear error.

Speculative decoding (``generate/speculative.py``) sends token trees with ``step(...,
tree_parents=...)`` and then :meth:`InferenceSession.keep_path`. The kept path is not a call of its
own: it rides on the next step (every stage compacts before computing), so a round costs one
traversal of the chain; :meth:`flush` sends it alone when no step follows.

Fault tolerance. A session keeps its *history*: every call that changed the stages' KV caches,
exactly as sent — each step's hidden states, position ids and attention-mask columns (with its
token tree and the kept path that rode on it), kept paths flushed alone, rollbacks. When a call
fails with :class:`~bloombee_nb.errors.StageUnavailableError` (a worker died, hung or is
leaving), the session asks its model for a chain of live workers (re-placed spans, shared by every
session of the model), opens itself there, replays the history call by call — the same shapes in
the same order, so the new stages hold bit-identical KV (on a swarm re-route, on the new stages
alone: ``replay.py``) — and sends the failed call again. Greedy
output equals an uninterrupted run's; the pause is recorded as a
:class:`~bloombee_nb.generate.recovery.RecoveryEvent` (``session.recoveries``, ``model.events``).

The history's memory is bounded by ``max_length``: a rollback drops every call whose positions it
rolled back entirely, so what is kept is one input row of ``hidden_size`` values per position the
stages hold (≤ ``max_length``), plus, with speculation, the rejected nodes of each kept tree step
(at most ``MAX_NODES`` = 96 per round, each round keeping ≥ 1 position). Plain decoding of batch B:
``B · max_length · hidden_size`` values in the model's dtype — e.g. 32 MiB for 2048 positions of a
4096-wide bf16 model. ``from_pretrained(recover=False)`` keeps no history and raises instead.
"""

from __future__ import annotations

import html
import uuid
from collections import deque

import torch
from transformers.cache_utils import Cache

from ..cluster.protocol import StageSessions
from ..cluster.trace import StepTrace
from ..errors import (BloombeeError, SessionLengthError, ShapeMismatchError, StageUnavailableError, TreeError,
                      UnknownSessionError)
from .recovery import RecoveryEvent
from .replay import SentCall, SessionHistory, _close_quietly


class InferenceSession(SessionHistory, Cache):
    """Holds a session id open on every stage of a model's chain; use it as a context manager."""

    def __init__(self, model, max_length: int):
        super().__init__(layers=[])
        self.model, self.max_length = model, int(max_length)
        self.chain = model.chain  # a session finishes on the placement it was opened on (replan)
        self.session_id = uuid.uuid4().hex
        self.batch: int | None = None   # fixed by the first step
        self.length = 0                 # positions held by the stages' KV caches
        self.closed = False
        self.ragged = False             # rows hold different numbers of positions (batched speculation)
        self.traces: deque[StepTrace] = deque(maxlen=4096)
        self.rounds: deque = deque(maxlen=4096)  # speculation: a RoundTrace per tree verified (speculative.py)
        self.history: list[SentCall] = []        # replayed onto live workers after a failure (module doc)
        self.recoveries: list[RecoveryEvent] = []
        self._tree: tuple[int, int] | None = None          # (past_len, nodes) of a tree step not kept yet
        self._keep: tuple[int, torch.Tensor] | None = None  # (past_len, paths [B, K]) for the next step
        self._opened_on = None                               # the chain this session is open on
        self.stages: StageSessions | None = None             # what it goes by there (ids, seqs)
        self.tree_policy = None  # speculation's TreePolicy while a speculative generate() runs on this session

    # ---- the stages' side -------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
             tree_parents: torch.Tensor | None = None) -> torch.Tensor:
        """Send ``hidden [B, T, D]`` through the chain; the stages append T positions to their KV.

        ``tree_parents [T]`` makes the T positions a token tree (follow with :meth:`keep_path`).
        """
        B, T = hidden.shape[:2]
        self._ensure_open(B)
        if self.ragged:
            raise SessionLengthError("this session's rows hold different numbers of positions after a batched "
                                     "speculative generation; open a new session for the next turn")
        if self._tree is not None:
            raise TreeError("the last step was a token tree and no path of it was kept; call keep_path() "
                            "(or rollback()) before the next step")
        if self.length + T > self.max_length:
            raise SessionLengthError(
                f"this step would hold {self.length + T} positions but the session was opened with "
                f"max_length={self.max_length}; open it with a larger max_length (prompt + new tokens)")
        args = (hidden, position_ids, attention_mask, tree_parents, self._keep)
        try:
            out, trace = self._send(lambda chain: chain.forward(self.stages, *args), step=True)
        except BloombeeError as exc:
            if not isinstance(exc, StageUnavailableError) and self._keep is None:
                self._undo()
            raise
        self._record("step", self._keep[0] if self._keep is not None else self.length, self.length + T, args)
        self._keep = None
        self._tree = None if tree_parents is None else (self.length, T)
        self.length += T
        self.traces.append(trace)
        return out

    def _undo(self) -> None:
        """After a step that failed on some stage: the stages before it appended its positions
        (and with chunks, later chunks may have run); roll every stage back to what the session holds."""
        try:
            self.chain.rollback(self.stages, self.length)
        except BloombeeError:
            pass  # the original error says what went wrong; a stage that cannot roll back is reported then

    def keep_path(self, past_len: int, keep: torch.Tensor) -> None:
        """After a tree step from ``past_len``, keep only the accepted path: ``keep [B, K]`` node
        indices, root first, -1 padded where a row accepted fewer. Sent with the next step."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        keep = keep.expand(self.batch, -1) if keep.dim() == 1 else keep
        if self._tree is None or self._tree[0] != past_len:
            raise TreeError(f"no tree step of this session started at position {past_len}; "
                            "keep_path follows step(..., tree_parents=...) with the length from before it")
        if keep.dim() != 2 or keep.shape[0] != self.batch or not 1 <= keep.shape[1] <= self._tree[1]:
            raise TreeError(f"keep must be [{self.batch}, K] node indices with 1 <= K <= {self._tree[1]}, "
                            f"got {list(keep.shape)}")
        self._keep, self._tree = (past_len, keep.clone()), None
        self.length = past_len + keep.shape[1]

    def flush(self) -> None:
        """Send a kept path that is still waiting for the next step to every stage now."""
        if self._keep is not None:
            past_len, keep = self._keep
            self._send(lambda chain: chain.keep_path(self.stages, past_len, keep))
            self._record("keep", past_len, past_len + keep.shape[1], self._keep)
            self._keep = None

    def _ensure_open(self, batch: int) -> None:
        if self.closed:
            raise UnknownSessionError(f"session {self.session_id} is closed; open a new one with model.inference_session()")
        if self.batch is None:
            self.batch = batch
            if self._opened_on is None:
                self.chain = self.model.deployment.chain_for_session()  # the model may have moved on since
            try:
                self._send(self._open_on)
            except BaseException:
                self.batch = None
                raise
        elif batch != self.batch:
            raise ShapeMismatchError(f"session was opened for batch {self.batch}, got a step of batch {batch}")

    def _open_on(self, chain) -> None:
        if self._opened_on is not chain:
            self.stages = chain.open_session(self.session_id, self.batch, self.max_length, log=self._logged(chain))
            self._opened_on = chain

    def rollback(self, length: int) -> None:
        """Keep the first ``length`` positions on every stage."""
        if self._keep is not None:
            past, keep = self._keep
            if past < length <= past + keep.shape[1]:  # keep less of the path: still no call of its own
                self._keep, self.length = (past, keep[:, :length - past]), length
                return
            if length <= past:
                self._keep = None  # what the path would keep is rolled back anyway
        self.flush()
        if self._tree is not None and length <= self._tree[0]:
            self._tree = None
        if self._tree is not None:
            raise TreeError("roll back a tree step to at most its start, or keep a path of it first")
        if length != self.length:
            self._send(lambda chain: chain.rollback(self.stages, length))
            self.length = length
            self._truncate(length)

    def close(self) -> None:
        if not self.closed and self._opened_on is not None:
            chain = self._opened_on
            try:
                chain.close_session(self.stages)
            except StageUnavailableError:
                # released before or while this close ran (another session's recovery re-placed the
                # model or re-routed): its hosted stages may live on and still hold this session
                if chain.released:
                    _close_quietly(chain, self.stages)
            except BloombeeError:
                pass  # a stage that is gone has nothing left to free
        self.closed, self.history = True, []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the transformers Cache interface ----------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # grows like a DynamicCache (the reservation is enforced by step())

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # same contract as transformers' DynamicCache
            raise ValueError("crop takes a negative number of tokens to remove")
        self.rollback(self.length + tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.batch is not None:
            raise ShapeMismatchError("cannot repeat the batch of a session that already holds tokens")

    def reorder_cache(self, beam_idx: torch.LongTensor):
        raise NotImplementedError("beam search is not supported on a distributed model; use greedy or sampling")

    def batch_select_indices(self, indices: torch.Tensor):
        raise NotImplementedError("selecting batch rows of a distributed session is not supported")

    def reset(self):
        self.rollback(0)

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        # transformers slices already-cached inputs only when some layer is not linear attention;
        # with no local layers, all([]) would say "all linear" and re-send the whole history
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    def __repr__(self):
        state = "closed" if self.closed else f"{self.length}/{self.max_length} positions"
        return f"<InferenceSession {self.session_id[:8]} {state}, batch {self.batch}>"

    def _repr_html_(self):
        moved = "".join(f"<br>⏸ {html.escape(e.describe())}" for e in self.recoveries)
        last = self.traces[-1] if self.traces else None
        step = f"{last.wall_s * 1e3:.1f} ms last step" if last else "no steps yet"
        return (f"<div><b>InferenceSession</b> <code>{self.session_id[:8]}</code> — "
                f"{html.escape(repr(self).split(' ', 2)[2][:-1])}; {step}; "
                f"{len(self.chain.placement.stages)} stages{moved}</div>")

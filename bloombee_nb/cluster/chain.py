"""The chain of stage actors a model runs through, seen from the client.

Two relays, same results:

- ``"chain"`` (default): the client sends the hidden states to the first stage, each stage
  forwards its output straight to the next, and the last stage answers the client's pending
  ``collect`` call. Per token: one traversal of the chain (N+1 one-way hops).
- ``"star"`` (Petals-style, kept for comparison): the client calls each stage in turn and relays
  every intermediate result itself. Per token: N round trips through the client.

Both are routes of one step protocol (``protocol.py``), sent by one relay (``relay.py``) over
Dask's own connections; stages run steps through one entry point (``stage.py``). Failures are
noticed within bounded time and name the worker(s) they are about
(:class:`~bloombee_nb.errors.StageUnavailableError` ``.workers``): a worker that dies closes its
connection and fails its steps at once; a hung one is found by the watchdog (``liveness.py``).

What to do about a failure (replay the session on live workers) is the session's business
(``generate/session.py``); a chain never retries by itself.

Over 400 lines because :class:`RemoteChain` is the client's one handle on a route: its sessions'
open/close/rollback, both relays, grouped steps and the calls' liveness all go through the same
actors, policies and timeouts (codecs are a mixin: ``links.py``).
"""

from __future__ import annotations

import asyncio
import time

import torch
from distributed import Client

from .. import transport
from ..errors import BloombeeError, StageUnavailableError
from .groups import Groups
from .links import LinkCodecs
from .liveness import Watchdog, awaitable, ping_stages
from .loading import gather_actors, release_now, submit_stages, unavailable
from .placement import Placement
from .protocol import Entry, StageRef, StageSessions, speculation_frames
from .relay import Relay, on_loop
from .trace import StepTrace, merge_traces

#: Seconds an actor call may take before its worker counts as gone. Dask never resolves a call
#: whose arguments fail to serialise, so every call carries a timeout.
DEFAULT_CALL_TIMEOUT_S = 120.0
#: A call that waits longer than this starts the watchdog (scheduler membership + stage pings).
DEFAULT_LIVENESS_INTERVAL_S = 1.0
#: A stage whose worker does not answer a ping for this long counts as hung.
DEFAULT_PING_TIMEOUT_S = 10.0
#: Prompts longer than this many tokens are sent in chunks of it (module doc: Batching).
DEFAULT_PREFILL_CHUNK = 256
UNDO_TIMEOUT_S = 5.0  # how long undoing a half-opened session may take

RELAYS = ("chain", "star")


class RemoteChain(LinkCodecs):
    """Actor handles for a :class:`Placement`, with calls that time out and name the lost worker."""

    def __init__(self, client: Client, placement: Placement, futures: list, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
                 relay: str = "chain", compression: str | None = None, min_compress_bytes: int = 64 << 10,
                 liveness_interval_s: float | None = DEFAULT_LIVENESS_INTERVAL_S,
                 ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S, micro_batch: int | None = None,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, group: bool = True, shared: bool = False):
        """``futures``: the stage actors' futures, or (``shared``) handles on the swarm's hosted
        stages (``cluster/swarm.py``), which other clients use too and the swarm keeps alive:
        nothing chain-wide is set on them (each session carries its own route, stages keep their
        own codecs) and steps travel one session at a time (no group)."""
        if relay not in RELAYS:
            raise ValueError(f"relay must be one of {RELAYS}, got {relay!r}")
        self.client, self.placement, self.timeout_s, self.relay = client, placement, timeout_s, relay
        self.liveness_interval_s, self.ping_timeout_s = liveness_interval_s, ping_timeout_s
        self.released, self.shared = False, shared
        self.retired = False     # no new sessions open here: released when the last open one closes
        self._open: set[str] = set()  # the sessions open here (only how many matters: retire())
        self.left_behind: list = []  # after release: the hosted stages' handles (swarm chains only)
        self.owner = client.id   # the stages bind this client's sessions to it
        self._futures = [] if shared else futures  # an actor lives as long as its future is held
        self.actors = list(futures) if shared else gather_actors(client, futures, placement.stages)
        self.refs = tuple(StageRef(st.worker, a.key, st.start, st.end) for st, a in zip(placement.stages, self.actors))
        self._relayer = Relay(client, self.owner)
        self.watchdog = Watchdog(client, placement, lambda i: self._call(i, "ping"), liveness_interval_s,
                                 ping_timeout_s)
        self._init_codecs(compression, min_compress_bytes)  # each sender's codec per link (links.py)
        self.micro_batch, self.prefill_chunk = micro_batch, prefill_chunk
        self.group = group and not shared  # chain relay: concurrent sessions' plain steps travel together (groups.py)
        self._groups: Groups | None = None

    @classmethod
    def create(cls, client: Client, placement: Placement, path: str, timeout_s: float = DEFAULT_CALL_TIMEOUT_S,
               relay: str = "chain", compression: str | None = None,
               liveness_interval_s: float | None = DEFAULT_LIVENESS_INTERVAL_S,
               ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S, micro_batch: int | None = None,
               prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, per_stage: list[dict] | None = None,
               group: bool | None = None, **stage_kwargs) -> "RemoteChain":
        """Start one StageActor per stage, all loading in parallel, each pinned to its worker.

        ``stage_kwargs`` go to every stage, ``per_stage[i]`` (e.g. a plan's offload fractions) to
        stage i on top of them; ``micro_batch`` is both the rows a stage runs in one forward and
        the rows a batch is split into (see :meth:`forward`); ``group`` (default: the stages'
        ``merge``) sends concurrent sessions' steps together."""
        futures = submit_stages(client, placement, path, per_stage, **stage_kwargs, micro_batch=micro_batch)
        return cls(client, placement, futures, timeout_s, relay, compression,
                   liveness_interval_s=liveness_interval_s, ping_timeout_s=ping_timeout_s, micro_batch=micro_batch,
                   prefill_chunk=prefill_chunk, group=stage_kwargs.get("merge", True) if group is None else group)

    def broadcast(self, method: str, *args) -> list:
        """Call ``method`` on every stage concurrently; the first failure is raised after all answered
        (or as soon as the watchdog finds a stage's worker gone or hung)."""
        return self._gather([self._call(i, method, *args) for i in range(len(self.actors))])

    # ---- sessions -------------------------------------------------------------------------------
    def open_session(self, session_id: str, batch: int, max_length: int, log: bool = False,
                     only: range | None = None) -> StageSessions:
        """Open ``session_id`` on every stage (or the stages ``only``); with a ``micro_batch`` below
        ``batch``, as one stage session per micro-batch of rows (``<id>/<k>``). The caller holds what
        comes back and passes it to every call about the session (the chain keeps no per-session
        state). ``log``: every stage but the last keeps its outputs, for :meth:`replay` ``only``."""
        sessions = StageSessions.opened(session_id, batch, self.micro_batch)
        last = len(self.actors) - 1
        # counted as open before it is sent: a retire() meanwhile (the client's next session moving
        # to a less loaded route) must not release the chain under the calls in flight
        self._open.add(session_id)
        try:
            self._gather([self._call(i, "open_session", sub, b - a, max_length, self.owner, log and i < last)
                          for sub, a, b in sessions.parts for i in only or range(len(self.actors))])
        except BloombeeError:  # e.g. one stage is leaving: the others must not keep what they opened
            self._undo_open(sessions.ids)
            self._forget(session_id)
            raise
        return sessions

    def retire(self) -> None:
        """New sessions open on another chain now (a replan, or a swarm client's less loaded route):
        this one is released as soon as no session is open on it (:meth:`close_session`)."""
        self.retired = True
        if not self._open:
            self.release()

    def _undo_open(self, subs: list[str]) -> None:
        """Close ``subs`` wherever they opened, waited for (a close arriving after the session
        re-opened there, on the chain it moves to, would undo that), at most a few seconds. A chain
        released meanwhile still reaches the hosted stages it left behind."""
        async def close(actor, sub):
            try:
                await awaitable(actor.close_session(sub, self.owner))
            except Exception:  # noqa: BLE001 — a stage that is gone has nothing to free
                pass

        async def every():
            await asyncio.gather(*(close(a, sub) for sub in subs for a in self.reachable))
        try:
            self.client.sync(asyncio.wait_for, every(), UNDO_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError, OSError):
            pass  # a stage too slow to answer keeps it until it is lost or the session is closed again

    def close_session(self, sessions: StageSessions) -> None:
        """Close the session on every stage. On a released chain (another session's recovery re-placed
        or re-routed the model, maybe while this ran) it raises StageUnavailableError; the caller
        still holds ``sessions`` and can close them on the hosted stages left behind."""
        self._check_usable()
        self._open.discard(sessions.session_id)
        if self._groups is not None:
            for sub in sessions.ids:
                self._groups.forget(sub)
        try:
            self._gather([self._call(i, "close_session", sub, self.owner)
                          for sub in sessions.ids for i in range(len(self.actors))])
        finally:
            self._forget(sessions.session_id)

    def _forget(self, session_id: str) -> None:
        """``session_id`` is no longer open here; a retired chain goes with its last session."""
        self._open.discard(session_id)
        if self.retired and not self._open:
            self.release()

    def rollback(self, sessions: StageSessions, length: int, only=None) -> None:
        """Keep the first ``length`` positions of the session on every stage (or the stages ``only``)."""
        self._gather([self._call(i, "rollback", sub, int(length), self.owner)
                      for sub in sessions.ids for i in (range(len(self.actors)) if only is None else only)])

    def _gather(self, calls: list) -> list:
        """Await stage calls together (see :func:`_all`), watched like every call."""
        self._check_usable()
        return self.client.sync(self._watched, _all(calls))

    # ---- steps ----------------------------------------------------------------------------------
    def forward(self, sessions: StageSessions, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, tree_parents: torch.Tensor | None = None,
                keep: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, StepTrace]:
        """Run ``hidden [B, T, D]`` through every stage in order; returns the last stage's output.

        ``tree_parents [T]`` (int64) makes the step's T positions a token tree; ``keep`` =
        ``(past_len, paths [B, K])`` has every stage keep the accepted path of the previous tree step
        first (see :meth:`keep_path`), riding on this step instead of costing a round trip.

        Micro-batches: a session opened with :meth:`open_session` for more rows than
        ``micro_batch`` sends each micro-batch as its own stage session, all at once, so stage i
        works on micro-batch k while stage i+1 works on k-1. Chunks: a plain step of more than
        ``prefill_chunk`` positions goes as chunks sent without waiting for each other (each stage
        keeps their order by ``seq``), so stages pipeline a long prompt and run other sessions'
        decode steps between its chunks.

        The relays run as coroutines on the client's event loop: one thread hand-off per step
        (each hand-off costs ~0.5 ms on a busy 2-core machine).
        """
        self._check_usable()
        relays, parts, n_chunks = self._step_relays(sessions, hidden, position_ids, attention_mask, tree_parents, keep)
        T = hidden.shape[1]
        t0 = time.perf_counter()
        try:
            results = on_loop(self.client, self._watched, _all(relays) if len(relays) > 1 else _one(relays[0]))
        except StageUnavailableError:
            raise  # the chain is being left behind (recovery): nothing to put right on it
        except BaseException:
            self.set_seqs(sessions, quiet=True)
            raise
        outs = [torch.cat([transport.decode(r[0]) for r in results[p * n_chunks:(p + 1) * n_chunks]], dim=1)
                for p in range(len(parts))]
        trace = merge_traces(results, self.relay, T, hidden.numel() * hidden.element_size(),
                              time.perf_counter() - t0)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0), trace

    def replay(self, sessions: StageSessions, steps: list[tuple], only: range | None = None,
               starts: list[int] | None = None) -> None:
        """Re-send ``steps`` (each one :meth:`forward`'s arguments, as first sent) all at once: the
        stages run a session's steps in order (``seq``), so replaying a history costs about one
        traversal plus the compute instead of one traversal per step. Same shapes, same order: the
        KV is bit-identical to the first time.

        ``only`` (a run of stages ``first:last``, with ``starts``: the position each step started
        at): replay on those stages alone. Their input is the stage before them's logged output of
        each step (sent on from its log, not recomputed), or for ``first == 0`` the steps' own."""
        self._check_usable()
        if only is not None:
            relays = [r for args, start in zip(steps, starts)
                      for r in self._step_relays(sessions, *args, only=only, start=start)[0]]
        else:
            relays = [r for args in steps for r in self._step_relays(sessions, *args)[0]]
        try:
            self.client.sync(self._watched, _all(relays))
        except StageUnavailableError:
            raise
        except BaseException:
            self.set_seqs(sessions, quiet=True)
            raise

    def _step_relays(self, sessions: StageSessions, hidden, position_ids, attention_mask, tree_parents=None,
                     keep=None, only: range | None = None, start: int = 0):
        """The coroutines that send one step (its micro-batches and chunks, each with its seq), the
        session's parts, and the chunks per part; with ``only``, to those stages alone, starting
        at position ``start`` (see :meth:`replay`)."""
        T = hidden.shape[1]
        parts = sessions.parts
        c = self.prefill_chunk if tree_parents is None and self.prefill_chunk and T > self.prefill_chunk else T
        relays = []
        for sub, a, b in parts:
            for j, c0 in enumerate(range(0, T, c)):
                cols = slice(c0, min(c0 + c, T))
                k = None
                if keep is not None and j == 0:
                    paths = torch.as_tensor(keep[1], dtype=torch.long)
                    k = (keep[0], paths[a:b] if paths.dim() == 2 else paths)
                args = (hidden[a:b, cols], position_ids[a:b, cols], attention_mask[a:b, cols], tree_parents, k,
                        sessions.take_seq(sub))
                relays.append(self._relay(sub, *args) if only is None else self._relay_to(only, start + c0, sub, *args))
        return relays, parts, -(-T // c)

    def _relay_to(self, only: range, start: int, session_id, hidden, position_ids, attention_mask, tree_parents, keep,
                  seq):
        """A replayed step to the stages ``only`` alone: from the client (``only`` starts at stage 0)
        or from the log of the stage before them (``from_log``: the position the step started at)."""
        frame = b"" if only.start else transport.encode(hidden.contiguous(), self.client_policies[0].codec_for(
            hidden.numel() * hidden.element_size()))
        entry = Entry(session_id, frame, transport.encode(position_ids.contiguous()),
                      transport.encode(attention_mask.contiguous()), seq, *speculation_frames(tree_parents, keep),
                      from_log=start if only.start else None)
        return self._send(self.refs[max(0, only.start - 1):only.stop], entry)

    def set_seqs(self, sessions: StageSessions, quiet: bool = False) -> None:
        """Every stage learns how many steps of each stage session the client sent: after a failed
        step (``quiet``: best effort), a step that never reached some stage (failed before it) is
        not waited for there; after a splice, the new stages continue the session's count."""
        def calls():
            return [self._call(i, "set_seq", sub, seq) for sub, seq in sessions.next_seq.items()
                    for i in range(len(self.actors))]

        if not quiet:
            self._gather(calls())
        elif not self.released:
            try:
                self.client.sync(asyncio.wait_for, _all(calls()), self.ping_timeout_s)
            except (BloombeeError, OSError, RuntimeError, TimeoutError, asyncio.TimeoutError):
                pass  # a stage that cannot be reached has worse problems: the original error says so

    def _relay(self, session_id, hidden, position_ids, attention_mask, tree_parents, keep, seq):
        """One session's step through the chain, as a coroutine (frames encoded here, now)."""
        pos, mask = transport.encode(position_ids.contiguous()), transport.encode(attention_mask.contiguous())
        spec = speculation_frames(tree_parents, keep)
        if self.relay == "chain" and len(self.actors) > 1:
            nbytes = hidden.numel() * hidden.element_size()
            frame = transport.encode(hidden.contiguous(), self.client_policies[0].codec_for(nbytes))
            if self.group and spec == (None, None) and hidden.shape[1] == 1:  # decode steps: prompts go alone
                return self._grouped(session_id, frame, pos, mask, seq, hidden.shape[0])
            return self._relay_chain(session_id, frame, pos, mask, spec, seq)
        return self._relay_star(session_id, hidden.contiguous(), pos, mask, spec, seq)

    def keep_path(self, sessions: StageSessions, past_len: int, keep: torch.Tensor | list, only=None) -> None:
        """Every stage (or the stages ``only``) keeps only the accepted path of the session's last
        tree step (``keep [K]`` or ``[B, K]`` node indices, root first, -1 padded; see
        ``SpanRunner.keep_path``)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        calls = [self._call(i, "keep_path", sub, int(past_len), (keep[a:b] if keep.dim() == 2 else keep).tolist(),
                            self.owner)
                 for sub, a, b in sessions.parts
                 for i in (range(len(self.actors)) if only is None else only)]
        self._gather(calls)

    async def _relay_star(self, session_id: str, hidden: torch.Tensor, pos: bytes, mask: bytes, spec=(None, None),
                          seq: int | None = None):
        """Star: one hop per stage, each output back to the client, which sends it to the next."""
        self._check_usable()  # released since the step was made: no stage to loop over
        walls, computes, sent, into, back = [], [], 0, [], []
        frame = b""  # the frame in hand (stage 0 always encodes one before it is read)
        for i in range(len(self.actors)):
            t0 = time.perf_counter()
            if i == 0 or self.client_policies[i] != self.stage_policies[i - 1]:  # else relay the bytes as they are
                hidden = hidden if i == 0 else transport.decode(frame)
                frame = transport.encode(hidden, self.client_policies[i].codec_for(hidden.numel() * hidden.element_size()))
            entry = Entry(session_id, frame, pos, mask, seq, *spec)
            sent += entry.nbytes()
            into.append(len(frame))
            frame, (compute,) = await self._send((self.refs[i],), entry)
            walls.append(time.perf_counter() - t0)
            computes.append(compute)
            back.append(len(frame))
        return frame, walls, computes, sent, into + back

    async def _relay_chain(self, session_id: str, frame: bytes, pos: bytes, mask: bytes, spec=(None, None),
                           seq: int | None = None):
        """Chain: the whole route at once; the last stage's output comes back."""
        entry = Entry(session_id, frame, pos, mask, seq, *spec)
        t0 = time.perf_counter()
        out, computes = await self._send(self.refs, entry)
        return out, [time.perf_counter() - t0], list(computes), entry.nbytes(), [len(frame), *(b for _, b in computes)]

    async def _send(self, hops: tuple[StageRef, ...], entry: Entry) -> tuple[bytes, tuple]:
        """One entry along ``hops``: (output frame, computes), or its error raised."""
        (out,) = (await self._relayer.send(hops, (entry,), self.timeout_s)).entries
        if out.failed:
            raise out.error
        return out.hidden, out.computes

    async def _grouped(self, session_id: str, frame: bytes, pos: bytes, mask: bytes, seq, rows: int):
        if self._groups is None:
            self._groups = Groups(self._relay_group, self.micro_batch)
        return await self._groups.submit([session_id, frame, pos, mask, seq, ()], rows)

    async def _relay_group(self, entries: list) -> list:
        """Several sessions' steps through the chain as one step with one entry each (their stages
        run them as one forward where they can); returns each entry's ``(out, walls, computes,
        sent, hops)`` or the exception its step raised."""
        sent = [Entry(sid, frame, pos, mask, seq) for sid, frame, pos, mask, seq, _ in entries]
        t0 = time.perf_counter()
        delivery = await self._relayer.send(self.refs, tuple(sent), self.timeout_s)
        wall = time.perf_counter() - t0
        return [e.error if e.failed else
                (e.hidden, [wall], list(e.computes), s.nbytes(), [len(s.hidden), *(b for _, b in e.computes)])
                for s, e in zip(sent, delivery.entries)]

    async def _call(self, i: int, method: str, *args):
        """``method(*args)`` on stage ``i`` within ``timeout_s``; any way it cannot be reached (closed
        connection, timeout, an actor Dask says is lost) becomes a typed error naming the worker."""
        try:
            self._check_usable()  # released since the call was made (it runs later, on the event loop)
            return await asyncio.wait_for(awaitable(getattr(self.actors[i], method)(*args)), self.timeout_s)
        except BloombeeError:
            raise
        except (OSError, asyncio.TimeoutError, TimeoutError, KeyError, RuntimeError) as exc:
            raise unavailable(self.placement.stages[i], exc) from exc

    # ---- liveness -------------------------------------------------------------------------------
    async def _watched(self, call):
        return await self.watchdog.watched(call)

    def ping(self, timeout_s: float | None = None, skip=()) -> dict[str, dict | None]:
        """worker address -> its stage's :meth:`StageActor.ping` answer, ``None`` where the worker
        did not answer within ``timeout_s`` (default: ``ping_timeout_s``) or its call failed.
        Workers in ``skip`` are not pinged."""
        if self.released:
            return {}  # no stage left to ask: release dropped the actors
        timeout_s = self.ping_timeout_s if timeout_s is None else timeout_s
        return ping_stages(self.client, self.placement.workers, self.actors, timeout_s, skip)

    def info(self) -> list[dict]:
        return self.broadcast("info")

    def release(self) -> None:
        """Drop the actors: their workers free the spans' memory. Calls on a released chain raise
        :class:`StageUnavailableError` (a session on it then recovers onto its model's chain). Once:
        a recovery releases both the failed chain and the current one, often the same chain."""
        if self.released:
            return
        # our own stages' futures go now; a hosted stage's handle keeps the Future Dask binds to it on
        # first use: released, it is cancelled in this client and every later call on the handle
        # raises "Worker holding Actor was lost" — the session closes below would be skipped for good
        held = ([], []) if self.shared else (self._futures, self.actors)
        # hosted stages outlive a swarm chain: its sessions still close there (generate/replay.py: _close_quietly)
        self.left_behind = list(self.actors) if self.shared else []
        self.actors, self._futures, self.released = [], [], True
        try:
            self.client.loop.add_callback(self._relayer.close)  # the workers forget our delivery streams
        except RuntimeError:
            pass  # the client's loop is closed: so are the streams
        release_now(*held)

    @property
    def reachable(self) -> list:
        """The stage handles this chain's sessions can still be closed on: its actors, or once
        released, the hosted stages a swarm chain left behind (a private chain's went with it)."""
        return self.left_behind if self.released else list(self.actors)

    def _check_usable(self) -> None:
        if self.released:
            raise StageUnavailableError("this chain of stages was released (the model was closed, or its spans "
                                        "were re-placed after a failure); sessions move to the model's current chain")


async def _one(relay) -> list:
    """One call, as :func:`_all` returns it (no gather: a decode step is one relay)."""
    return [await relay]


async def _all(relays: list) -> list:
    """Await calls together; the first failure is raised after all finished (a recoverable one first)."""
    results = await asyncio.gather(*relays, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise next((e for e in errors if isinstance(e, StageUnavailableError)), errors[0])
    return results


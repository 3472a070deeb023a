"""The step protocol: what travels between a client and the stages, as frozen values.

One decode step of one session is a :class:`Step` with one :class:`Entry`; several sessions' steps
travelling together (a client's micro-batch) are one Step with several entries. A step carries its
own route (``hops``: the stages still to visit, each a :class:`StageRef`), so a stage needs no
per-session or chain-wide routing state: it runs the first hop's span and sends the rest on.
Star (Petals-style) and chain relays are the same protocol with different routes: star sends one
hop at a time and gets every intermediate result back, chain sends all hops at once.

What comes back to the client is a :class:`Delivery`: per entry, the output frame or the typed
error that stopped it, and the compute each stage spent. Deliveries are written by the stage
that ends the route — or by the stage that cannot send the step on (its next hop is gone).

On the wire these are plain dicts (``to_msg``/``from_msg``) inside Dask messages: tensors are
our frames (``bytes``, never pickled); only a delivered exception is pickled, by Dask, from a
worker to its client — the direction in which Dask pickles results anyway. A stage never
unpickles anything a client sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from distributed.protocol import to_serialize

from .. import transport


@dataclass(frozen=True)
class StageRef:
    """The one identity of a stage: its worker, its actor's key and the layers it runs."""

    worker: str   # Dask worker address
    key: str      # the stage actor's Dask key (how the worker finds it)
    start: int    # first layer (inclusive)
    end: int      # last layer (exclusive)

    def to_msg(self) -> list:
        return [self.worker, self.key, self.start, self.end]

    @classmethod
    def from_msg(cls, msg) -> "StageRef":
        worker, key, start, end = msg
        return cls(str(worker), str(key), int(start), int(end))

    def describe(self) -> str:
        return f"{self.worker} (layers {self.start}–{self.end - 1})"


@dataclass(frozen=True)
class Entry:
    """One session's part of a step: its frames, and where it is in the session's order."""

    session: str                        # the session's id on the stages
    hidden: bytes | None                # [B, T, D] frame; None once the entry failed (it travels as a skip)
    position_ids: bytes
    attention_mask: bytes
    seq: int | None = None              # index among the session's steps (None: no order to keep)
    tree: bytes | None = None           # speculation: the token tree's parents [T]
    keep: tuple[int, bytes] | None = None  # speculation: (past_len, accepted paths) of the last tree step
    computes: tuple = ()                # ((compute seconds, output frame bytes), ...) of the stages so far
    error: BaseException | None = field(default=None, compare=False)  # why it stopped (then hidden is None)
    from_log: int | None = None         # replay: the first hop sends on its logged output of the step that
                                        # started at this position instead of running one (hidden: b"")

    @property
    def failed(self) -> bool:
        return self.error is not None

    def done_by(self, out: bytes, compute_s: float) -> "Entry":
        """This entry after a stage ran it: its output goes on as the next stage's input."""
        return replace(self, hidden=out, computes=(*self.computes, (compute_s, len(out))))

    def failing(self, error: BaseException, keep_order: bool = True) -> "Entry":
        """This entry stopped by ``error``; it still travels (as a skip) so the stages after this one
        do not wait for its ``seq`` — unless the step was refused (``keep_order=False``: not the
        owner's step, so it must not move the owner's order)."""
        return replace(self, hidden=None, error=error, seq=self.seq if keep_order else None)

    def nbytes(self) -> int:
        """Bytes this entry adds to a message (what the link emulator holds for)."""
        return (len(self.hidden or b"") + len(self.position_ids) + len(self.attention_mask)
                + (len(self.tree) if self.tree is not None else 0) + (len(self.keep[1]) + 8 if self.keep else 0))

    def to_msg(self) -> dict:
        msg = {"s": self.session, "h": self.hidden, "p": self.position_ids, "m": self.attention_mask,
               "q": self.seq, "t": self.tree, "k": list(self.keep) if self.keep else None,
               "c": [list(c) for c in self.computes]}
        if self.from_log is not None:
            msg["l"] = self.from_log
        if self.error is not None:
            msg["e"] = to_serialize(self.error)
        return msg

    @classmethod
    def from_msg(cls, msg: dict) -> "Entry":
        keep = msg.get("k")
        return cls(str(msg["s"]), msg.get("h"), msg["p"], msg["m"], msg.get("q"), msg.get("t"),
                   (int(keep[0]), keep[1]) if keep else None, tuple((float(c), int(b)) for c, b in msg.get("c", ())),
                   _error(msg.get("e")), None if msg.get("l") is None else int(msg["l"]))


@dataclass(frozen=True)
class Step:
    """A step on its way: entries still to run on ``hops`` (the first hop runs them next)."""

    id: int                       # the client's number for this step (its delivery carries it back)
    owner: str                    # the client that sent it: the sessions' owner
    reply_to: str                 # the client's delivery stream (one per chain; see wire.py)
    hops: tuple[StageRef, ...]    # the stages still to visit, in order
    entries: tuple[Entry, ...]

    @property
    def here(self) -> StageRef:
        return self.hops[0]

    def onwards(self, entries: tuple[Entry, ...]) -> "Step":
        """The same step leaving this hop with ``entries`` (this hop's outputs) for the next."""
        return replace(self, hops=self.hops[1:], entries=entries)

    def nbytes(self) -> int:
        return sum(e.nbytes() for e in self.entries)

    def to_msg(self) -> dict:
        return {"id": self.id, "owner": self.owner, "reply_to": self.reply_to, "hops": [h.to_msg() for h in self.hops],
                "entries": [e.to_msg() for e in self.entries]}

    @classmethod
    def from_msg(cls, msg: dict) -> "Step":
        return cls(int(msg["id"]), str(msg["owner"]), str(msg["reply_to"]), tuple(StageRef.from_msg(h) for h in msg["hops"]),
                   tuple(Entry.from_msg(e) for e in msg["entries"]))


@dataclass(frozen=True)
class Delivery:
    """What reaches the client for one step: each entry's output frame or error, and its computes.

    ``error`` set: the whole step failed where it was (e.g. its next stage is gone), named by the
    stage that found out; ``entries`` then holds nothing."""

    id: int
    entries: tuple[Entry, ...] = ()
    error: BaseException | None = field(default=None, compare=False)

    def to_msg(self) -> dict:
        msg = {"op": "delivery", "id": self.id, "entries": [e.to_msg() for e in self.entries]}
        if self.error is not None:
            msg["e"] = to_serialize(self.error)
        return msg

    @classmethod
    def from_msg(cls, msg: dict) -> "Delivery":
        return cls(int(msg["id"]), tuple(Entry.from_msg(e) for e in msg.get("entries", ())), _error(msg.get("e")))


def _error(value) -> BaseException | None:
    """A delivered error as an exception (Dask deserialised it; a value it could not read is named)."""
    if value is None or isinstance(value, BaseException):
        return value
    from ..errors import BloombeeError

    return BloombeeError(f"a stage reported an error this client cannot read: {value!r}")


@dataclass
class StageSessions:
    """One client session as the stages of one chain know it, held by the session (not the chain,
    which every session of a model shares): its id on the stages per micro-batch of rows, and the
    ``seq`` its next step there carries (stages run a session's steps in that order). Made by
    ``RemoteChain.open_session``; a session that moves to another chain gets a new one there."""

    session_id: str                         # the client session's id
    parts: tuple[tuple[str, int, int], ...]  # (stage session id, rows a:b) per micro-batch
    next_seq: dict[str, int] = field(default_factory=dict)  # stage session id -> its next step's seq

    @classmethod
    def opened(cls, session_id: str, batch: int, micro_batch: int | None) -> "StageSessions":
        """A session of ``batch`` rows: one stage session, or with ``micro_batch`` below ``batch``
        one per micro-batch of rows (``<id>/<k>``), each starting at seq 0."""
        m = micro_batch or batch
        parts = tuple((session_id if batch <= m else f"{session_id}/{k}", a, min(a + m, batch))
                      for k, a in enumerate(range(0, batch, m)))
        return cls(session_id, parts, {sub: 0 for sub, _, _ in parts})

    @property
    def ids(self) -> list[str]:
        """The ids the session goes by on the stages."""
        return [sub for sub, _, _ in self.parts]

    def take_seq(self, sub: str) -> int:
        """The seq of stage session ``sub``'s next step, counted as sent."""
        seq = self.next_seq[sub]
        self.next_seq[sub] = seq + 1
        return seq


def splice(old: tuple[StageRef, ...], new: tuple[StageRef, ...]) -> range | None:
    """The stages of route ``new`` that are new against the route ``old`` it replaces, when they are
    one run ``first:last`` and every other stage is the same stage (actor and layers) in the same
    place, which already holds the sessions: ``range(first, last)``; else None."""
    p = q = 0
    while p < min(len(new), len(old)) and new[p] == old[p]:
        p += 1
    while q < min(len(new), len(old)) - p and new[-1 - q] == old[-1 - q]:
        q += 1
    return range(p, len(new) - q) if p + q < len(new) else None


def speculation_frames(tree_parents: torch.Tensor | None,
                       keep: tuple[int, torch.Tensor] | None) -> tuple[bytes | None, tuple[int, bytes] | None]:
    """A step's token tree and kept path as frames, :class:`Entry`'s ``tree`` and ``keep``
    (``(None, None)`` for a plain step)."""
    tree = None if tree_parents is None else transport.encode(tree_parents.to(torch.long).cpu().contiguous())
    if keep is not None:
        keep = (int(keep[0]), transport.encode(torch.as_tensor(keep[1], dtype=torch.long).cpu().contiguous()))
    return tree, keep

"""What a server is doing, as values the status panel and the Dask dashboard both draw.

:class:`Activity` counts (on the server's threads, under one lock); :meth:`Activity.snapshot`
freezes it into a :class:`ServeSnapshot`: requests generating and waiting, served, refused,
tokens, tokens/s over the last :data:`RATE_WINDOW_S` seconds, and the same per API key. A snapshot
travels to the Dask scheduler as a plain dict (:meth:`ServeSnapshot.to_dict`) through
``Client.log_event`` (see :mod:`.dashboard`), so it holds no objects of ours.
"""

from __future__ import annotations

import html
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field

RATE_WINDOW_S = 10.0        # tokens/s is measured over this much recent time


@dataclass(frozen=True)
class KeyCount:
    """One caller: an API key (named by its place in ``--api-key``: ``key 1``) or, without keys,
    a client address. Keys themselves never leave the server."""

    who: str
    requests: int = 0       # generation requests admitted
    tokens: int = 0         # tokens generated for it
    refused: int = 0        # 429s (rate limit or full queue)


@dataclass(frozen=True)
class ServeSnapshot:
    """One server's activity at ``at_s`` (seconds since the epoch)."""

    server: str                        # a unique id: url and process
    model: str
    url: str
    running: bool
    generating: int                    # requests generating now (sessions on the stages)
    queued: int                        # admitted, waiting for a generation slot
    served: int
    cancelled: int                     # clients that hung up mid-stream
    failed: int
    refused: int                       # 429s
    tokens: int                        # generated since the server started
    tokens_per_s: float                # over the last RATE_WINDOW_S seconds
    started_s: float
    at_s: float
    by_key: tuple[KeyCount, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ServeSnapshot":
        return cls(**{**d, "by_key": tuple(KeyCount(**k) for k in d.get("by_key", ()))})

    def text(self) -> str:
        """One line: what ``repr(server)`` and a terminal show."""
        keys = "; ".join(f"{k.who}: {k.requests} requests, {k.tokens} tokens" for k in self.by_key)
        return (f"{self.model} at {self.url} ({'running' if self.running else 'stopped'}): {self.served} served, "
                f"{self.generating} generating, {self.queued} queued, {self.cancelled} cancelled, {self.failed} "
                f"failed, {self.refused} refused (429), {self.tokens} tokens generated, "
                f"{self.tokens_per_s:.1f} tokens/s" + (f" [{keys}]" if keys else ""))

    def html(self) -> str:
        """A table row group: the server's counters, then one row per key."""
        e = html.escape
        state = "running" if self.running else "stopped"
        head = (f"<tr><td><b>{e(self.model)}</b><br><code>{e(self.url)}</code> ({state})</td>"
                + "".join(f"<td>{v}</td>" for v in (self.generating, self.queued, self.served, self.refused,
                                                       self.tokens, f"{self.tokens_per_s:.1f}")) + "</tr>")
        keys = "".join(f"<tr><td style='padding-left:2em'>{e(k.who)}</td><td colspan=2></td><td>{k.requests}</td>"
                       f"<td>{k.refused}</td><td>{k.tokens}</td><td></td></tr>" for k in self.by_key)
        return head + keys


SNAPSHOT_HEADER = ("<tr><th>server / caller</th><th>generating</th><th>queued</th><th>served (per caller: "
                   "requests)</th><th>refused (429)</th><th>tokens</th><th>tokens/s</th></tr>")


def snapshots_html(snapshots, title: str = "serving") -> str:
    """The table the status panel and the dashboard page show."""
    rows = "".join(s.html() for s in snapshots) or "<tr><td colspan=7><i>no server</i></td></tr>"
    return f"<div class='bloombee-serve'><b>{html.escape(title)}</b><table>{SNAPSHOT_HEADER}{rows}</table></div>"


@dataclass
class Activity:
    """The live counters of one server (every method is safe from any thread)."""

    started_s: float = field(default_factory=time.time)
    generating: int = 0
    served: int = 0
    cancelled: int = 0
    failed: int = 0
    refused: int = 0
    tokens: int = 0
    _keys: dict = field(default_factory=dict)         # who -> [requests, tokens, refused]
    _recent: deque = field(default_factory=deque)     # (monotonic time, tokens) of the last RATE_WINDOW_S
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admitted(self, who: str) -> None:
        with self._lock:
            self._key(who)[0] += 1

    def refuse(self, who: str) -> None:
        with self._lock:
            self.refused += 1
            self._key(who)[2] += 1

    def started(self) -> None:
        with self._lock:
            self.generating += 1

    def generated(self, who: str, n: int) -> None:
        """``n`` new tokens (called at every decode step, so tokens/s moves while requests stream)."""
        with self._lock:
            self.tokens += n
            self._key(who)[1] += n
            self._recent.append((time.monotonic(), n))

    def finished(self, result) -> None:
        """A generation ended: its ``Result``, or None if it raised."""
        with self._lock:
            self.generating -= 1
            if result is None:
                self.failed += 1
            elif result.cancelled:
                self.cancelled += 1
            else:
                self.served += 1

    def tokens_per_s(self) -> float:
        with self._lock:
            return self._rate(time.monotonic())

    def snapshot(self, *, server: str, model: str, url: str, running: bool, admitted: int) -> ServeSnapshot:
        """Frozen counters; ``admitted``: requests holding a slot or waiting for one (the admission's count)."""
        with self._lock:
            return ServeSnapshot(server, model, url, running, self.generating, max(0, admitted - self.generating),
                                 self.served, self.cancelled, self.failed, self.refused, self.tokens,
                                 self._rate(time.monotonic()), self.started_s, time.time(),
                                 tuple(KeyCount(w, *c) for w, c in self._keys.items()))

    def _key(self, who: str) -> list:
        return self._keys.setdefault(who, [0, 0, 0])

    def _rate(self, now: float) -> float:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()
        window = min(RATE_WINDOW_S, max(now - _monotonic_of(self.started_s), 1e-3))
        return sum(n for _, n in self._recent) / window


def _monotonic_of(epoch_s: float) -> float:
    """An epoch time on the monotonic clock (for a window shorter than the server's life)."""
    return time.monotonic() - (time.time() - epoch_s)

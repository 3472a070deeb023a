"""Concurrent sessions' decode steps, merged into one step through the chain (the client's
micro-batches); ``RemoteChain`` sends them with ``group=True``."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable


class Groups:
    """Concurrent sessions' decode steps, sent through the chain together (the client's micro-batches).

    Only one-position plain steps group: a prompt (or a chunk of one) travels alone, so decode
    steps never wait for a prompt's compute on the way.

    When to send: when no group is on its way — or as soon as the steps waiting fill a micro-batch
    (``micro_batch`` rows), so micro-batches follow each other through the chain. A group that
    comes back is expected to step again at once: the next group waits for its sessions (at most
    ``LINGER_S``), so the users cycle as one group instead of two alternating ones (which would
    make each wait a traversal per token). The price: a step that arrives while a group travels
    waits for it, up to one traversal. So this is the throughput setting
    (``from_pretrained(group=True)``, the default for a plan made for throughput); without it,
    steps go at once and the stages still merge what reaches them together.
    """

    LINGER_S = 0.02  # the longest the next group waits for the sessions of the one that came back

    def __init__(self, send: Callable[[list], Awaitable[list]], micro_batch: int | None):
        """``send(entries)``: one step with one entry per session (``RemoteChain._relay_group``),
        returning each entry's result or the exception its step raised."""
        self.send, self.micro_batch = send, micro_batch
        self.pending: list[tuple[list, int, asyncio.Future]] = []
        self.inflight = 0
        self.expected: set[str] = set()   # sessions of a group that came back, not stepped again yet
        self.returned_at = 0.0
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, entry: list, rows: int):
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((entry, rows, fut))
        self.expected.discard(entry[0])
        self._dispatch()
        return await fut

    def forget(self, session_id: str) -> None:
        self.expected.discard(session_id)  # closed: it will not step again

    def _ready(self, now: float) -> bool:
        m = self.micro_batch
        if m is not None and sum(r for _, r, _ in self.pending) >= m:
            return True
        return self.inflight == 0 and (not self.expected or now - self.returned_at >= self.LINGER_S)

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        m = self.micro_batch
        while self.pending and self._ready(loop.time()):
            group, rows = [], 0
            while self.pending and (not group or m is None or rows + self.pending[0][1] <= m):
                group.append(self.pending.pop(0))
                rows += group[-1][1]
            self.inflight += 1
            asyncio.ensure_future(self._send(group))
        if self.pending and self.inflight == 0:
            self._timer = loop.call_at(self.returned_at + self.LINGER_S, self._dispatch)

    async def _send(self, group: list) -> None:
        try:
            results = await self.send([e for e, _, _ in group])
        except BaseException as exc:  # noqa: BLE001 — every step of the group gets it
            results = [exc] * len(group)
        finally:
            self.inflight -= 1
        self.returned_at = asyncio.get_running_loop().time()
        for (entry, _, fut), res in zip(group, results):
            if not fut.done():
                ok = not isinstance(res, BaseException)
                fut.set_result(res) if ok else fut.set_exception(res)
                if ok:
                    self.expected.add(entry[0])
        self._dispatch()

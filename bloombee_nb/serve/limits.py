"""Who may ask, how often, and how many at once.

- :func:`check_key`: ``Authorization: Bearer <key>`` against the configured keys (constant-time).
- :class:`RateLimiter`: a token bucket per key (``rate_per_minute`` requests, bursts of ``burst``);
  pure arithmetic over a clock you can pass in.
- :class:`Admission`: at most ``max_running`` generations on the pool and ``max_queue`` waiting
  for a slot; past that a request is refused at once (429) instead of piling up sessions until a
  stage runs out of memory.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import AuthenticationError, QueueFullError, RateLimitError


def check_key(authorization: str | None, keys: tuple[str, ...]) -> str | None:
    """The caller's key (None when the server has no keys); raises :class:`AuthenticationError`."""
    if not keys:
        return None
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthenticationError("this server needs an API key: send 'Authorization: Bearer <key>' (the openai "
                                  "client's api_key=..., or OPENAI_API_KEY)")
    given = given.strip()
    if not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
        raise AuthenticationError("the API key is not one this server accepts: check it with whoever runs the server")
    return given


@dataclass
class _Bucket:
    tokens: float
    at_s: float


@dataclass
class RateLimiter:
    """Token bucket per key: each request takes one token; tokens refill at ``rate_per_minute``."""

    rate_per_minute: float
    burst: int = 1
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, key: str) -> None:
        """Count one request for ``key``; raises :class:`RateLimitError` when its bucket is empty."""
        with self._lock:
            now = self.clock()
            b = self._buckets.setdefault(key, _Bucket(float(self.burst), now))
            b.tokens = min(float(self.burst), b.tokens + (now - b.at_s) * self.rate_per_minute / 60.0)
            b.at_s = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return
            wait_s = (1.0 - b.tokens) * 60.0 / self.rate_per_minute
        raise RateLimitError(f"rate limit of {self.rate_per_minute:g} requests per minute for this key reached: "
                             f"retry in {wait_s:.1f} s", retry_after_s=wait_s)


@dataclass
class Admission:
    """Counts requests admitted to the generation pool (running or waiting for a thread)."""

    max_running: int
    max_queue: int
    _admitted: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self) -> None:
        with self._lock:
            if self._admitted >= self.max_running + self.max_queue:
                raise QueueFullError(f"the server is busy: {self.max_running} requests are generating and "
                                     f"{self.max_queue} more are waiting; retry shortly")
            self._admitted += 1

    def leave(self) -> None:
        with self._lock:
            self._admitted -= 1

    @property
    def admitted(self) -> int:
        return self._admitted

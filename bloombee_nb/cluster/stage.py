"""The Dask actor that hosts one stage: a :class:`SpanRunner` behind frame-in / frame-out methods.

Ordinary actor methods run one at a time on the worker's actor thread, so a stage serves its
sessions' steps in arrival order. Every tensor argument is a frame (``bytes``) decoded here;
every error raised is a typed :mod:`bloombee_nb.errors` exception that reaches the caller with
its type, and leaves every other session on this stage untouched.
"""

from __future__ import annotations

import time

import torch

from .. import transport
from ..model.span import SpanRunner
from ..transport.emulation import delay_reply


class StageActor:
    def __init__(self, path: str, start: int, end: int, dtype: str | None = None, num_threads: int = 1,
                 max_kv_bytes: int | None = None, max_sessions: int | None = None,
                 allow_unverified_architecture: bool = False):
        torch.set_num_threads(num_threads)  # workers otherwise run torch single-threaded
        kw = {k: v for k, v in dict(max_kv_bytes=max_kv_bytes, max_sessions=max_sessions).items() if v is not None}
        self.runner = SpanRunner(path, start, end, getattr(torch, dtype) if dtype else None,
                                 allow_unverified_architecture=allow_unverified_architecture, **kw)
        self.max_frame_bytes = transport.frame.DEFAULT_MAX_BYTES

    def open_session(self, session_id: str, batch: int, max_length: int) -> None:
        self.runner.open(session_id, batch, max_length)

    def close_session(self, session_id: str) -> None:
        self.runner.close(session_id)

    def rollback(self, session_id: str, length: int) -> None:
        self.runner.rollback(session_id, length)

    def forward(self, session_id: str, hidden: bytes, position_ids: bytes, attention_mask: bytes) -> tuple[bytes, float]:
        """One step of one session: frames in, (frame of the span's output, compute seconds) out."""
        h = transport.decode(hidden, self.max_frame_bytes)
        pos = transport.decode(position_ids, self.max_frame_bytes)
        mask = transport.decode(attention_mask, self.max_frame_bytes)
        t0 = time.perf_counter()
        out = self.runner.forward(session_id, h, pos, mask)
        compute_s = time.perf_counter() - t0
        delay_reply()
        return transport.encode(out), compute_s

    def info(self) -> dict:
        return self.runner.info()

"""Helpers the test files share (fixtures and checkpoint builders are in ``conftest.py``).

- :func:`positions` — the position ids transformers gives a left-padded prompt.
- :func:`wait_for` — poll a condition with a deadline (never a fixed sleep).
- :func:`distributed` — a ``DistributedModelForCausalLM`` that is closed when the block ends.
- :func:`free_port` — a TCP port on 127.0.0.1 nothing listens on now.
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

import bloombee_nb as bb


def positions(mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position ids of a left-padded batch: 0 at each row's first real token (padding: 0)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def wait_for(predicate: Callable[[], object], timeout_s: float = 60, what: str = "condition",
             explain: Callable[[], str] = lambda: "", poll_s: float = 0.2) -> None:
    """Return once ``predicate()`` is true; raise ``TimeoutError`` naming ``what`` (and ``explain()``,
    e.g. a log tail) after ``timeout_s``. An ``OSError`` from the predicate counts as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            detail = explain()
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}"
                               + (f"\n{detail}" if detail else ""))
        time.sleep(poll_s)


@contextmanager
def distributed(path, cluster, **kwargs) -> Iterator[bb.DistributedModelForCausalLM]:
    """``DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, **kwargs)``, closed (its
    stages freed) when the block ends, whatever happened inside it."""
    model = bb.DistributedModelForCausalLM.from_pretrained(str(path), cluster=cluster, **kwargs)
    try:
        yield model
    finally:
        model.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

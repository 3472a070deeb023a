"""Tensor offloading for a span: weights streamed from the checkpoint, the oldest KV in a file.

Two tiers: the *fast* tier is the memory layers compute from (RAM here; an accelerator where
there is one) and the *slow* tier is what is read back every step (the checkpoint's safetensors
files on disk; on an accelerator, CPU RAM or disk). The plan says which fraction of a stage's
weights (``weight_offload``) and of its KV cache (``kv_offload``) leaves the fast tier.

This module holds the policy (which fractions, which layers) and the names the span runner
imports; the mechanisms are in three modules, one concern each:

- ``offload_weights.py`` — :class:`WeightStreamer`: the last layers of a span streamed from the
  checkpoint through two resident buffers, with prefetch (details in its docstring).
- ``offload_kv.py`` — :class:`ColdKVLayer`: a KV-cache layer whose oldest positions are in a file.
- ``offload_disk.py`` — where a tensor's bytes are in a safetensors file (from the ``safetensors``
  library's own checks), vectored reads, the page cache.
"""

from __future__ import annotations

import math

from transformers.cache_utils import DynamicLayer

from ..errors import SpanError
from .offload_disk import Stored, page_cache_fraction, stored_tensors
from .offload_kv import ColdKVLayer
from .offload_weights import StreamStats, WeightStreamer

__all__ = ["ColdKVLayer", "Stored", "StreamStats", "WeightStreamer", "check_fraction", "n_offloaded", "offload_kv",
           "page_cache_fraction", "stored_tensors"]


def n_offloaded(fraction: float, n_layers: int) -> int:
    """Layers that ``fraction`` of ``n_layers`` leaves out of the fast tier: round half up."""
    check_fraction("weight_offload", fraction)
    return min(n_layers, int(math.floor(fraction * n_layers + 0.5)))


def check_fraction(name: str, fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise SpanError(f"{name} must be a fraction in [0, 1] (0: all in the fast tier), got {fraction!r}")


def offload_kv(cache, start: int, end: int, fraction: float, max_length: int, directory: str | None = None) -> int:
    """Replace the full-attention layers ``[start, end)`` of a fresh ``DynamicCache`` by
    :class:`ColdKVLayer`; returns how many layers were replaced (0 when ``fraction`` is 0)."""
    check_fraction("kv_offload", fraction)
    capacity = int(fraction * max_length)
    if capacity == 0:
        return 0
    n = 0
    for i in range(start, end):
        if type(cache.layers[i]) is DynamicLayer:
            cache.layers[i] = ColdKVLayer(fraction, capacity, directory)
            n += 1
    return n

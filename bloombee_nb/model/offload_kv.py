"""Offloaded KV: a cache layer whose oldest positions live in a memory-mapped file.

KV (:class:`ColdKVLayer`). A full-attention layer's cache keeps its oldest
``floor(f · length)`` positions in a memory-mapped file (one per layer, K and V, created in a
temp dir and unlinked at once, so nothing is left behind) and the newest in memory. Attention
gets ``cat(cold, hot)``: the very tensor a plain ``DynamicLayer`` would hold, so outputs are
bit-identical. Memory: the hot part, plus one layer's full K/V while that layer attends. On an
accelerator the hot part is on the device and the cold part stays in the host file: each step
copies it to the device for attention (the price of the slow tier).
The file's pages are under the kernel's control (written back and evicted under memory
pressure); they are not forcibly dropped, so while RAM is free the cold KV reads at page-cache
speed. Sliding-window layers are bounded by their window and stay in memory.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch
from transformers.cache_utils import DynamicLayer

from .._kernels import compact_kv


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, directory: str | None) -> torch.Tensor:
    """A zero-filled tensor backed by a fresh file (unlinked at once: the mapping keeps it alive)."""
    numel = math.prod(shape)
    fd, name = tempfile.mkstemp(prefix="bloombee-kv-", dir=directory)
    try:
        os.close(fd)
        t = torch.from_file(name, shared=True, size=numel, dtype=dtype)
    finally:
        os.unlink(name)
    return t.view(shape)


class ColdKVLayer(DynamicLayer):
    """A ``DynamicLayer`` whose oldest ``floor(fraction · length)`` positions live in a mapped file.

    ``keys``/``values`` hold the hot (newest) positions only; ``cold_length`` positions before them
    are in the file. ``capacity``: the most positions the file must hold (``floor(fraction · max_length)``).
    """

    def __init__(self, fraction: float, capacity: int, directory: str | None = None):
        super().__init__()
        self.fraction, self.capacity, self.directory = fraction, capacity, directory
        self.cold_length = 0
        self._cold: tuple[torch.Tensor, torch.Tensor] | None = None  # [B, H, capacity, D] each

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        B, H, _, D = key_states.shape
        self._cold = (_mapped((B, H, self.capacity, D), key_states.dtype, self.directory),
                      _mapped((B, H, self.capacity, value_states.shape[-1]), value_states.dtype, self.directory))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c, dev = self.cold_length, key_states.device
        ck, cv = self._cold  # in host memory; the hot part is where the layer computes
        keys = torch.cat([ck[:, :, :c].to(dev), self.keys, key_states], dim=-2)      # what attention sees
        values = torch.cat([cv[:, :, :c].to(dev), self.values, value_states], dim=-2)
        target = min(int(self.fraction * keys.shape[-2]), self.capacity)       # oldest positions to keep cold
        if target > c:
            ck[:, :, c:target].copy_(keys[:, :, c:target])  # device -> host where the layer runs on one
            cv[:, :, c:target].copy_(values[:, :, c:target])
            self.cold_length = c = target
        self.keys, self.values = keys[:, :, c:].clone(), values[:, :, c:].clone()  # own storage: frees the rest
        return keys, values

    def get_seq_length(self) -> int:
        return self.cold_length + super().get_seq_length() if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = self.get_seq_length() + tokens_to_remove
        if keep < self.cold_length:
            self.cold_length = max(0, keep)
        hot = max(0, keep - self.cold_length)
        self.keys, self.values = self.keys[:, :, :hot], self.values[:, :, :hot]

    def compact(self, past_len: int, keep: torch.Tensor) -> None:
        """Speculation: keep only the tree nodes ``keep`` of the step that started at ``past_len``
        (``compact_kv`` on the hot part; nodes that went cold are brought back first)."""
        if past_len < self.cold_length:
            ck, cv = self._cold
            dev = self.keys.device
            self.keys = torch.cat([ck[:, :, past_len:self.cold_length].to(dev), self.keys], dim=-2)
            self.values = torch.cat([cv[:, :, past_len:self.cold_length].to(dev), self.values], dim=-2)
            self.cold_length = past_len
        self.keys, self.values = compact_kv(self.keys, self.values, past_len - self.cold_length, keep)

    def reset(self) -> None:
        self.cold_length = 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("offloaded KV layers do not support beam expansion")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("offloaded KV layers do not support batch selection")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("offloaded KV layers do not support beam reordering")

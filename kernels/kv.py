"""KV compaction after a tree step: keep the accepted path's entries, drop the rest.

After a tree of T nodes ran against a cache of ``past_len`` positions, a layer holds

    keys, values [B, H, past_len + T, Dh]   (positions past_len.. are the tree's nodes, in tree order)

and the client accepted one root-to-node path ``keep`` (tree node indices, root first, ascending):

    keep [K] (every row the same path) or [B, K] (one path per row).

Compaction moves ``keep``'s entries to positions ``past_len .. past_len + K - 1`` and shortens the
layer to ``past_len + K``. The past is never touched, so compaction is in place: it writes only
tree positions, and a path is ascending (``keep[j] >= j``), so no entry is overwritten before read.
"""

from __future__ import annotations

from typing import Callable

import torch


def compact_kv_reference(keys: torch.Tensor, values: torch.Tensor, past_len: int,
                         keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch compaction; returns ``(keys, values)`` as views of the inputs ``[B, H, past_len + K, Dh]``."""
    K = keep.shape[-1]
    src = past_len + keep.to(keys.device)          # [K] or [B, K]: positions in the layer to keep
    for t in (keys, values):
        if src.dim() == 1:
            kept = t.index_select(2, src)          # [B, H, K, Dh]
        else:
            kept = t.gather(2, src[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
        t[:, :, past_len:past_len + K] = kept      # a copy of K entries, then written in place
    return keys[:, :, :past_len + K], values[:, :, :past_len + K]


#: device type ("cuda", …) -> an accelerated compaction with the reference's signature and results.
#: There is none yet; tests/kernels check every entry here against :func:`compact_kv_reference`.
ACCELERATED_COMPACT_KV: dict[str, Callable] = {}


def compact_kv(keys: torch.Tensor, values: torch.Tensor, past_len: int,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact one layer's K/V to the accepted path (see the module docstring); the fastest kernel for the device."""
    return ACCELERATED_COMPACT_KV.get(keys.device.type, compact_kv_reference)(keys, values, past_len, keep)


def compact_cache(layers, past_len: int, keep: torch.Tensor) -> None:
    """Compact every cache layer of ``layers`` to the accepted paths ``keep [B, K]`` (-1 pads a row
    that accepted fewer), in place: the one routine the stages and the client's draft both call.

    When all rows kept the same path the cheaper ``[K]`` index is used. A layer with a ``compact``
    method of its own (KV offloaded to disk: ``model/offload_kv.py``'s ``ColdKVLayer``) does its
    part itself; uninitialised layers (none of this span's, or not yet written) are skipped, and
    sliding-window layers' own position count follows the new length.
    """
    rows_agree = bool((keep == keep[:1]).all()) and bool((keep >= 0).all())
    idx = keep[0] if rows_agree else keep.clamp(min=0)
    for layer in layers:
        if hasattr(layer, "compact"):
            layer.compact(past_len, idx)
        elif getattr(layer, "is_initialized", False):
            layer.keys, layer.values = compact_kv(layer.keys, layer.values, past_len, idx)
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = past_len + keep.shape[1]

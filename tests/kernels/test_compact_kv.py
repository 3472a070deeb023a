"""KV compaction equals gathering the past and the accepted path — for the reference and every accelerated kernel."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloombee_nb._kernels import ACCELERATED_COMPACT_KV, compact_kv, compact_kv_reference, depths, path
from tests.kernels.test_tree_kernels import trees

IMPLS = {"reference": compact_kv_reference, "dispatch": compact_kv, **ACCELERATED_COMPACT_KV}


def gathered(t, past_len, keep):
    """What compaction must give: the past, then the kept tree positions in order ([B, K] keep: per row)."""
    tree = t[:, :, past_len:]
    if keep.dim() == 1:
        return torch.cat([t[:, :, :past_len], tree[:, :, keep]], 2)
    return torch.cat([t[:, :, :past_len], torch.stack([tree[b, :, k] for b, k in enumerate(keep)])], 2)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None)
@given(parents=trees(), past_len=st.integers(0, 6), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), per_row=st.booleans())
def test_compaction_equals_gather(impl, parents, past_len, data, dtype, per_row):
    B, H, Dh, T = 2, 3, 4, parents.numel()
    d = depths(parents)
    level = data.draw(st.integers(0, int(d.max())))  # accepted path length = level + 1
    nodes = (d == level).nonzero().flatten().tolist()
    if per_row:  # each row accepted its own path, all of the same length
        keep = torch.stack([path(parents, data.draw(st.sampled_from(nodes))) for _ in range(B)])
    else:
        keep = path(parents, data.draw(st.sampled_from(nodes)))
    keys = torch.randn(B, H, past_len + T, Dh).to(dtype)
    values = torch.randn(B, H, past_len + T, Dh).to(dtype)
    want_k, want_v = gathered(keys, past_len, keep), gathered(values, past_len, keep)
    k, v = IMPLS[impl](keys, values, past_len, keep)
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert k.data_ptr() == keys.data_ptr() and v.data_ptr() == values.data_ptr()  # in place: views of the inputs


def test_compact_cache_keeps_each_rows_path_in_every_layer():
    """The routine the stages and the draft share: rows with different path lengths (-1 padded),
    every initialised layer compacted, uninitialised ones left alone."""
    from transformers import DynamicCache

    from bloombee_nb._kernels import compact_cache

    cache, past, T = DynamicCache(), 3, 5
    for layer in range(2):
        cache.update(torch.randn(2, 2, past + T, 4), torch.randn(2, 2, past + T, 4), layer)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    keep = torch.tensor([[0, 2, 4], [0, 1, -1]])  # tree (2, 1): row 1 accepted one draft fewer
    compact_cache(cache.layers, past, keep)
    for layer, (k, v) in zip(cache.layers, before):
        assert layer.keys.shape[2] == past + 3
        assert torch.equal(layer.keys, gathered(k, past, keep.clamp(min=0)))
        assert torch.equal(layer.values, gathered(v, past, keep.clamp(min=0)))

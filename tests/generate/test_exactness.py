"""Distributed greedy output == single-process transformers, token for token, for every family."""

import pytest
import torch

import bloombee_nb as bb
from tests.conftest import FAMILIES, padded_batch

# 1, 2 and 3 stages; uneven spans of the 5 layers
SPANS = {1: [(0, 5)], 2: [(0, 3), (3, 5)], 3: [(0, 1), (1, 4), (4, 5)]}
PREFILL_LOGITS_ATOL = 1e-5  # observed: 0.0 (same kernels, same shapes); the bound allows BLAS differences


@pytest.fixture(scope="module")
def models(cluster, checkpoints):
    loaded = {(f, n): bb.DistributedModelForCausalLM.from_pretrained(checkpoints[f], cluster=cluster, spans=s)
              for f in FAMILIES for n, s in SPANS.items()}
    yield loaded
    for m in loaded.values():
        m.close()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("n_stages", [1, 2, 3])
def test_greedy_equals_transformers(models, reference, family, n_stages):
    model, ref = models[family, n_stages], reference[family]
    assert [(s.start, s.end) for s in model.placement.stages] == SPANS[n_stages]
    assert len({s.worker for s in model.placement.stages}) == n_stages  # really on different workers
    for lengths in ([1], [9], [4, 11, 7]):  # several prompt lengths, and a left-padded batch of 3
        ids, mask = padded_batch(lengths, seed=len(lengths))
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want), (lengths, got.tolist(), want.tolist())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_logits_match(models, reference, family):
    ids, mask = padded_batch([4, 11, 7], seed=3)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        want = reference[family](ids, attention_mask=mask, position_ids=pos).logits
    got = models[family, 3](ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()  # padded positions carry no meaning
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=PREFILL_LOGITS_ATOL)

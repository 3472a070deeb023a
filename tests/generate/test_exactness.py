"""Distributed greedy output == single-process transformers, token for token, for every family."""

import pytest
import torch

import bloombee_nb as bb
from tests.conftest import FAMILIES, padded_batch

# 1, 2 and 3 stages; uneven spans of the 5 layers
SPANS = {1: [(0, 5)], 2: [(0, 3), (3, 5)], 3: [(0, 1), (1, 4), (4, 5)]}
PREFILL_LOGITS_ATOL = 1e-5  # observed: 0.0 (same kernels, same shapes); the bound allows BLAS differences


class _Models(dict):
    """(family, n_stages) -> a distributed model, placed on first use (``-k gemma`` places only Gemma's)."""

    def __init__(self, cluster, checkpoints):
        super().__init__()
        self.cluster, self.checkpoints = cluster, checkpoints

    def __missing__(self, key):
        family, n = key
        self[key] = m = bb.DistributedModelForCausalLM.from_pretrained(self.checkpoints[family], cluster=self.cluster,
                                                                       spans=SPANS[n])
        return m


@pytest.fixture(scope="module")
def models(cluster, checkpoints):
    loaded = _Models(cluster, checkpoints)
    yield loaded
    for m in loaded.values():
        m.close()


@pytest.mark.parametrize("family", list(FAMILIES))
# the quick loop (-m "not slow") checks every family on 3 stages; 1 and 2 stages run in the full suite
@pytest.mark.parametrize("n_stages", [pytest.param(n, marks=pytest.mark.slow) for n in (1, 2)] + [3])
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


@pytest.mark.parametrize("family", ["gemma", "granite", "cohere", "mixtral", "gpt_neox", "falcon"])
def test_speculative_greedy_equals_transformers(models, reference, family):
    """Token trees verified by the 3-stage chain, with the family's client math (Gemma's embedding
    scale, Granite's multipliers, Cohere's logit scale) on the verify path too: a perfect draft (the
    family's own reference) and a wrong one (another family's) both give transformers' greedy tokens."""
    model, ref = models[family, 3], reference[family]
    ids, mask = padded_batch([4, 11, 7], seed=5)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for draft in (ref, reference["llama" if family != "llama" else "qwen2"]):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             assistant_model=draft, tree_widths=(2, 2, 1))
        assert torch.equal(got, want), (family, got.tolist(), want.tolist())

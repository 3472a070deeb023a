"""HF-compatible generation features on the distributed model, each checked against transformers."""

import pytest
import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from bloombee_nb.errors import SessionLengthError, UnknownSessionError
from tests.conftest import padded_batch
from tests.helpers import distributed


@pytest.fixture(scope="module")
def model(cluster, checkpoints):
    with distributed(checkpoints["llama"], cluster) as m:
        yield m


@pytest.fixture(scope="module")
def ref(reference):
    return reference["llama"]


@pytest.mark.parametrize("kw", [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, temperature=1.3)])
def test_sampling_with_seed_equals_transformers(model, ref, kw):
    ids, mask = padded_batch([5, 8, 3], seed=7)
    torch.manual_seed(123)
    want = ref.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=0, **kw)
    torch.manual_seed(123)
    got = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=0, **kw)
    assert torch.equal(got, want)


def test_eos_stops_like_transformers(model, ref):
    ids, mask = padded_batch([6, 2], seed=1)
    free = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 3])  # a token row 0 emits as its 4th new token
    want = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, want)
    assert got.shape[1] <= free.shape[1]


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_sees_every_token(model):
    ids, _ = padded_batch([5], seed=2)
    s = Collect()
    out = model.generate(ids, do_sample=False, max_new_tokens=6, streamer=s, pad_token_id=0)
    assert s.ended and torch.equal(torch.cat([c.reshape(-1) for c in s.chunks]), out[0])


def test_multi_turn_session_keeps_kv_on_stages(model, ref):
    ids, _ = padded_batch([6], seed=4)
    follow_up = torch.tensor([[11, 12, 13]])
    with model.inference_session(max_length=64) as s:
        out1 = model.generate(ids, session=s, do_sample=False, max_new_tokens=5, pad_token_id=0)
        held = s.get_seq_length()
        out2 = model.generate(torch.cat([out1, follow_up], 1), session=s, do_sample=False, max_new_tokens=5,
                              pad_token_id=0)
        assert held == out1.shape[1] - 1  # the last sampled token is fed on the next turn
        # turn 2 sent only what the stages had not seen: the last sampled token + the follow-up
        assert [t.tokens for t in s.traces] == [6, 1, 1, 1, 1, 4, 1, 1, 1, 1]
    # transformers with its own cache carried over between turns
    cache = DynamicCache(config=ref.config)
    r1 = ref.generate(ids, cache=cache, do_sample=False, max_new_tokens=5, pad_token_id=0)
    r2 = ref.generate(torch.cat([r1, follow_up], 1), cache=cache, do_sample=False, max_new_tokens=5, pad_token_id=0)
    assert torch.equal(out1, r1) and torch.equal(out2, r2)
    with pytest.raises(UnknownSessionError, match="closed"):
        model(follow_up, cache=s)


def test_prompt_longer_than_max_length(model):
    ids, _ = padded_batch([10])
    with model.inference_session(max_length=8) as s:
        with pytest.raises(SessionLengthError, match="max_length=8"):
            model(ids, cache=s)
        assert s.get_seq_length() == 0
        model(ids[:, :8], cache=s)  # the session is still usable


def test_repr_html(model, cluster):
    assert "layers" in model._repr_html_() and str(model.name_or_path) in repr(model)
    html = cluster._repr_html_()
    assert "layers 0–1" in html and cluster.address in html


def test_options_are_one_config_and_a_typo_is_a_type_error_naming_them(model, cluster, checkpoints):
    import bloombee_nb as bb

    assert model.deployment.options == bb.DeployConfig() and model.deployment in cluster.deployments  # defaults
    with pytest.raises(TypeError, match="unknown option.*relya.*relay"):
        bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster, relya="star")
    with pytest.raises(ValueError, match='relay must be "chain" or "star"'):
        bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster, relay="ring")
    assert f"{model.name_or_path}: layers 0–1" in cluster.hosted_spans()[model.placement.stages[0].worker]


def test_stop_strings_on_the_shipped_model(cluster):
    """Stop handling with real text: transformers' stop_strings need the tokenizer, as in HF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.shipped import default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def fibonacci(n):", return_tensors="pt")
    kw = dict(max_new_tokens=40, do_sample=False, stop_strings=["\n"], tokenizer=tok, pad_token_id=tok.pad_token_id)
    want = AutoModelForCausalLM.from_pretrained(path).generate(**ids, **kw)
    with distributed(path, cluster) as model:
        got = model.generate(**ids, **kw)
    assert torch.equal(got, want)
    assert got.shape[1] < ids["input_ids"].shape[1] + 40  # it stopped at the newline, not at the limit

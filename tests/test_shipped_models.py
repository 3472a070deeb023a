"""The shipped tiny target/draft pair loads with plain transformers and behaves."""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHIPPED_DIR = Path(__file__).resolve().parents[1] / "bloombee_nb" / "shipped"


def _load_shipped():
    """Import bloombee_nb.shipped; fall back to loading the file directly if the parent package fails to import."""
    try:
        import bloombee_nb.shipped as shipped
    except Exception:  # parent package broken/heavy: the paths module stands alone
        spec = importlib.util.spec_from_file_location("_bloombee_shipped", SHIPPED_DIR / "__init__.py")
        shipped = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(shipped)
    return shipped


shipped = _load_shipped()
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def pair():
    load = lambda p: (transformers.AutoModelForCausalLM.from_pretrained(p).eval(),
                      transformers.AutoTokenizer.from_pretrained(p))
    return load(shipped.TARGET_PATH), load(shipped.DRAFT_PATH)


def test_paths():
    assert shipped.default_model_path() == str(shipped.TARGET_PATH)
    for path in (shipped.TARGET_PATH, shipped.DRAFT_PATH):
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_architectures(pair):
    (target, _), (draft, _) = pair
    t, d = target.config, draft.config
    assert t.model_type == d.model_type == "llama"
    assert 6 <= t.num_hidden_layers <= 8
    assert t.num_key_value_heads < t.num_attention_heads  # grouped-query attention
    assert 1 <= d.num_hidden_layers <= 2
    assert draft.num_parameters() < target.num_parameters() / 3
    assert target.dtype == draft.dtype == torch.float32


def test_shared_tokenizer(pair):
    (target, t_tok), (draft, d_tok) = pair
    assert t_tok.get_vocab() == d_tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(t_tok)
    assert t_tok.eos_token_id is not None and t_tok.eos_token in t_tok.all_special_tokens
    assert t_tok.bos_token_id is not None and t_tok.pad_token_id is not None
    assert target.generation_config.eos_token_id == t_tok.eos_token_id
    assert target.generation_config.do_sample is False


def test_size_on_disk():
    size = sum(f.stat().st_size for p in (shipped.TARGET_PATH, shipped.DRAFT_PATH)
               for f in p.rglob("*") if f.is_file())
    assert size < 30 * 2**20


@pytest.mark.parametrize("which", [0, 1])
def test_greedy_generation_is_the_argmax_of_a_full_forward_at_every_step(pair, which):
    """generate() (KV cache, generation config) against the plainest greedy loop: recompute the whole
    sequence, append its argmax. (It used to compare a run with itself, which could not fail.)"""
    model, tok = pair[which]
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)[0].tolist()
        want = enc["input_ids"][0].tolist()
        for _ in range(len(out) - len(want)):
            want.append(int(model(torch.tensor([want])).logits[0, -1].argmax()))
    assert len(out) > enc["input_ids"].shape[1]
    assert out == want
    assert tok.decode(out, skip_special_tokens=True).startswith(PROMPT)

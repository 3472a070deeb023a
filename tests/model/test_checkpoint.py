import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from bloombee_nb.errors import CheckpointNotFoundError, SpanError, UnsupportedArchitectureError
from bloombee_nb.model.checkpoint import resolve_checkpoint, weight_map
from bloombee_nb.model.family import load_client_parts, load_config, load_span
from tests.conftest import make_checkpoint


def test_span_loads_only_its_tensors_and_matches_full_model(checkpoints, reference):
    path = resolve_checkpoint(checkpoints["llama"])
    _, layers, _, dtype = load_span(path, load_config(path), 1, 4)
    ref_layers = reference["llama"].model.layers
    assert dtype == torch.float32 and len(layers) == 3
    for got, want in zip(layers, ref_layers[1:4]):
        for (n, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
            assert torch.equal(a, b), n


def test_sharded_checkpoint_with_index(tmp_path, checkpoints):
    path = make_checkpoint(tmp_path / "sharded", "llama", seed=0, max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    single = resolve_checkpoint(checkpoints["llama"])
    _, a, _, _ = load_span(path, load_config(path), 2, 5)
    _, b, _, _ = load_span(single, load_config(single), 2, 5)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


def test_client_parts_tied_and_untied(checkpoints, reference):
    for family in ("llama", "qwen2"):  # untied, tied
        path = resolve_checkpoint(checkpoints[family])
        _, embed, norm, head, _ = load_client_parts(path, load_config(path))
        ref = reference[family]
        assert torch.equal(embed.weight, ref.model.embed_tokens.weight)
        assert torch.equal(head.weight, ref.lm_head.weight)
        assert (head.weight is embed.weight) == (family == "qwen2")
        assert "lm_head.weight" not in weight_map(path) or family == "llama"


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from bloombee_nb.model.checkpoint import resolve_checkpoint
    from bloombee_nb.model.family import load_config, load_span
    path = resolve_checkpoint(sys.argv[1]); cfg = load_config(path)
    load_span(path, cfg, 0, 1)  # warm up imports and lazy init with a one-layer load
    def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
    def hwm(): return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
    open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark to the current RSS
    before = rss()
    _, layers, _, _ = load_span(path, cfg, int(sys.argv[2]), int(sys.argv[3]))
    for p in layers.parameters():  # fault every page in: safetensors may hand out mmap-backed tensors
        p.sum()
    span = sum(p.numel() * p.element_size() for p in layers.parameters())
    print(hwm() - before, span)
""")


@pytest.mark.slow  # loads a large checkpoint in a subprocess (5 s)
def test_peak_memory_of_a_span_load_is_about_the_span(tmp_path):
    # 16 layers x ~6.3 MB = ~100 MB model; a 2-layer span is ~12.6 MB
    path = make_checkpoint(tmp_path / "big", "llama", n_layers=16, hidden=512)
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), "4", "6"], capture_output=True,
                         text=True, check=True).stdout.split()
    peak, span = int(out[0]), int(out[1])
    assert span < model_bytes / 7
    assert peak > 0.8 * span, (peak, span)  # the measurement sees the span's pages
    # at most the mmap'd pages plus one copy of the span and allocator slack; far from the model's size
    assert peak < 2.2 * span + (8 << 20), (peak, span, model_bytes)
    assert peak < model_bytes / 3


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        resolve_checkpoint(tmp_path / "empty")


def test_span_outside_the_model(checkpoints):
    path = resolve_checkpoint(checkpoints["llama"])
    with pytest.raises(SpanError, match="not inside the model's 5 layers"):
        load_span(path, load_config(path), 3, 9)


def test_unsupported_architecture_is_named(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'.*supported: llama"):
        load_config(tmp_path / "gpt2")
    cfg = load_config(tmp_path / "gpt2", allow_unverified=True)
    with pytest.raises(UnsupportedArchitectureError, match="layers"):
        load_span(tmp_path / "gpt2", cfg, 0, 1)


def test_a_hub_checkpoint_fetches_only_the_shards_of_the_span(tmp_path, monkeypatch):
    """The Hub itself is out of reach here: its download function copies from a local 'origin'
    and records what was asked for; everything else is the real code path."""
    import shutil

    import huggingface_hub

    from bloombee_nb.model import checkpoint

    origin = make_checkpoint(tmp_path / "origin", "llama", seed=0, max_shard_size="60KB")
    snapshot = tmp_path / "hub" / "models--someone--tiny-llama" / "snapshots" / "0123abcd"  # the HF cache's layout
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors.index.json"):
        shutil.copy(origin / f, snapshot / f)
    fetched = []

    def hub_download(repo_id, filename, revision=None):
        assert (repo_id, revision) == ("someone/tiny-llama", "0123abcd")
        fetched.append(filename)
        return str(shutil.copy(origin / filename, snapshot / filename))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    assert checkpoint.hub_source(origin) is None
    wmap = weight_map(snapshot)
    _, layers, _, _ = load_span(snapshot, load_config(snapshot), 2, 4)
    need = {wmap[n] for n in wmap if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(fetched) == need and len(need) < len(set(wmap.values()))  # its shards, not the model
    _, want, _, _ = load_span(origin, load_config(origin), 2, 4)
    for x, y in zip(layers.parameters(), want.parameters()):
        assert torch.equal(x, y)


def test_encoder_decoder_and_multimodal_models_are_refused_with_what_is_supported(tmp_path):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig, T5Config

    T5Config(num_layers=1, d_model=16, d_kv=4, num_heads=2, d_ff=32, vocab_size=64).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedArchitectureError, match="'t5' is an encoder-decoder.*Supported: llama"):
        load_config(tmp_path / "t5", allow_unverified=True)
    text = Gemma3TextConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, vocab_size=64)
    vision = SiglipVisionConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2)
    Gemma3Config(text_config=text, vision_config=vision).save_pretrained(tmp_path / "gemma3-mm")
    with pytest.raises(UnsupportedArchitectureError, match="multimodal.*Supported: llama.*gemma3_text"):
        load_config(tmp_path / "gemma3-mm", allow_unverified=True)


def test_layers_stored_in_another_layout_load_through_transformers_conversion(checkpoints, reference):
    """Mixtral checkpoints keep one tensor per expert; transformers 5 fuses them on load. A span
    reads only its own layers' tensors and converts them with transformers' own mapping."""
    path = resolve_checkpoint(checkpoints["mixtral"])
    assert any(".experts.0.w1." in k for k in weight_map(path))  # the per-expert layout on disk
    config = load_config(path)
    _, layers, _, _ = load_span(path, config, 2, 4)
    want = reference["mixtral"].model.layers[2:4].state_dict()
    got = layers.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    from bloombee_nb.model.span import SpanRunner
    with pytest.raises(UnsupportedArchitectureError, match="weight_offload=0"):
        SpanRunner(path, 2, 4, weight_offload=0.5)


@pytest.mark.parametrize("family, flag", [("falcon", "alibi"), ("gemma", "use_bidirectional_attention")])
def test_flags_this_runtime_does_not_implement_are_refused(tmp_path, checkpoints, family, flag):
    """Falcon-RW's ALiBi and Gemma's bidirectional (embedding-model) attention would give other tokens."""
    path = Path(shutil.copytree(checkpoints[family], tmp_path / family))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, flag: True}))
    with pytest.raises(UnsupportedArchitectureError, match=f"sets {flag}.*does not implement"):
        load_config(path)


def test_an_unverified_family_with_client_arithmetic_is_refused(tmp_path):
    """GraniteMoe scales its embeddings and logits in its *ForCausalLM: without an adapter row the
    client would skip that, so even allow_unverified_architecture refuses it, saying why."""
    from transformers import GraniteMoeConfig

    GraniteMoeConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=64,
                     embedding_multiplier=12.0, logits_scaling=8.0).save_pretrained(tmp_path / "gm")
    with pytest.raises(UnsupportedArchitectureError, match="'granitemoe' sets logits_scaling, embedding_multiplier.*ADAPTERS"):
        load_config(tmp_path / "gm", allow_unverified=True)

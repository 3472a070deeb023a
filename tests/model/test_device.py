"""A span on an accelerator: ``SpanRunner(device=...)``.

On the CPU (always): ``device="cpu"`` is the default here, bit for bit, and bad devices are typed
errors. On a GPU (skipped without one): a span on ``cuda`` against single-process transformers on
the CPU (fp32: close, greedy tokens equal), through prefill, decode, a rollback and a token tree
whose path is kept; offloaded weights (streamed into device buffers) and KV (cold part in a host
file) bit for bit against the resident span on the same GPU; bf16 against transformers on the GPU.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bloombee_nb._kernels import branching_parents, tree_position_ids
from bloombee_nb.errors import SpanError
from bloombee_nb.model.family import client_math, load_client_parts, load_config
from bloombee_nb.model.offload import ColdKVLayer
from bloombee_nb.model.span import SpanRunner, resolve_device
from tests.conftest import FAMILIES, padded_batch
from tests.helpers import positions

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP32_ATOL = 1e-4  # GPU fp32 against CPU fp32 (TF32 is off by default): observed ~1e-6


def script(runner, embed, device="cpu", sid="s") -> list[torch.Tensor]:
    """Prefill a padded batch, 3 decodes, roll back 4, a 5-node tree, keep per-row paths, 2 decodes.
    Inputs are made on ``device`` (the client's), so outputs must come back there."""
    ids, mask = padded_batch([7, 4, 6])
    g = torch.Generator().manual_seed(3)
    B, D, dt = 3, runner.hidden_size, runner.dtype

    def rand(T):
        return torch.randn(B, T, D, generator=g).to(device, dt)

    def ones(T):
        return torch.ones(B, T, dtype=torch.long, device=device)

    runner.open(sid, B, 32)
    mask, pos = mask.to(device), positions(mask).to(device)
    outs = [runner.forward(sid, embed(ids.to(device)).to(dt), pos, mask)]
    pos = pos[:, -1:]
    for _ in range(3):
        pos = pos + 1
        outs.append(runner.forward(sid, rand(1), pos, ones(1)))
    runner.rollback(sid, runner.sessions[sid].length - 4)
    pos = pos - 4
    parents = branching_parents((2, 1))  # [-1, 0, 0, 1, 2]
    past = runner.sessions[sid].length
    tpos = tree_position_ids(parents, pos[:, 0].cpu() + 1).to(device)
    outs.append(runner.forward(sid, rand(5), tpos, ones(5), parents.to(device)))
    runner.keep_path(sid, past, [[0, 2, 4], [0, 1, 3], [0, 2, -1]])  # one path per row, -1 padded
    pos = pos + 3
    for _ in range(2):
        pos = pos + 1
        outs.append(runner.forward(sid, rand(1), pos, ones(1)))
    assert all(o.device.type == torch.device(device).type for o in outs)
    return outs


# ---- on the CPU ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, dict(weight_offload=0.5, kv_offload=0.5)], ids=["resident", "offloaded"])
def test_cpu_device_equals_the_default(checkpoints, reference, kw):
    embed = reference["llama"].model.embed_tokens
    default = dict(device=torch.device("cpu")) if torch.cuda.is_available() else {}  # "auto" is the GPU there
    runners = [SpanRunner(checkpoints["llama"], 0, 5, **kw, **extra) for extra in (default, dict(device="cpu"))]
    with torch.inference_mode():
        a, b = (script(r, embed) for r in runners)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    r = runners[1]
    info = r.info()
    assert r.device == torch.device("cpu") and info["fast_tier"] == "cpu"
    assert info["resident_weight_bytes"] + info["offloaded_weight_bytes"] == info["weight_bytes"]
    assert info["offload_staging_bytes"] == 0
    assert (info["cold_kv_bytes"] > 0) == bool(kw)
    for runner in runners:
        runner.release()


def test_device_names(checkpoints):
    auto = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device(None) == resolve_device("auto") == auto
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(SpanError, match="'auto', 'cpu', 'cuda' or 'cuda:<index>'"):
        SpanRunner(checkpoints["llama"], 0, 1, device="gpu")
    with pytest.raises(SpanError, match="'cpu' or a CUDA device"):
        SpanRunner(checkpoints["llama"], 0, 1, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(SpanError, match="sees no CUDA GPU.*device='cpu' or 'auto'"):
            SpanRunner(checkpoints["llama"], 0, 1, device="cuda")
    else:
        n = torch.cuda.device_count()
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
        with pytest.raises(SpanError, match=f"has {n} CUDA GPU"):
            SpanRunner(checkpoints["llama"], 0, 1, device=f"cuda:{n}")


# ---- on a GPU -----------------------------------------------------------------------------------

def greedy(spans, embed, norm, head, ids, mask, n, sid="g"):
    """The client's greedy loop over ``spans``: (prefill hidden [B, L, D], tokens [B, n])."""
    B = ids.shape[0]
    for s in spans:
        s.open(sid, B, ids.shape[1] + n)
    pos, ones = positions(mask), torch.ones(B, 1, dtype=torch.long, device=ids.device)
    h = embed(ids)
    for s in spans:
        h = s.forward(sid, h, pos, mask)
    first, toks = h, []
    for i in range(n):
        nxt = head(norm(h[:, -1:])).argmax(-1)  # [B, 1]
        toks.append(nxt)
        if i + 1 < n:
            pos = pos[:, -1:] + 1
            h = embed(nxt)
            for s in spans:
                h = s.forward(sid, h, pos, ones)
    for s in spans:
        s.close(sid)
    return first, torch.cat(toks, 1)


def client_parts(path):
    """(embed, norm, head) as the client applies them, with the family's client math (Granite's
    multipliers, Cohere's logit scale, Gemma 2's soft-capping, BLOOM's embedding LayerNorm)."""
    config = load_config(Path(path))
    _, embed, norm, head, _ = load_client_parts(Path(path), config)
    math = client_math(config)
    return (lambda ids: math.inputs(embed(ids))), norm, (lambda h: math.logits(head(h)))


@cuda
@pytest.mark.parametrize("family", list(FAMILIES))
def test_span_on_gpu_matches_transformers_on_cpu(checkpoints, reference, family):
    """fp32: the whole span on the GPU, and a chain with one span on the GPU and one on the CPU."""
    ref = reference[family]
    parts = client_parts(checkpoints[family])
    whole = [SpanRunner(checkpoints[family], 0, 5, device="cuda")]
    mixed = [SpanRunner(checkpoints[family], 0, 2, device="cuda"), SpanRunner(checkpoints[family], 2, 5, device="cpu")]
    assert whole[0].device.type == "cuda" and next(whole[0].layers.parameters()).is_cuda
    assert whole[0].info()["fast_tier"] == str(whole[0].device) == f"cuda:{torch.cuda.current_device()}"
    for lengths in ([9], [4, 11, 7]):
        ids, mask = padded_batch(lengths, seed=len(lengths))
        with torch.inference_mode():
            want_h = ref.base_model(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
            want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            for spans in (whole, mixed):
                h, toks = greedy(spans, *parts, ids, mask, 8)
                assert h.device.type == "cpu"  # back where the input came from
                real = mask.bool()
                torch.testing.assert_close(parts[1](h)[real], want_h[real], rtol=0, atol=FP32_ATOL)
                assert torch.equal(toks, want[:, ids.shape[1]:]), (family, lengths, toks.tolist())


@cuda
def test_tree_step_rollback_and_inputs_on_the_gpu(checkpoints, reference):
    """The full script on the GPU, inputs on the CPU and on the GPU, against the CPU span."""
    embed = reference["llama"].model.embed_tokens
    with torch.inference_mode():
        want = script(SpanRunner(checkpoints["llama"], 0, 5, device="cpu"), embed)
        gpu = SpanRunner(checkpoints["llama"], 0, 5, device="cuda")
        from_cpu = script(gpu, embed)
        from_gpu = script(gpu, lambda ids: embed(ids.cpu()).cuda(), device="cuda", sid="t")
    for a, b, c in zip(from_cpu, from_gpu, want):
        torch.testing.assert_close(a, c, rtol=0, atol=FP32_ATOL)
        assert torch.equal(a, b.cpu())  # same device, same ops: where the inputs came from does not matter
    s = gpu.sessions["s"]
    assert s.mask.is_cuda and all(layer.keys.is_cuda for layer in s.cache.layers)


@cuda
@pytest.mark.parametrize("kw", [dict(weight_offload=0.5, kv_offload=0.5),
                                dict(weight_offload=0.5, kv_offload=0.5, offload_prefetch=False),
                                dict(weight_offload=1.0, kv_offload=1.0, offload_reader="mmap"),
                                dict(weight_offload=0.6, kv_offload=0.3, dtype=torch.bfloat16)],
                         ids=["half", "no-prefetch", "all-mmap", "cast-to-bf16"])
def test_offload_on_the_gpu_is_bit_identical_to_resident(checkpoints, reference, kw):
    embed = reference["llama"].model.embed_tokens
    dtype = kw.get("dtype", torch.float32)
    with torch.inference_mode():
        want = script(SpanRunner(checkpoints["llama"], 0, 5, device="cuda", dtype=dtype), embed)
        runner = SpanRunner(checkpoints["llama"], 0, 5, device="cuda", **kw)
        got = script(runner, embed)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i} differs with {kw}"
    info = runner.info()
    assert info["fast_tier"].startswith("cuda:")
    assert info["resident_weight_bytes"] + info["offloaded_weight_bytes"] == info["weight_bytes"]
    st = runner.streamer
    assert all(b["_flat"].is_cuda for b in st._buffers)
    if st._staging is not None:  # the pread reader lands in pinned host memory, counted apart
        assert st._staging["_flat"].is_pinned() and info["offload_staging_bytes"] > 0
    assert info["offload_buffer_bytes"] == sum(b["_flat"].numel() * b["_flat"].element_size() for b in st._buffers)
    resident = [p for layer in list(runner.layers)[:5 - st.last.layers] for p in layer.parameters()]
    assert all(p.is_cuda for p in resident)
    cold = [layer for layer in runner.sessions["s"].cache.layers if isinstance(layer, ColdKVLayer)]
    assert len(cold) == 5 and info["cold_kv_bytes"] > 0
    for layer in cold:  # the hot part on the device, the cold part in its host file
        assert layer.keys.is_cuda and not layer._cold[0].is_cuda and layer.cold_length > 0
    runner.release()


@cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_on_the_gpu_matches_transformers_on_the_gpu(checkpoints, family):
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.bfloat16).cuda().eval()
    parts = (ref.model.embed_tokens, ref.model.norm, ref.get_output_embeddings())
    spans = [SpanRunner(checkpoints[family], 0, 3, dtype=torch.bfloat16, device="cuda"),
             SpanRunner(checkpoints[family], 3, 5, dtype=torch.bfloat16, device="cuda", weight_offload=0.5)]
    ids, mask = (t.cuda() for t in padded_batch([4, 11, 7], seed=5))
    with torch.inference_mode():
        want_h = ref.model(ids, attention_mask=mask, position_ids=positions(mask)).last_hidden_state
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        h, toks = greedy(spans, *parts, ids, mask, 8)
    assert h.is_cuda and h.dtype == torch.bfloat16
    real = mask.bool()
    torch.testing.assert_close(ref.model.norm(h)[real], want_h[real], rtol=2e-2, atol=2e-2)
    assert torch.equal(toks, want[:, ids.shape[1]:]), toks.tolist()
    for s in spans:
        s.release()

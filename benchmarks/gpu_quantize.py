"""The quantization libraries on a CUDA GPU, bf16 (issue 19): the lead runs this on a lent GPU.

    python benchmarks/gpu_quantize.py --out "$OUT"          # ~1-2 minutes on one GPU
    python benchmarks/gpu_quantize.py --out DIR --layers 16 --hidden 2048

Needs ``pip install torch`` (CUDA build) and ``pip install -e ".[quant]"``; optional candidates
(optimum-quanto, hqq) are tried when importable and recorded as not installed otherwise.

For each (library, format) — fp16-free bf16 baseline, torchao int8 weight-only, torchao int4
weight-only (tinygemm tile-packed, the GPU kernel), torchao int4 IntxWeightOnly (the CPU path),
bitsandbytes LLM.int8 and NF4 (``--all``: optimum-quanto int8/int4 too, whose CUDA extensions compile
on first use; hqq is left out: transformers 5.25 answers HqqConfig with NotImplementedError) — a random-init Llama (default
~1.1B-style layer: hidden 2048, 8 layers) is built once, saved, and loaded through transformers'
quantization config onto the GPU. Measured: does it run, median decode step (batch 1, 16-token
prompt, 32 steps after a warm-up), a batch-8 decode step, stored bytes of the decoder layers'
weights, and ``torch.cuda.max_memory_allocated`` after the load. Also: our own span path
(``SpanRunner(quantize=...)``) for int8 and nf4 on the same checkpoint, and whether its greedy
tokens equal transformers' with ``reference_config`` (the exactness contract, on the GPU).

Writes ``<out>/gpu_quantize.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEVICE = "cuda"
CANDIDATES = [("none", "bf16"), ("torchao", "int8"), ("torchao", "int4-tile"), ("torchao", "int4-intx"),
              ("bitsandbytes", "int8"), ("bitsandbytes", "nf4")]
SLOW_TO_BUILD = [("optimum.quanto", "int8"), ("optimum.quanto", "int4")]  # --all: JIT-compiles CUDA extensions


def config_for(lib: str, fmt: str):
    import transformers as T

    if lib == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return T.TorchAoConfig({"int8": Int8WeightOnlyConfig(),
                                "int4-tile": Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
                                "int4-intx": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}[fmt])
    if lib == "bitsandbytes":
        return (T.BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
                T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16))
    if lib == "optimum.quanto":
        return T.QuantoConfig(weights=fmt)
    if lib == "hqq":
        return T.HqqConfig(nbits=4, group_size=64)
    return None


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def decode_ms(model, batch: int, steps: int = 32) -> float:
    from transformers import DynamicCache

    ids = torch.randint(0, model.config.vocab_size, (batch, 16), device=DEVICE,
                        generator=torch.Generator(DEVICE).manual_seed(0))
    times = []
    with torch.no_grad():
        for rep in range(2):
            cache = DynamicCache(config=model.config)
            nxt = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(steps):
                _sync()
                t0 = time.perf_counter()
                nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                _sync()
                if rep:
                    times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def probe(path: str, lib: str, fmt: str) -> dict:
    from transformers import AutoModelForCausalLM

    from bloombee_nb.model.quantize import weight_bytes

    row = dict(library=lib, format=fmt)
    if lib != "none" and importlib.util.find_spec(lib.split(".")[0]) is None:
        return {**row, "ok": False, "error": "not installed"}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        kw = {} if lib == "none" else dict(quantization_config=config_for(lib, fmt))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE, **kw).eval()
        row.update(layers_weight_bytes=weight_bytes(model.model.layers),
                   max_allocated_bytes=torch.cuda.max_memory_allocated(),
                   decode_ms_b1=decode_ms(model, 1), decode_ms_b8=decode_ms(model, 8), ok=True)
        del model
    except Exception as exc:  # noqa: BLE001 — a library that cannot run is a result
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    print(row, flush=True)
    return row


def our_spans(path: str) -> list[dict]:
    """SpanRunner(quantize=fmt) on the GPU, all layers in one span, against transformers' reference."""
    from transformers import AutoModelForCausalLM

    from bloombee_nb.model.family import load_client_parts, load_config
    from bloombee_nb.model.quantize import reference_config
    from bloombee_nb.model.span import SpanRunner

    rows = []
    for fmt in ("int8", "nf4"):
        try:
            ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=DEVICE,
                                                       quantization_config=reference_config(fmt, torch.bfloat16)).eval()
            span = SpanRunner(path, 0, ref.config.num_hidden_layers, dtype=torch.bfloat16, device=DEVICE, quantize=fmt)
            ids = torch.randint(0, ref.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                want = ref.generate(ids.to(DEVICE), max_new_tokens=16, do_sample=False)[0, 16:].tolist()
            config, embed, norm, head, dtype = load_client_parts(Path(path), load_config(Path(path)), torch.bfloat16)
            embed, norm, head = embed.to(DEVICE), norm.to(DEVICE), head.to(DEVICE)
            span.open("s", 1, 64)
            got, x, pos = [], ids.to(DEVICE), 0
            times = []
            with torch.no_grad():
                for _ in range(16):
                    T = x.shape[1]
                    _sync()
                    t0 = time.perf_counter()
                    h = span.forward("s", embed(x), torch.arange(pos, pos + T, device=DEVICE)[None],
                                     torch.ones(1, T, dtype=torch.long))
                    _sync()
                    times.append(time.perf_counter() - t0)
                    nxt = head(norm(h[:, -1:])).argmax(-1)
                    got.append(int(nxt))
                    pos, x = pos + T, nxt
            rows.append(dict(format=fmt, exact=got == want, span_decode_ms=1e3 * statistics.median(times[1:]),
                             span_weight_bytes=span.weight_bytes, got=got, want=want))
            del ref, span
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(format=fmt, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="folder for gpu_quantize.json (e.g. $OUT)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--all", action="store_true", help="also optimum-quanto (compiles its CUDA kernels first)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_quantize.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 128 * 128,
                          num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                          num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp)
        rows = [probe(tmp, lib, fmt) for lib, fmt in CANDIDATES + (SLOW_TO_BUILD if args.all else [])]
        spans = our_spans(tmp)
    import transformers

    versions = {m: getattr(__import__(m), "__version__", None) for m in ("torchao", "bitsandbytes")
                if importlib.util.find_spec(m)}
    result = dict(command=" ".join(["python", *sys.argv]), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  transformers=transformers.__version__, python=platform.python_version(), **versions,
                  model=dict(layers=args.layers, hidden=args.hidden, intermediate=cfg.intermediate_size),
                  libraries=rows, our_spans=spans)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_quantize.json").write_text(json.dumps(result, indent=1))
    print("wrote", out / "gpu_quantize.json")


if __name__ == "__main__":
    main()

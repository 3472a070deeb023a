"""Quantized spans (issue 19): libraries compared, quality, memory per stage, and a model served quantized.

    python benchmarks/bench_quantize.py                  # every part, ~10 minutes on 2 shared cores
    python benchmarks/bench_quantize.py --parts libs memory

Parts (torch at 1 thread everywhere, as the other benchmarks):

- ``libs``: each candidate library through transformers' own quantization config on a random-init
  58M Llama (bench_pipeline's, with intermediate 1408 so that 4-bit blocks of 64 fit): does it load
  and run on this CPU, median decode step of the whole model, resident bytes the quantized load
  added, stored bytes of its linear weights. One subprocess per (library, format). torchao and
  bitsandbytes come with the project's ``quant`` extra; the other candidates only for this part:
  ``pip install optimum-quanto hqq`` (without them their rows say ``No module named …``).
- ``quality``: perplexity on tests/data/heldout.txt of the shipped target and of SmolLM2-135M (its
  GGUF file, when converted) at fp32/int8/nf4 — single-process transformers with
  ``reference_config(fmt)``, which the distributed spans equal token for token (tests/model/
  test_quantize.py) — and the greedy speculative acceptance rate of the shipped pair, the target's
  3 stages quantized on an embedded cluster, the draft in float on the client.
- ``memory``: one stage of 4 of the 58M model's layers per format, in its own process: resident
  bytes the span added after one forward step (RSS after − before, the library already imported)
  and its stored weights.
- ``fit``: the 58M model on 3 workers whose planner budgets hold 3 float layers in all (the model has
  8): the float plan is infeasible; the planner, allowed {float, int8, nf4} and given each format's
  measured bytes and speed, serves it quantized; measured per-token decode time against the
  plan's predicted latency.

Writes benchmarks/results/quantize.json and quantize.png; quantize.md is written by hand from them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, command, write_json  # noqa: E402

FORMATS = (None, "int8", "nf4")
HELDOUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "heldout.txt"
WORK = Path(os.environ.get("BLOOMBEE_BENCH_WORK", "/tmp/bloombee_bench_quantize"))
LIBS = [("none", "fp32"), ("torchao", "int8"), ("torchao", "int4"), ("bitsandbytes", "int8"),
        ("bitsandbytes", "nf4"), ("optimum.quanto", "int8"), ("optimum.quanto", "int4"), ("hqq", "int4")]


def synthetic_58m(folder: Path = WORK / "llama58m") -> Path:
    """bench_pipeline's 58M Llama with intermediate 1408 (a multiple of 64: NF4's block)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


# ---- libs: one subprocess per (library, format) -------------------------------------------------

def lib_config(lib: str, fmt: str):
    """transformers' quantization config for a candidate library and format."""
    import transformers as T

    if lib == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return T.TorchAoConfig(Int8WeightOnlyConfig() if fmt == "int8" else
                               IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    if lib == "bitsandbytes":
        return (T.BitsAndBytesConfig(load_in_8bit=True) if fmt == "int8" else
                T.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    if lib == "optimum.quanto":
        return T.QuantoConfig(weights=fmt)
    if lib == "hqq":
        return T.HqqConfig(nbits=4, group_size=64)
    return None


def lib_probe(lib: str, fmt: str, path: str) -> dict:
    """Runs in a subprocess: load through transformers' config, time 24 decode steps twice."""
    import psutil
    from transformers import AutoModelForCausalLM, DynamicCache

    from bloombee_nb.model.quantize import weight_bytes

    torch.set_num_threads(1)
    out = dict(library=lib, format=fmt)
    try:
        if lib != "none":
            __import__(lib)
        rss0 = psutil.Process().memory_info().rss
        kw = {} if lib == "none" else dict(quantization_config=lib_config(lib, fmt))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kw).eval()
        out["load_rss_bytes"] = psutil.Process().memory_info().rss - rss0
        out["layers_weight_bytes"] = weight_bytes(model.model.layers)
        ids = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(0))
        steps = []
        with torch.no_grad():  # optimum-quanto's 4-bit tensors fail under inference_mode
            for _ in range(2):
                cache = DynamicCache(config=model.config)
                nxt = model(ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                for _ in range(24):
                    t0 = time.perf_counter()
                    nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    steps.append(time.perf_counter() - t0)
        out.update(ok=True, decode_ms=1e3 * statistics.median(steps[24:]))
    except Exception as exc:  # noqa: BLE001 — a library that cannot run here is a result
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return out


def part_libs() -> list[dict]:
    path = synthetic_58m()
    rows = []
    for lib, fmt in LIBS:
        code = f"import json,sys; sys.path.insert(0,{str(Path(__file__).parent)!r}); import bench_quantize as b; " \
               f"print('RESULT', json.dumps(b.lib_probe({lib!r}, {fmt!r}, {str(path)!r})))"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        rows.append(json.loads(line[0][7:]) if line else dict(library=lib, format=fmt, ok=False,
                                                                  error=(p.stderr.strip().splitlines() or ["?"])[-1]))
        print(rows[-1], flush=True)
    return rows


# ---- quality: perplexity and acceptance ----------------------------------------------------------

def perplexity(path, fmt) -> float:
    """exp(mean NLL) of the held-out text, one window (the text is ~300 tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.model.quantize import reference_config

    kw = {} if fmt is None else dict(quantization_config=reference_config(fmt))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kw).eval()
    ids = AutoTokenizer.from_pretrained(path)(HELDOUT.read_text(), return_tensors="pt")["input_ids"]
    ids = ids[:, :model.config.max_position_embeddings]
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    return math.exp(float(loss))


def acceptance(cluster, fmt) -> dict:
    """Greedy speculation of the shipped pair (target quantized on 3 stages, float draft on the client)."""
    from transformers import AutoTokenizer

    import bloombee_nb as bb
    from bloombee_nb.generate.speculative import SpeculationSummary, load_draft
    from bloombee_nb.shipped import DRAFT_PATH, TARGET_PATH as MODEL_PATH

    tok = AutoTokenizer.from_pretrained(MODEL_PATH)
    model = bb.DistributedModelForCausalLM.from_pretrained(MODEL_PATH, cluster=cluster, spans=[(0, 2), (2, 4), (4, 6)],
                                                           quantize=fmt, swarm=False)
    draft = load_draft(DRAFT_PATH)
    rounds = []
    try:
        for prompt in ["def fibonacci(n):\n", "import os\nimport sys\n\n\ndef main(argv):\n",
                       "class Queue:\n    def __init__(self, maxsize=0):\n"]:
            ids = tok(prompt, return_tensors="pt")
            with model.inference_session(max_length=ids["input_ids"].shape[1] + 200) as s:
                model.generate(**ids, session=s, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id,
                               assistant_model=draft, tree_widths=(2, 2, 1, 1))
                rounds += list(s.rounds)
    finally:
        model.close()
    summary = SpeculationSummary.of(rounds)
    return dict(acceptance_rate=summary.acceptance_rate, acceptance_by_depth=list(summary.acceptance_by_depth))


def float_gguf_folder(gguf, folder):
    """transformers' own float reading of a GGUF file, saved as a plain safetensors checkpoint (transformers
    will not ``save_pretrained`` a GGUF-loaded model): what a single-process reference quantizes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: t.contiguous() for k, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(folder)
    return folder


def smollm2_folder(gguf: Path, folder: Path = WORK / "smollm2") -> Path:
    """transformers' own float reading of the GGUF file, saved once with its tokenizer."""
    from transformers import AutoTokenizer

    if not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        float_gguf_folder(gguf, folder)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def part_quality() -> dict:
    import bloombee_nb as bb
    from bloombee_nb.errors import CheckpointNotFoundError
    from bloombee_nb.model.gguf import smollm2_gguf
    from bloombee_nb.shipped import TARGET_PATH as MODEL_PATH

    models = {"tiny-llama (shipped target)": MODEL_PATH}
    try:
        models["SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"] = smollm2_folder(smollm2_gguf())
    except CheckpointNotFoundError as exc:
        print("SmolLM2 skipped:", exc)
    ppl = {name: {str(f): perplexity(p, f) for f in FORMATS} for name, p in models.items()}
    print(ppl, flush=True)
    with bb.connect(n_workers=3) as cluster:
        acc = {str(f): acceptance(cluster, f) for f in FORMATS}
    print(acc, flush=True)
    return dict(perplexity=ppl, speculative=acc)


# ---- memory: one stage per format, each in its own process ---------------------------------------

def memory_probe(path: str, fmt: str | None) -> dict:
    import gc

    import psutil

    from bloombee_nb.model.quantize import FORMATS as QF
    from bloombee_nb.model.span import SpanRunner

    if fmt:
        __import__(QF[fmt].module)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    span = SpanRunner(path, 0, 4, quantize=fmt)
    span.open("s", 1, 32)  # one step, so that every weight page has been read (float weights stay mapped)
    span.forward("s", torch.randn(1, 8, 512), torch.arange(8)[None], torch.ones(1, 8, dtype=torch.long))
    span.close("s")
    gc.collect()
    return dict(format=str(fmt), layers=4, rss_bytes=psutil.Process().memory_info().rss - rss0,
                weight_bytes=span.weight_bytes)


def part_memory() -> list[dict]:
    path = synthetic_58m()
    rows = []
    for fmt in FORMATS:
        code = f"import json,sys; sys.path.insert(0,{str(Path(__file__).parent)!r}); import bench_quantize as b; " \
               f"print('RESULT', json.dumps(b.memory_probe({str(path)!r}, {fmt!r})))"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        rows.append(json.loads([x for x in p.stdout.splitlines() if x.startswith("RESULT ")][0][7:]))
        print(rows[-1], flush=True)
    return rows


# ---- fit: a model too big at float, served quantized ---------------------------------------------

def part_fit() -> dict:
    import dataclasses

    import bloombee_nb as bb
    from bloombee_nb.cluster.planning import runtime_plan
    from bloombee_nb.cluster.profiling import profile_cluster
    from bloombee_nb.plan import Workload
    from bloombee_nb.plan.errors import InfeasiblePlanError

    from bloombee_nb.model.quantize import measure_formats

    path = synthetic_58m()
    workload = Workload(prompt_len=16, new_tokens=32)
    with bb.connect(n_workers=3) as cluster:
        profile = profile_cluster(cluster, str(path), progress=False)
        measured = {w.name: cluster.client.submit(measure_formats, str(path), workers=[w.address], pure=False).result()
                    for w in profile.workers}  # each worker measures its own formats' bytes and speed
        costs = next(iter(measured.values()))["layer_weight_bytes"]
        profile = profile.with_formats(costs, {n: m["format_decode_factor"] for n, m in measured.items()})
        budget = int(1.1 * profile.model.layer_weight_bytes)  # each worker: one float layer (and its KV)
        profile = dataclasses.replace(profile, workers=tuple(
            dataclasses.replace(w, ram_bytes=budget, accel_bytes=0, disk_bytes=0) for w in profile.workers))
        costs = dict(layer_weight_bytes=costs, float_layer_weight_bytes=profile.model.layer_weight_bytes,
                     format_decode_factor={n: m["format_decode_factor"] for n, m in measured.items()})
        try:
            runtime_plan(profile, workload)
            float_error = None
        except InfeasiblePlanError as exc:
            float_error = str(exc)
        plan = runtime_plan(profile, workload, formats=FORMATS)
        served = bb.DistributedModelForCausalLM.from_pretrained(str(path), cluster=cluster, plan=plan)
        try:
            info = served.chain.info()
            ids = torch.randint(0, 32000, (1, workload.prompt_len), generator=torch.Generator().manual_seed(1))
            per_token = []
            for _ in range(3):
                with served.inference_session(max_length=64) as s:
                    served.generate(ids, session=s, max_new_tokens=workload.new_tokens, do_sample=False)
                    per_token.append(statistics.median(t.wall_s for t in list(s.traces)[1:]))
        finally:
            served.close()
    return dict(format_costs=costs, worker_budget_bytes=budget, float_plan_error=float_error,
                plan=[dict(worker=s.worker, start=s.start, end=s.end, quantize=s.quantize, stage_s=s.stage_s)
                      for s in plan.stages],
                stages=[dict(start=i["start"], end=i["end"], quantize=i["quantize"], weight_bytes=i["weight_bytes"])
                        for i in info],
                predicted_latency_s=plan.latency_s, measured_per_token_s=statistics.median(per_token),
                measured_runs_s=per_token)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    libs = [r for r in result.get("libs", []) if r.get("ok")]
    if libs:
        ax = axes[0]
        names = [f"{r['library']}\n{r['format']}" for r in libs]
        ax.bar(names, [r["decode_ms"] for r in libs], color="tab:blue")
        ax.set_ylabel("decode step, ms (58M Llama, 1 thread)")
        ax.set_title("libraries on this CPU (via transformers)")
        ax.tick_params(axis="x", labelsize=7)
    if "memory" in result:
        ax = axes[1]
        rows = result["memory"]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["weight_bytes"] / 2**20 for r in rows], 0.4, label="stored weights")
        ax.bar([i + 0.2 for i in x], [r["rss_bytes"] / 2**20 for r in rows], 0.4, label="resident (RSS growth)")
        ax.set_xticks(list(x), [r["format"].replace("None", "fp32") for r in rows])
        ax.set_ylabel("MiB, one stage of 4 layers")
        ax.legend()
        ax.set_title("memory per stage")
    if "quality" in result:
        ax = axes[2]
        for name, ppl in result["quality"]["perplexity"].items():
            ax.plot([k.replace("None", "fp32") for k in ppl], list(ppl.values()), "o-", label=name[:24])
        ax.set_ylabel("perplexity, held-out text")
        ax.set_title("quality")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "quantize.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["libs", "quality", "memory", "fit"],
                    choices=["libs", "quality", "memory", "fit"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = RESULTS / "quantize.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result = {k: v for k, v in result.items() if k not in ("command", "machine")}
    for part in args.parts:
        t0 = time.perf_counter()
        result[part] = globals()[f"part_{part}"]()
        result[f"{part}_run"] = dict(command=command(), load_average=[round(x, 2) for x in os.getloadavg()])
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
        write_json("quantize", result)
    plot(result)


if __name__ == "__main__":
    main()

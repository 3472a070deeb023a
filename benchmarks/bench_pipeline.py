"""Loopback cost of the distributed pipeline: per-token decode latency, time to first token and
tokens/s on 1, 2 and 3 stages, against single-process transformers on the same checkpoint.

    python benchmarks/bench_pipeline.py                 # shipped tiny model
    python benchmarks/bench_pipeline.py --synthetic 58m # a random-init 58M-parameter Llama
    python benchmarks/bench_pipeline.py --synthetic 58m --device cuda --dtype bfloat16 --out DIR  # stages on a GPU

Writes benchmarks/results/pipeline_loopback[_<name>].json and a PNG plot beside it. Every stage
runs torch with 1 thread, and so does the transformers baseline, so the difference is the
pipeline's own overhead (frames, Dask actor calls, the client relaying between stages).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

import bloombee_nb as bb

RESULTS = Path(__file__).parent / "results"


def synthetic_checkpoint(folder: Path) -> str:
    """~58M parameters: the size of the Llama the Petals comparison used."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def greedy_steps(step, ids, n_new):
    """Run prefill + n_new-1 decode steps through ``step(ids) -> logits``; return (ttft_s, [decode_s])."""
    t0 = time.perf_counter()
    nxt = step(ids)[:, -1:].argmax(-1)
    ttft = time.perf_counter() - t0
    decode = []
    for _ in range(n_new - 1):
        t0 = time.perf_counter()
        nxt = step(nxt)[:, -1:].argmax(-1)
        decode.append(time.perf_counter() - t0)
    return ttft, decode


def bench_local(path, ids, n_new, repeats, device="cpu", dtype=torch.float32):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = ids.to(device)
    runs = []
    for _ in range(repeats + 1):  # first run is warm-up
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            runs.append(greedy_steps(lambda x: _synced(model(x, cache=cache, use_cache=True).logits), ids, n_new))
    return summarize(runs[1:], n_new)


def _synced(t):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t


def bench_distributed(cluster, path, n_stages, ids, n_new, repeats, relay, device="cpu", dtype=torch.float32):
    workers = cluster.worker_addresses()[:n_stages]
    kw = {} if device == "cpu" else {"device": device}
    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers, relay=relay,
                                                           dtype=dtype, **kw)
    runs, hop_overhead = [], []
    for r in range(repeats + 1):
        with model.inference_session(max_length=ids.shape[1] + n_new) as s:
            runs.append(greedy_steps(lambda x: model(x, cache=s, logits_to_keep=1).logits, ids, n_new))
            if r:  # per stage: client-observed chain time minus the workers' compute time
                hop_overhead += [(t.wall_s - sum(t.stage_compute_s)) / n_stages for t in list(s.traces)[1:]]
    out = summarize(runs[1:], n_new)
    out["hop_overhead_ms_median"] = 1e3 * statistics.median(hop_overhead)
    out["spans"] = model.placement.spans
    model.close()
    return out


def summarize(runs, n_new):
    decode = [d for _, ds in runs for d in ds]
    ttft = [t for t, _ in runs]
    total = [t + sum(ds) for t, ds in runs]
    return {"decode_ms_median": 1e3 * statistics.median(decode), "decode_ms_p90": 1e3 * sorted(decode)[int(0.9 * len(decode))],
            "ttft_ms_median": 1e3 * statistics.median(ttft), "tokens_per_s": n_new / statistics.median(total)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--synthetic", choices=["58m"], default=None)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="where the stages (and the single-process baseline) compute")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--relays", nargs="+", default=["chain", "star"])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory()
    if args.synthetic:
        path, name = synthetic_checkpoint(Path(tmp.name) / "m"), f"synthetic_{args.synthetic}"
    else:
        from bloombee_nb.shipped import default_model_path

        path = args.model or default_model_path()
        name = Path(path).name
    cfg = AutoModelForCausalLM.from_pretrained(path).config
    ids = torch.randint(10, cfg.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    result = {"model": name, "params": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters()),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads available, Python {platform.python_version()}",
              "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
              "device": args.device, "dtype": args.dtype, "load_average": os.getloadavg(),
              "transformers_single_process": bench_local(path, ids, args.new_tokens, args.repeats, args.device, dtype),
              "distributed": {}}
    with bb.connect(n_workers=3) as cluster:
        # one pass over every configuration first: whichever ran first on fresh workers measured up to 2.7 ms
        # slower per token than the same configuration later in the run (tiny-llama, 2-3 stages)
        for relay in args.relays:
            for n in (1, 2, 3):
                bench_distributed(cluster, path, n, ids, min(args.new_tokens, 16), 1, relay, args.device, dtype)
        for relay in args.relays:
            for n in (1, 2, 3):
                result["distributed"][f"{n}-{relay}"] = bench_distributed(cluster, path, n, ids, args.new_tokens,
                                                                         args.repeats, relay, args.device, dtype)
    base = result["transformers_single_process"]["decode_ms_median"]
    for key, r in result["distributed"].items():
        n = int(key.split("-")[0])
        r["added_ms_per_token"] = r["decode_ms_median"] - base
        r["added_ms_per_hop"] = r["added_ms_per_token"] / n
    stem = "pipeline_loopback" + ("" if name.startswith("tiny") else f"_{name}") + (
        "" if args.device == "cpu" else f"_{args.device.split(':')[0]}_{args.dtype}")
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    result["load_average_after"] = os.getloadavg()
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    plot(result, out / f"{stem}.png")
    print(json.dumps(result, indent=2))


def plot(result, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["transformers\n(1 process)"] + [k.replace("-", "\n") for k in result["distributed"]]
    rows = [result["transformers_single_process"], *result["distributed"].values()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for ax, key, title in zip(axes, ["decode_ms_median", "ttft_ms_median", "tokens_per_s"],
                              ["per-token decode latency (ms)", "time to first token (ms)", "tokens/s"]):
        ax.bar(labels, [r[key] for r in rows], color=["#888"] + ["#3b7dd8" if "chain" in k else "#d8893b"
                                                                for k in result["distributed"]])
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
    fig.suptitle(f"{result['model']} ({result['params'] / 1e6:.1f}M params) on loopback, "
                 f"prompt {result['prompt_len']}, {result['new_tokens']} new tokens", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()

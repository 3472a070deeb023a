"""The GPU check: stages on an accelerator, end to end through a real Dask cluster, and what they cost.

Run on a machine with a GPU by ``benchmarks/gpu_check.sh`` (which installs what that machine lacks
and runs the device tests first); on a CPU with ``--device cpu --quick`` to check the script itself.

1. **exactness** — a tiny Llama saved with ``save_pretrained`` is served by a real
   ``distributed.LocalCluster`` (2 worker processes, one stage each) with ``device=<--device>``,
   resident and with ``weight_offload=0.5`` (+ ``kv_offload=0.5``); greedy ``generate`` must equal
   transformers' greedy ``generate`` on the CPU token for token, for a few prompts (one padded
   batch). Each stage's ``info()`` must report the device.
2. **span timing** — a bigger synthetic Llama (default hidden 2048, MLP 5632, 8 layers, 32 heads
   / 8 KV heads) in bf16 and fp16, one :class:`SpanRunner` in this process on the device: decode
   ms/token at batch 1 after a 128-token prompt, for ``weight_offload`` 0 / 0.5 / 1 (streamed from
   the checkpoint on disk, page cache dropped), and whether the offloaded outputs equal the
   resident ones bit for bit.
3. **chain timing** — the bigger bf16 model through the cluster (2 stages of 4 layers), resident
   and ``weight_offload=0.5``: decode ms/token of ``generate`` (client on the CPU, frames over loopback).

Writes ``$OUT/gpu_check.json`` (``benchmarks/results/gpu_check.json`` when ``OUT`` is unset) and
exits non-zero when an exactness check fails or a section errors. Sections stop being started
once ``--budget-s`` has passed (the JSON says which were skipped).

    python benchmarks/gpu_check.py                   # on the GPU machine, ~2-4 min
    python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench_offload import drop_cache, fstype  # noqa: E402 — evict a checkpoint; the filesystem it is on
from tests.conftest import padded_batch  # noqa: E402 — the tests' prompts, here with this script's vocabulary

START = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f}s] {msg}", flush=True)


# ---- models --------------------------------------------------------------------------------------

def save_llama(path: Path, *, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int,
               vocab: int, dtype: torch.dtype, seed: int = 0, init_device: str = "cpu") -> Path:
    """A random Llama saved with ``save_pretrained`` (initialised on ``init_device``: fast on a GPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    drop_cache(path)
    return path


# ---- 1. exactness through the cluster ------------------------------------------------------------

def exactness(bbc, workdir: Path, device: str, report: dict) -> None:
    import bloombee_nb as bb
    from transformers import AutoModelForCausalLM

    path = save_llama(workdir / "tiny", hidden=64, layers=4, intermediate=128, heads=4, kv_heads=2, vocab=128,
                      dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    prompts = [([5], 1), ([12], 2), ([4, 9, 7], 3)]
    for name, kw in [("resident", {}), ("weight_offload=0.5", dict(weight_offload=0.5)),
                     ("weight_offload=0.5,kv_offload=0.5", dict(weight_offload=0.5, kv_offload=0.5))]:
        t0 = time.monotonic()
        model = bb.DistributedModelForCausalLM.from_pretrained(str(path), cluster=bbc, spans=[(0, 2), (2, 4)],
                                                               device=device, **kw)
        try:
            infos = model.chain.info()
            devices = [i["fast_tier"] for i in infos]
            row = {"config": name, "stage_devices": devices, "load_s": round(time.monotonic() - t0, 2),
                   "resident_weight_bytes": [i.get("resident_weight_bytes") for i in infos],
                   "offloaded_weight_bytes": [i.get("offloaded_weight_bytes") for i in infos],
                   "prompts": []}
            ok = all(str(d).split(":")[0] == torch.device(device).type for d in devices)
            for lengths, seed in prompts:
                ids, mask = padded_batch(lengths, seed, vocab=128)
                with torch.inference_mode():
                    want = ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
                t1 = time.monotonic()
                got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
                same = torch.equal(got, want)
                ok &= same
                row["prompts"].append({"lengths": lengths, "equal": same, "generate_s": round(time.monotonic() - t1, 3),
                                       **({} if same else {"got": got.tolist(), "want": want.tolist()})})
            row["ok"] = ok
        finally:
            model.close()
        report["exactness"].append(row)
        log(f"exactness {name}: {'OK' if row['ok'] else 'MISMATCH'} on {devices}")


# ---- 2. one span on the device ---------------------------------------------------------------------

def span_timing(path: Path, dtype: torch.dtype, device: str, args, report: dict) -> None:
    from bloombee_nb.model.span import SpanRunner

    resident_out = None
    for f in args.fractions:
        t0 = time.monotonic()
        r = SpanRunner(path, 0, args.layers, dtype=dtype, device=device, weight_offload=f)
        load_s = time.monotonic() - t0
        if r.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(r.device)
        D, P = r.hidden_size, args.prompt
        g = torch.Generator().manual_seed(11)
        prompt = torch.randn(1, P, D, generator=g).to(dtype)
        steps = [torch.randn(1, 1, D, generator=g).to(dtype) for _ in range(args.warmup + args.steps)]
        with torch.inference_mode():
            r.open("t", 1, P + len(steps) + 1)
            t1 = time.perf_counter()
            out = [r.forward("t", prompt, torch.arange(P)[None], torch.ones(1, P, dtype=torch.long))]
            prefill_s = time.perf_counter() - t1
            times, reads, waits = [], [], []
            for i, h in enumerate(steps):
                t1 = time.perf_counter()
                out.append(r.forward("t", h, torch.tensor([[P + i]]), torch.ones(1, 1, dtype=torch.long)))  # back on CPU: synced
                dt = time.perf_counter() - t1
                if i >= args.warmup:
                    times.append(dt)
                    if r.streamer:
                        reads.append(r.streamer.last.read_s)
                        waits.append(r.streamer.last.wait_s)
        info = r.info()
        same = None
        if f == 0:
            resident_out = out
        elif resident_out is not None:
            same = all(torch.equal(a, b) for a, b in zip(out, resident_out))
        row = {"dtype": str(dtype).removeprefix("torch."), "weight_offload": f, "device": info["fast_tier"],
               "decode_ms_per_token": round(statistics.median(times) * 1e3, 3),
               "decode_ms_min": round(min(times) * 1e3, 3), "prefill_ms": round(prefill_s * 1e3, 2),
               "load_s": round(load_s, 2), "bit_identical_to_resident": same,
               "read_ms_per_step": round(statistics.median(reads) * 1e3, 3) if reads else 0.0,
               "wait_ms_per_step": round(statistics.median(waits) * 1e3, 3) if waits else 0.0,
               **{k: info[k] for k in ("resident_weight_bytes", "offloaded_weight_bytes", "offload_buffer_bytes",
                                       "offload_staging_bytes", "reserved_kv_bytes")}}
        if r.device.type == "cuda":
            row["peak_device_bytes"] = torch.cuda.max_memory_allocated(r.device)
        r.release()
        del r, out
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        report["span_timing"].append(row)
        log(f"span {row['dtype']} f={f}: {row['decode_ms_per_token']} ms/token (read {row['read_ms_per_step']} ms, "
            f"wait {row['wait_ms_per_step']} ms), prefill {row['prefill_ms']} ms, identical={same}")


# ---- 3. the chain through the cluster --------------------------------------------------------------

def chain_timing(bbc, path: Path, device: str, args, report: dict) -> None:
    import bloombee_nb as bb

    half = args.layers // 2
    ids, mask = padded_batch([args.prompt], 5, vocab=args.vocab)
    for name, kw in [("resident", {}), ("weight_offload=0.5", dict(weight_offload=0.5))]:
        t0 = time.monotonic()
        model = bb.DistributedModelForCausalLM.from_pretrained(str(path), cluster=bbc, dtype="bfloat16",
                                                               spans=[(0, half), (half, args.layers)],
                                                               device=device, **kw)
        try:
            load_s = time.monotonic() - t0
            gen = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            model.generate(ids, max_new_tokens=2, **gen)  # warm-up: first calls, CUDA kernels
            t1 = time.monotonic()
            model.generate(ids, max_new_tokens=1, **gen)
            t_one = time.monotonic() - t1
            t1 = time.monotonic()
            model.generate(ids, max_new_tokens=1 + args.steps, **gen)
            t_many = time.monotonic() - t1
            devices = [i["fast_tier"] for i in model.chain.info()]
        finally:
            model.close()
        row = {"config": name, "dtype": "bfloat16", "stage_devices": devices, "load_s": round(load_s, 2),
               "prefill_plus_one_s": round(t_one, 3),
               "decode_ms_per_token": round((t_many - t_one) / args.steps * 1e3, 3)}
        report["chain_timing"].append(row)
        log(f"chain {name}: {row['decode_ms_per_token']} ms/token on {devices}")


# ---- main ------------------------------------------------------------------------------------------

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="where the stages compute (cuda, cuda:0, cpu)")
    ap.add_argument("--quick", action="store_true", help="a small timing model (CPU check of the script)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--fractions", default="0,0.5,1")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where checkpoints are written (default: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=300, help="start no new section after this many seconds")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: exactness,span,chain")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab = 256, 512, 4, 4, 2, 1024
        args.prompt, args.steps, args.warmup = 32, 4, 1
    args.fractions = [float(x) for x in args.fractions.split(",")]
    args.dtypes = [getattr(torch, x) for x in args.dtypes.split(",") if x]
    args.skip = {x for x in args.skip.split(",") if x}
    return args


def environment(workdir: Path, device: str) -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
           "transformers": transformers.__version__, "cpus": os.cpu_count(), "device_asked": device,
           "workdir_fs": fstype(workdir.resolve())}
    for mod in ("dask", "distributed", "blosc2"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[mod] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_bytes=p.total_memory, gpus=torch.cuda.device_count())
    return env


def main(argv=None) -> int:
    args = parse(argv)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / "gpu_check.json"
    workdir = Path(tempfile.mkdtemp(prefix="bb-gpu-check-", dir=args.workdir))
    report = {"env": environment(workdir, args.device), "args": {k: (str(v) if k == "dtypes" else v)
                                                               for k, v in vars(args).items() if k != "skip"},
              "exactness": [], "span_timing": [], "chain_timing": [], "errors": [], "skipped": [], "notes": []}
    log(f"env: {json.dumps(report['env'])}")
    init_device = "cuda" if args.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    big = {}
    bbc = local = None

    def section(name, fn, *a):
        if name in args.skip or time.monotonic() - START > args.budget_s:
            report["skipped"].append(name)
            log(f"skipped {name}")
            return
        try:
            fn(*a)
        except Exception as e:  # noqa: BLE001 - recorded, the other sections still run
            report["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-4000:]})
            log(f"ERROR in {name}: {type(e).__name__}: {e}")
        finally:
            out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")  # whatever there is so far

    def start_cluster():
        nonlocal bbc, local
        from distributed import LocalCluster

        import bloombee_nb as bb
        t0 = time.monotonic()
        local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                             silence_logs=logging.WARNING)
        bbc = bb.connect(local.scheduler_address)
        bbc.wait_for_workers(2, timeout_s=120)
        report["env"]["cluster_start_s"] = round(time.monotonic() - t0, 2)
        log(f"cluster up at {local.scheduler_address} in {report['env']['cluster_start_s']} s")

    def make_big():
        for dt in args.dtypes:
            t0 = time.monotonic()
            name = str(dt).removeprefix("torch.")
            big[dt] = save_llama(workdir / f"big-{name}", hidden=args.hidden, layers=args.layers,
                                 intermediate=args.intermediate, heads=args.heads, kv_heads=args.kv_heads,
                                 vocab=args.vocab, dtype=dt, init_device=init_device)
            size = sum(f.stat().st_size for f in big[dt].glob("*.safetensors"))
            report["env"][f"big_{name}_bytes"] = size
            log(f"saved the {name} model ({size / 2**20:.0f} MiB) in {time.monotonic() - t0:.1f} s")

    try:
        if not {"exactness", "chain"} <= args.skip:
            section("cluster", start_cluster)
        if bbc is not None:
            section("exactness", exactness, bbc, workdir, args.device, report)
        section("checkpoints", make_big)
        for dt in args.dtypes:
            if dt in big:
                section("span", span_timing, big[dt], dt, args.device, args, report)
        if bbc is not None and torch.bfloat16 in big:
            section("chain", chain_timing, bbc, big[torch.bfloat16], args.device, args, report)
    finally:
        if bbc is not None:
            bbc.close()
        if local is not None:
            local.close()
        shutil.rmtree(workdir, ignore_errors=True)
    ok = (not report["errors"] and bool(report["exactness"]) and all(r["ok"] for r in report["exactness"])
          and all(r["bit_identical_to_resident"] is not False for r in report["span_timing"]))
    report["ok"], report["elapsed_s"] = ok, round(time.monotonic() - START, 1)
    out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_tables(report)
    log(f"{'OK' if ok else 'FAILED'}: wrote {out_file}")
    return 0 if ok else 1


def print_tables(report: dict) -> None:
    if report["span_timing"]:
        print("\n| dtype | weight_offload | device | decode ms/token | read ms | wait ms | prefill ms | identical |")
        print("|---|---:|---|---:|---:|---:|---:|---|")
        for r in report["span_timing"]:
            print(f"| {r['dtype']} | {r['weight_offload']} | {r['device']} | {r['decode_ms_per_token']} | "
                  f"{r['read_ms_per_step']} | {r['wait_ms_per_step']} | {r['prefill_ms']} | {r['bit_identical_to_resident']} |")
    if report["chain_timing"]:
        print("\n| chain | decode ms/token | stages |")
        print("|---|---:|---|")
        for r in report["chain_timing"]:
            print(f"| {r['config']} | {r['decode_ms_per_token']} | {r['stage_devices']} |")
    for e in report["errors"]:
        print(f"\nERROR in {e['section']}:\n{e['traceback']}")
    print(flush=True)


if __name__ == "__main__":
    sys.exit(main())

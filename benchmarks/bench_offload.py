"""Weight offloading in one span: measured cost per decode token and per prefill, against the planner.

A synthetic Llama (``--family`` picks another decoder family of ``model/family.py``'s ADAPTERS
table, whose layers may live elsewhere than ``model.layers``; default: 8 layers, hidden 512, MLP 1408, 8 heads / 2 KV heads, fp32: 11.3 MB
per layer, 90 MB of layer weights) is saved with ``save_pretrained`` to a folder on disk and run
in ONE :class:`~bloombee_nb.model.span.SpanRunner` in this process (no cluster) for
``weight_offload`` in {0, 0.25, 0.5, 0.75, 1}, with and without prefetch:

* decode: batch 1 after a ``--context``-token prompt, the median of ``--steps`` steps, taken in
  bursts of 8 per configuration (the first of each burst not counted: it follows the other
  configurations' bursts, an idle gap);
* prefill: a ``--prompt``-token prompt at batch 1, the median of ``--repeats`` runs.

Torch computes on one thread; the prefetch reader is a second thread. All configurations are
built up front, each on its own copy of the checkpoint (one runner's mapped resident layers must
not serve another's "disk" reads from the page cache), and run interleaved (a burst of decode
steps, later one prefill, of each in turn), so the shared machine's drifting load and disk speed
hit them alike. Every copy is dropped from the page cache before the sweep, and each runner drops
an offloaded layer's pages right after reading it (``drop_page_cache=True``), so offloaded reads
come from the disk. One extra configuration keeps the page cache (``drop_page_cache=False``) to show what happens without the drop.

Predictions (``bloombee_nb/plan/cost.py``, the formulas the DP plans with), from a profile
built here: per-layer decode/prefill compute from the resident (f = 0) run, disk read bandwidth
from ``cluster.profiling._disk_read_speed`` (what ``profile_cluster`` would feed the planner):

* planner: ``stage_cost(...).compute_s + offload_s`` = max(t_c, t_read) for decode,
  ``prefill_stage_s`` = max(compute, read) for prefill; the fraction priced is the one that runs
  (``n_off / n`` layers);
* serial (no prefetch; not a planner mode): t_c + t_read;
* schedule: the runtime's own two-buffer schedule (offloaded layers last, read j+1 starts when
  layer j starts computing) with the same t_c and read bandwidth — what one-layer lookahead can
  hide, as opposed to the planner's full overlap.

A second interleaved sweep idles ``--gap-ms`` (30) before each decode step, as a stage in a chain
does while the token is elsewhere; the stage reads its next step's first offloaded layer meanwhile.

A small KV-offload run (``kv_offload`` in {0, 0.5, 1}, all weights resident, decode at
``--kv-context`` positions) is reported measured only (the cold KV file is page-cache backed).

    python benchmarks/bench_offload.py            # ~6 min on 2 shared cores
    python benchmarks/bench_offload.py --quick
    python benchmarks/bench_offload.py --replot    # md + png again from results/offload.json
    python benchmarks/bench_offload.py --family bloom --quick   # another layout (results/offload-bloom.*)

Writes benchmarks/results/offload.{json,md,png} (another family: offload-<family>.*). Mixtral and
Qwen3-MoE store their experts per expert and refuse weight_offload (their KV still offloads).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from bloombee_nb.cluster.profiling import _disk_read_speed
from bloombee_nb.model.family import ADAPTERS
from bloombee_nb.model.offload import n_offloaded
from bloombee_nb.model.span import SpanRunner
from bloombee_nb.plan import cost
from bloombee_nb.plan.profile import ModelProfile, WorkerProfile, Workload

RESULTS = Path(__file__).parent / "results"
FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _stem(family: str) -> str:
    """Results file name: the Llama run keeps its historical name."""
    return "offload" if family == "llama" else f"offload-{family}"


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, family: str = "llama") -> Path:
    """A random-init checkpoint of ``family`` (the shared argument names are mapped by each config's
    attribute_map: BLOOM's n_layer, Falcon's num_kv_heads, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, vocab_size=256, hidden_size=hidden, intermediate_size=intermediate,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                               max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(folder)
    drop_cache(folder)
    return folder


def drop_cache(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def rss() -> int:
    return psutil.Process().memory_info().rss


def sweep(path: Path, n_layers: int, configs: list[dict], args, context: int | None = None,
          prefill: bool = True, gap_s: float = 0.0, burst: int = 8) -> list[dict]:
    """Measure ``configs`` (SpanRunner kwargs) *interleaved*, so the shared machine's drifting load and
    disk speed hit all alike: each runner in turn takes a burst of ``burst`` decode steps (the first
    of a burst, which follows the other runners' bursts, is not counted), and later one prefill.

    ``gap_s = 0``: steps back to back, as at a pipeline's bottleneck stage. ``gap_s > 0``: the runner
    idles that long before each step, as a stage does while the token is in the rest of the chain;
    the idle time is not counted."""
    gc.collect()
    ctx = context or args.context
    # one copy of the checkpoint per runner: a runner's mapped resident layers would otherwise keep
    # those pages in the page cache for the runners that offload them
    copies = [_copy(path, i) for i in range(len(configs))]
    runners = [SpanRunner(cp, 0, n_layers, **c) for cp, c in zip(copies, configs)]
    d = runners[0].hidden_size
    g = torch.Generator().manual_seed(0)
    res = [{"decode": [], "read": [], "first": [], "wait": [], "prefill": []} for _ in configs]
    with torch.inference_mode():
        for r in runners:
            r.open("d", 1, ctx + (-(-args.steps // (burst - 1))) * burst)
            r.forward("d", torch.randn(1, ctx, d, generator=g), torch.arange(ctx)[None],
                      torch.ones(1, ctx, dtype=torch.long))
        pos = ctx
        for _ in range(-(-args.steps // (burst - 1))):
            xs = torch.randn(burst, 1, 1, d, generator=g)
            for r, out in zip(runners, res):
                for i in range(burst):
                    time.sleep(gap_s)
                    t0 = time.perf_counter()
                    r.forward("d", xs[i], torch.tensor([[pos + i]]), torch.ones(1, 1, dtype=torch.long))
                    if i:
                        out["decode"].append(time.perf_counter() - t0)
                        out["read"].append(r.streamer.last.read_s if r.streamer else 0.0)
                        out["wait"].append(r.streamer.last.wait_s if r.streamer else 0.0)
                        out["first"].append(r.streamer.last.first_read_s if r.streamer else 0.0)
            pos += burst
        cached = [r.streamer.cached_fraction() if r.streamer else None for r in runners]
        for _ in range(args.repeats if prefill else 0):
            x = torch.randn(1, args.prompt, d, generator=g)
            for r, out in zip(runners, res):
                r.open("p", 1, args.prompt)
                t0 = time.perf_counter()
                r.forward("p", x, torch.arange(args.prompt)[None], torch.ones(1, args.prompt, dtype=torch.long))
                out["prefill"].append(time.perf_counter() - t0)
                r.close("p")
    rows = []
    for c, r, out, cf in zip(configs, runners, res, cached):
        info = r.info()
        f = c.get("weight_offload", 0.0)
        row = {"weight_offload": f, "offloaded_layers": n_offloaded(f, n_layers),
               "prefetch": c.get("offload_prefetch", True), "reader": c.get("offload_reader", "pread"),
               "drop_page_cache": c.get("drop_page_cache", True), "kv_offload": c.get("kv_offload", 0.0),
               "context": ctx, "decode_s": statistics.median(out["decode"]), "decode_s_iqr": _iqr(out["decode"]),
               "read_s_per_step": statistics.median(out["read"]), "wait_s_per_step": statistics.median(out["wait"]),
               "first_layer_read_s": statistics.median(out["first"]),
               "page_cache_fraction_after": cf,
               "resident_weight_bytes": info["weight_bytes"] - info["offloaded_weight_bytes"],
               "buffer_bytes": info["offload_buffer_bytes"]}
        if out["prefill"]:
            row["prefill_s"] = statistics.median(out["prefill"])
            row["prefill_s_iqr"] = _iqr(out["prefill"])
        rows.append(row)
        r.release()
    del runners
    gc.collect()
    for cp in copies:
        shutil.rmtree(cp)
    return rows


def _copy(path: Path, i: int) -> Path:
    dst = path.parent / f"{path.name}-copy{i}"
    shutil.copytree(path, dst)
    drop_cache(dst)
    return dst


def rss_growth(path: Path, n_layers: int, f: float, args) -> int:
    """RSS growth of a fresh process holding one runner with ``weight_offload=f``, after a prefill
    and a few decode steps (a fresh process: memory freed by earlier runners stays in this one's heap)."""
    out = subprocess.run([sys.executable, __file__, "--rss-probe", str(path), str(n_layers), str(f), str(args.context)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def _rss_probe(path: str, n_layers: int, f: float, context: int) -> None:
    torch.set_num_threads(1)
    warm = SpanRunner(path, 0, 1)  # code paths warm before the baseline, on the checkpoint's first layer
    with torch.inference_mode():   # (the runner calls each family's layer its own way: rotary, ALiBi, ...)
        warm.open("w", 1, 8)
        warm.forward("w", torch.randn(1, 4, warm.hidden_size), torch.arange(4)[None], torch.ones(1, 4, dtype=torch.long))
    warm.release()
    del warm
    gc.collect()
    rss0 = rss()
    r = SpanRunner(path, 0, n_layers, weight_offload=f)
    with torch.inference_mode():
        r.open("d", 1, context + 8)
        r.forward("d", torch.randn(1, context, r.hidden_size), torch.arange(context)[None],
                  torch.ones(1, context, dtype=torch.long))
        for i in range(4):
            r.forward("d", torch.randn(1, 1, r.hidden_size), torch.tensor([[context + i]]),
                      torch.ones(1, 1, dtype=torch.long))
        r.streamer and r.streamer.idle()
    print(rss() - rss0)


def _iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return 0.0
    q = statistics.quantiles(xs, n=4)
    return q[2] - q[0]


def schedule_s(n_res: int, n_off: int, c: float, r: float, head_start_s: float = 0.0) -> float:
    """The runtime's two-buffer schedule: resident layers, then offloaded ones; read 0 starts when
    the previous step ended (``head_start_s`` before this one starts), read j+1 when layer j starts
    computing (its buffer's previous user has finished)."""
    t, read_end = n_res * c, max(0.0, r - head_start_s)
    for j in range(n_off):
        start = max(t, read_end)
        if j + 1 < n_off:
            read_end = start + r
        t = start + c
    return t


def predict(rows: list[dict], n_layers: int, layer_bytes: int, disk_bps: float, args, gap_s: float = 0.0) -> None:
    base = next(x for x in rows if x["weight_offload"] == 0.0)
    t_layer = base["decode_s"] / n_layers
    t_prefill_layer = base.get("prefill_s", 0.0) / n_layers
    worker = WorkerProfile(name="this-machine", address="local", decode_layer_s={1: t_layer},
                           prefill_layer_s={args.prompt: t_prefill_layer} if t_prefill_layer else {},
                           ram_bytes=1 << 40, disk_bytes=1 << 40,
                           disk_read_bytes_per_s=disk_bps)
    model = ModelProfile("synthetic", n_layers, layer_bytes, 0, 1)
    # the bandwidth the runtime's reads actually reach: reads without prefetch (no CPU contention)
    serial = [x for x in rows if not x["prefetch"] and x["read_s_per_step"] > 0]
    runtime_bps = statistics.median(x["offloaded_layers"] * layer_bytes / x["read_s_per_step"] for x in serial)
    fitted = dataclasses.replace(worker, disk_read_bytes_per_s=runtime_bps)
    wl = Workload(batch=1, prompt_len=args.prompt, new_tokens=args.steps)
    for x in rows:
        n_off = x["offloaded_layers"]
        f = n_off / n_layers  # what runs: whole layers
        sc = cost.stage_cost(worker, model, wl, n_layers, 1, f, 0.0)
        read = float(cost.offload_read_s(worker, sc.tiers, 0.0))
        x["predicted_decode_s"] = float(sc.compute_s + sc.offload_s)
        fit = cost.stage_cost(fitted, model, wl, n_layers, 1, f, 0.0)
        x["predicted_decode_runtime_bw_s"] = float(fit.compute_s + fit.offload_s)
        x["runtime_read_bytes_per_s"] = runtime_bps
        x["predicted_decode_serial_s"] = float(sc.compute_s) + read
        x["predicted_decode_schedule_s"] = schedule_s(n_layers - n_off, n_off, t_layer, layer_bytes / disk_bps,
                                                      gap_s if x["prefetch"] else 0.0)
        if "prefill_s" not in x:
            continue  # the chain-like sweep measures decode only
        x["predicted_prefill_s"] = cost.prefill_stage_s(worker, model, wl, n_layers, f, 0.0)
        x["predicted_prefill_serial_s"] = n_layers * t_prefill_layer + read
        x["predicted_prefill_schedule_s"] = schedule_s(n_layers - n_off, n_off, t_prefill_layer,
                                                       layer_bytes / disk_bps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--kv-context", type=int, default=1024)
    ap.add_argument("--gap-ms", type=float, default=30.0, help="idle time before each step in the chain-like sweep")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (a disk, not tmpfs)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--family", default="llama", choices=sorted(ADAPTERS),
                    help="decoder family of the synthetic model (results: offload-<family>.* unless llama)")
    ap.add_argument("--replot", action="store_true", help="rewrite the md and png from results/offload.json")
    args = ap.parse_args()
    if args.replot:
        d = json.loads((RESULTS / f"{_stem(args.family)}.json").read_text())
        write_md(d["meta"], d["rows"], d["no_page_cache_drop"], d["kv"], d["chain_like"], d["gap_ms"])
        plot(d["meta"], d["rows"], d["chain_like"], d["gap_ms"])
        return
    if args.quick:
        args.steps, args.repeats = 8, 2
    torch.set_num_threads(1)
    RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or tempfile.gettempdir()) as tmp:
        path = make_model(Path(tmp) / f"synthetic-{args.family}", args.layers, args.hidden, args.intermediate,
                          args.family)
        disk = [_disk_read_speed() for _ in range(3)]
        configs = [dict(weight_offload=f, offload_prefetch=pf, offload_reader=rd)
                   for rd, pf in (("pread", True), ("pread", False), ("mmap", True)) for f in FRACTIONS
                   if f > 0.0 or (rd, pf) == ("pread", True)]  # f = 0 reads nothing: one row
        configs.append(dict(weight_offload=1.0, drop_page_cache=False))  # what the drop is for
        rows = sweep(path, args.layers, configs, args)
        no_drop = rows.pop()
        disk += [_disk_read_speed() for _ in range(3)]
        disk_bps = statistics.median(disk)  # the shared disk's speed drifts: probes before and after
        for x in rows:
            print(_line(x), flush=True)
        for x in rows:
            if x["reader"] == "pread" and x["prefetch"]:
                x["rss_growth_bytes"] = rss_growth(path, args.layers, x["weight_offload"], args)
        print("no page-cache drop:", _line(no_drop), flush=True)
        gap_configs = [dict(weight_offload=f, offload_prefetch=pf) for pf in (True, False) for f in FRACTIONS
                       if pf or f > 0.0]
        gap_rows = sweep(path, args.layers, gap_configs, args, prefill=False, gap_s=args.gap_ms / 1e3)
        for x in gap_rows:
            print(f"gap {args.gap_ms} ms:", _line(x), flush=True)
        kv_rows = sweep(path, args.layers, [dict(kv_offload=k) for k in (0.0, 0.5, 1.0)], args,
                        context=args.kv_context, prefill=False)
        for x in kv_rows:
            print("kv", x["kv_offload"], f"{x['decode_s'] * 1e3:.2f} ms/token", flush=True)
        probe = SpanRunner(path, 0, args.layers)
        layer_bytes = probe.weight_bytes // args.layers
        del probe
        fs, ra_kb = fstype(path), _read_ahead_kb(path)
    predict(rows, args.layers, layer_bytes, disk_bps, args)
    predict(gap_rows, args.layers, layer_bytes, disk_bps, args, gap_s=args.gap_ms / 1e3)
    meta = {"model": f"synthetic {args.family}: {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, "
                     "8 heads / 2 KV heads, fp32",
            "layer_bytes": layer_bytes, "n_layers": args.layers, "disk_read_bytes_per_s": disk_bps,
            "disk_read_samples_bytes_per_s": disk,
            "filesystem": fs, "read_ahead_kb": ra_kb, "context": args.context, "prompt": args.prompt, "steps": args.steps,
            "repeats": args.repeats, "torch_threads": 1, "loadavg_after": os.getloadavg(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "family": args.family,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    (RESULTS / f"{_stem(args.family)}.json").write_text(json.dumps({"meta": meta, "rows": rows, "no_page_cache_drop": no_drop,
                                                      "kv": kv_rows, "gap_ms": args.gap_ms, "chain_like": gap_rows},
                                                     indent=2) + "\n")
    write_md(meta, rows, no_drop, kv_rows, gap_rows, args.gap_ms)
    plot(meta, rows, gap_rows, args.gap_ms)


def _read_ahead_kb(path: Path) -> int | None:
    """The kernel's readahead window for the block device holding ``path`` (Linux sysfs)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (base / "queue" / "read_ahead_kb", base / ".." / "queue" / "read_ahead_kb"):
        if q.is_file():
            return int(q.read_text())
    return None


def fstype(path: Path) -> str:
    best = ("", "?")
    for p in psutil.disk_partitions(all=True):
        if str(path).startswith(p.mountpoint) and len(p.mountpoint) > len(best[0]):
            best = (p.mountpoint, p.fstype)
    return best[1]


def _line(x: dict) -> str:
    s = (f"f={x['weight_offload']:.2f} ({x['offloaded_layers']} layers) {x['reader']} prefetch={x['prefetch']}: "
         f"decode {x['decode_s'] * 1e3:.2f} ms/token")
    if "prefill_s" in x:
        s += f", prefill {x['prefill_s'] * 1e3:.1f} ms"
    return s + f", read {x['read_s_per_step'] * 1e3:.2f} ms, wait {x['wait_s_per_step'] * 1e3:.2f} ms"


def _gbps(x: dict, meta: dict) -> str:
    if not x["read_s_per_step"]:
        return ""
    return f"{x['offloaded_layers'] * meta['layer_bytes'] / x['read_s_per_step'] / 1e9:.2f}"


def _gap(measured: float, predicted: float) -> str:
    return f"{(measured - predicted) / predicted:+.0%}"


def write_md(meta: dict, rows: list[dict], no_drop: dict, kv_rows: list[dict], gap_rows: list[dict],
             gap_ms: float) -> None:
    mb = meta["layer_bytes"] / 1e6
    lines = [
        "# Weight offloading in one span: measured vs the planner's prediction", "",
        f"**Machine: {meta['cores']} CPU cores shared with other jobs (x86_64; load average "
        f"{meta['loadavg_after'][0]:.1f} / {meta['loadavg_after'][1]:.1f} / {meta['loadavg_after'][2]:.1f} at the end "
        f"of the run), torch {meta['torch']} on one compute thread plus one prefetch thread. Timings are noisy: "
        "the JSON has each median's interquartile range.** "
        f"Model: {meta['model']} ({mb:.1f} MB per layer, {mb * meta['n_layers']:.0f} MB of layer weights), "
        f"checkpoint on {meta['filesystem']} (a virtual disk shared with other jobs). Disk read bandwidth "
        f"measured by `profiling._disk_read_speed` (64 MiB, 8 MiB reads, page cache dropped): median "
        f"{meta['disk_read_bytes_per_s'] / 1e9:.2f} GB/s over {len(meta['disk_read_samples_bytes_per_s'])} "
        f"probes taken before and after the sweep (range {min(meta['disk_read_samples_bytes_per_s']) / 1e9:.2f}–"
        f"{max(meta['disk_read_samples_bytes_per_s']) / 1e9:.2f} GB/s). "
        f"Decode: batch 1 after {meta['context']} tokens, median of {meta['steps']} steps; prefill: "
        f"{meta['prompt']} tokens, median of {meta['repeats']}. All configurations run *interleaved* (one "
        "burst of steps of each in turn, each on its own copy of the checkpoint) so the shared machine's drifting load "
        "hits them alike. The offloaded layers "
        "are the last `round(f·n)` (half up) of the span; the checkpoint's page cache is dropped before the "
        "sweep and after every offloaded layer is read.", "",
        "Predictions: *planner* = `plan/cost.py` (decode: `stage_cost` = max(t_c, t_read); prefill: "
        "`prefill_stage_s`), priced with t_c from the f = 0 row and the probed disk bandwidth (what "
        "`profile_cluster` would give the planner); *planner, runtime bw* = the same formula with the "
        f"bandwidth the runtime's own reads reached without prefetch "
        f"({rows[-1].get('runtime_read_bytes_per_s', 0) / 1e9:.2f} GB/s, median of the no-prefetch rows); *serial* = "
        "t_c + t_read (no overlap); *schedule* = the runtime's two-buffer, one-layer-lookahead schedule "
        "with the probed bandwidth. Gap = (measured − predicted) / predicted, against *serial* for the "
        "no-prefetch rows.", "",
        "## Decode (s per token, batch 1)", "",
        "| f | offloaded layers | reader | prefetch | measured ms | planner ms | gap | planner, runtime bw ms | "
        "serial ms | schedule ms | read ms/step | read GB/s | wait ms/step |",
        "|---:|---:|:---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        pred = x["predicted_decode_s"] if x["prefetch"] else x["predicted_decode_serial_s"]
        lines.append(
            f"| {x['weight_offload']:.2f} | {x['offloaded_layers']} | {x['reader']} | {'on' if x['prefetch'] else 'off'} | "
            f"{x['decode_s'] * 1e3:.2f} | {x['predicted_decode_s'] * 1e3:.2f} | {_gap(x['decode_s'], pred)}"
            f"{'' if x['prefetch'] else ' (vs serial)'} | {x['predicted_decode_runtime_bw_s'] * 1e3:.2f} | "
            f"{x['predicted_decode_serial_s'] * 1e3:.2f} | "
            f"{x['predicted_decode_schedule_s'] * 1e3:.2f} | {x['read_s_per_step'] * 1e3:.2f} | "
            f"{_gbps(x, meta)} | {x['wait_s_per_step'] * 1e3:.2f} |")
    lines += ["", f"## Decode with {gap_ms:.0f} ms idle before each step (a stage in a chain)", "",
              "The token spends that time in the rest of the chain; the stage reads its first offloaded layer for "
              "the next step meanwhile. Measured in a separate interleaved sweep (its own f = 0 row prices it).", "",
              "| f | offloaded layers | prefetch | measured ms | planner ms | gap | schedule ms | wait ms/step |",
              "|---:|---:|:---:|---:|---:|---:|---:|---:|"]
    for x in gap_rows:
        pred = x["predicted_decode_s"] if x["prefetch"] else x["predicted_decode_serial_s"]
        lines.append(f"| {x['weight_offload']:.2f} | {x['offloaded_layers']} | {'on' if x['prefetch'] else 'off'} | "
                     f"{x['decode_s'] * 1e3:.2f} | {x['predicted_decode_s'] * 1e3:.2f} | {_gap(x['decode_s'], pred)}"
                     f"{'' if x['prefetch'] else ' (vs serial)'} | {x['predicted_decode_schedule_s'] * 1e3:.2f} | "
                     f"{x['wait_s_per_step'] * 1e3:.2f} |")
    serial = [x for x in rows if not x["prefetch"] and x["reader"] == "pread"]
    first = statistics.median(x["first_layer_read_s"] for x in serial)
    base = next(x for x in rows if x["weight_offload"] == 0.0)["decode_s"]
    slow = [x["decode_s"] - x["wait_s_per_step"] - base for x in rows
            if x["prefetch"] and x["reader"] == "pread" and x["offloaded_layers"]]
    rest = [(x["read_s_per_step"] - x["first_layer_read_s"]) / (x["offloaded_layers"] - 1)
            for x in serial if x["offloaded_layers"] > 1]
    lines += ["", "## Where the decode gap comes from (measured, no-prefetch rows)", "",
              f"- The first offloaded layer of a step takes {first * 1e3:.1f} ms to read "
              f"({meta['layer_bytes'] / first / 1e9:.2f} GB/s); each further one "
              f"{statistics.median(rest) * 1e3:.1f} ms ({meta['layer_bytes'] / statistics.median(rest) / 1e9:.2f} GB/s): "
              "the reads of a step are sequential in the file and the kernel's readahead fetches the next layer "
              "while the current one is read. The planner prices every byte at the probed bandwidth "
              f"({meta['disk_read_bytes_per_s'] / 1e9:.2f} GB/s), so it under-predicts most where few layers are "
              "offloaded (a per-step latency term would capture this).",
              "- With prefetch, 'wait' is the part of the reads the compute did not hide. The rest of a step "
              f"(measured − wait) exceeds the f = 0 compute by {min(slow) * 1e3:.0f}–{max(slow) * 1e3:.0f} ms in "
              "the back-to-back prefetch rows: the compute thread runs slower while the reader works (the kernel "
              "copies and the disk's interrupts take CPU, and the 2 cores are oversubscribed, see the load "
              "average), so reads and compute overlap less than the planner's max(t_c, t_read) assumes.", ""]
    lines += ["", f"## Prefill (s per {meta['prompt']}-token prompt)", "",
              "| f | offloaded layers | reader | prefetch | measured ms | planner ms | gap | serial ms | schedule ms |",
              "|---:|---:|:---:|:---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        pred = x["predicted_prefill_s"] if x["prefetch"] else x["predicted_prefill_serial_s"]
        lines.append(
            f"| {x['weight_offload']:.2f} | {x['offloaded_layers']} | {x['reader']} | {'on' if x['prefetch'] else 'off'} | "
            f"{x['prefill_s'] * 1e3:.1f} | {x['predicted_prefill_s'] * 1e3:.1f} | {_gap(x['prefill_s'], pred)}"
            f"{'' if x['prefetch'] else ' (vs serial)'} | {x['predicted_prefill_serial_s'] * 1e3:.1f} | "
            f"{x['predicted_prefill_schedule_s'] * 1e3:.1f} |")
    lines += ["", "## Memory (process RSS growth after the decode run, vs the bound)", "",
              "Bound: resident layers + 2 layer buffers (+ KV, activations). RSS counts the resident "
              "layers' mapped file pages and the anonymous buffers; each row is a fresh process (code paths "
              "warmed on the checkpoint's first layer before the baseline). What exceeds the bound grows with the "
              "resident share, not with the buffers.", "",
              "| f | resident weights MB | buffers MB | bound MB | RSS growth MB |", "|---:|---:|---:|---:|---:|"]
    for x in rows:
        if x["prefetch"] and x["reader"] == "pread":
            lines.append(f"| {x['weight_offload']:.2f} | {x['resident_weight_bytes'] / 1e6:.1f} | "
                         f"{x['buffer_bytes'] / 1e6:.1f} | {(x['resident_weight_bytes'] + x['buffer_bytes']) / 1e6:.1f} | "
                         f"{x['rss_growth_bytes'] / 1e6:.1f} |")
    with_drop = next(x for x in rows if x["weight_offload"] == 1.0 and x["prefetch"] and x["reader"] == "pread")
    lines += ["", "## Without dropping the page cache", "",
              f"f = 1, prefetch on, `drop_page_cache=False`: decode {no_drop['decode_s'] * 1e3:.2f} ms/token "
              f"(read {no_drop['read_s_per_step'] * 1e3:.2f} ms/step), and "
              f"{no_drop['page_cache_fraction_after']:.0%} of the offloaded layers' file bytes are in the page "
              f"cache after the run; with the drop: {with_drop['decode_s'] * 1e3:.2f} ms/token (read "
              f"{with_drop['read_s_per_step'] * 1e3:.2f} ms/step), "
              f"{with_drop['page_cache_fraction_after']:.0%} cached (the next step's first layer is read ahead when a "
              "step ends, and the kernel's readahead past it stays until that step: at most one readahead window, "
              f"{meta['read_ahead_kb']} KiB on this disk). Without the drop the \"disk\" tier is "
              "served from RAM after the first step: the offloaded weights still occupy memory (as page "
              "cache, which the kernel may reclaim) and the planner's disk-bandwidth prediction no longer "
              "describes what runs.", "",
              f"## KV offload (all weights resident, decode at {kv_rows[0]['context']} positions)", "",
              "| kv_offload | ms/token |", "|---:|---:|"]
    lines += [f"| {x['kv_offload']:.1f} | {x['decode_s'] * 1e3:.2f} |" for x in kv_rows]
    lines += ["", "The cold KV lives in a memory-mapped file whose pages stay in the page cache while RAM is "
              "free, so this measures the extra copies (read back + concatenate + keep the hot tail), not disk "
              "reads; the planner would price these reads at disk bandwidth.", ""]
    (RESULTS / f"{_stem(meta.get('family', 'llama'))}.md").write_text("\n".join(lines))


def plot(meta: dict, rows: list[dict], gap_rows: list[dict], gap_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    panels = ((axes[0], "decode", "ms per token (batch 1)", rows, "decode, back to back"),
              (axes[1], "decode", "ms per token (batch 1)", gap_rows, f"decode, {gap_ms:.0f} ms idle between steps"),
              (axes[2], "prefill", f"ms per {meta['prompt']}-token prefill", rows, "prefill"))
    for ax, key, unit, rows, title in panels:
        on = [x for x in rows if x["prefetch"] and x["reader"] == "pread"]
        off = [x for x in rows if not x["prefetch"]]
        mm = [x for x in rows if x["reader"] == "mmap"]
        fr = lambda xs: [x["offloaded_layers"] / meta["n_layers"] for x in xs]  # noqa: E731
        ax.plot(fr(on), [x[f"{key}_s"] * 1e3 for x in on], "o-", label="measured, prefetch (pread)")
        ax.plot(fr(off), [x[f"{key}_s"] * 1e3 for x in off], "s-", label="measured, no prefetch (pread)")
        ax.plot(fr(mm), [x[f"{key}_s"] * 1e3 for x in mm], "^-", alpha=0.6, label="measured, prefetch (mmap reader)")
        ax.plot(fr(on), [x[f"predicted_{key}_s"] * 1e3 for x in on], "k--", label="planner max(t_c, t_read)")
        ax.plot(fr(on), [x[f"predicted_{key}_serial_s"] * 1e3 for x in on], ":", color="gray", label="t_c + t_read")
        ax.plot(fr(on), [x[f"predicted_{key}_schedule_s"] * 1e3 for x in on], "-.", color="tab:green",
                label="two-buffer schedule")
        ax.set_xlabel("fraction of layers offloaded to disk")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Weight offloading, {meta['model']} — {meta['cores']} shared CPU cores", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{_stem(meta.get('family', 'llama'))}.png", dpi=120)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--rss-probe":
        _rss_probe(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

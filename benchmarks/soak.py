"""Load and soak: 16 users generating at once for minutes; no errors, exact tokens, no leaked memory.

    python benchmarks/soak.py --minutes 3

An embedded 3-worker cluster hosts the shipped model (2 + 2 + 2 layers). 16 client threads each
loop: wait a random time, pick a random prompt length and a random number of new tokens, generate
greedily in a fresh session, check the tokens against single-process ``transformers``, close.
Before, during and after, every worker's resident memory is read (``psutil`` in the worker), and
at the end every stage must report no open sessions and no reserved KV bytes.

Writes benchmarks/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM

import bloombee_nb as bb
from _common import RESULTS, shipped_model, write_json


def worker_rss(cluster) -> dict[str, int]:
    def rss():
        import psutil

        return psutil.Process().memory_info().rss

    return {str(k): int(v) for k, v in cluster.client.run(rss).items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--users", type=int, default=16)
    args = ap.parse_args()
    path = shipped_model()
    torch.set_num_threads(1)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ref_lock = threading.Lock()
    with bb.connect(n_workers=3) as cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, spans=[(0, 2), (2, 4), (4, 6)])
        vocab = model.config.vocab_size
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)  # warm up
        time.sleep(1)
        baseline = worker_rss(cluster)
        t_start = time.monotonic()
        deadline = t_start + 60 * args.minutes
        stats = {"sessions": 0, "tokens": 0, "mismatches": 0, "errors": []}
        latencies, peak = [], dict(baseline)
        lock = threading.Lock()

        def user(u: int):
            rng = random.Random(u)
            while time.monotonic() < deadline:
                time.sleep(rng.uniform(0, 0.5))  # arrivals spread out
                n, new = rng.randint(4, 96), rng.randint(4, 32)
                ids = torch.tensor([[rng.randrange(2, vocab) for _ in range(n)]])
                t0 = time.perf_counter()
                try:
                    got = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                    with lock:
                        stats["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                    continue
                dt = time.perf_counter() - t0
                with ref_lock, torch.inference_mode():
                    want = reference.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
                with lock:
                    stats["sessions"] += 1
                    stats["tokens"] += new
                    stats["mismatches"] += int(not torch.equal(got, want))
                    latencies.append(dt / new)

        series = []  # (seconds since start, {worker: RSS MB}): growth with sessions, or a plateau?

        def sample_memory():
            while time.monotonic() < deadline:
                now = worker_rss(cluster)
                series.append((round(time.monotonic() - t_start, 1), {k: round(v / 2**20, 1) for k, v in now.items()}))
                for k, v in now.items():
                    peak[k] = max(peak[k], v)
                time.sleep(5)

        with ThreadPoolExecutor(args.users + 1) as pool:
            futures = [pool.submit(user, u) for u in range(args.users)] + [pool.submit(sample_memory)]
            for f in futures:
                f.result()
        elapsed = time.monotonic() - t_start
        stages = model.chain.info()
        time.sleep(2)
        after = worker_rss(cluster)
        model.close()
    result = {
        "benchmark": "soak", "setup": "embedded LocalCluster, 3 workers", "users": args.users,
        "elapsed_s": elapsed, **{k: v for k, v in stats.items() if k != "errors"},
        "errors": len(stats["errors"]), "error_samples": stats["errors"][:5],
        "tokens_per_s": stats["tokens"] / elapsed,
        "per_token_s_median": statistics.median(latencies) if latencies else None,
        "open_sessions_after": [s["sessions"] for s in stages],
        "reserved_kv_bytes_after": [s["reserved_kv_bytes"] for s in stages],
        "worker_rss_mb": {k: {"baseline": baseline[k] / 2**20, "peak": peak[k] / 2**20, "after": after[k] / 2**20,
                              "first_minute_max": max(v[k] for t, v in series if t <= 60),
                              "last_minute_max": max(v[k] for t, v in series if t >= elapsed - 60)}
                          for k in baseline},
        "worker_rss_series_mb": series,
    }
    write_json("soak", result)
    rows = "\n".join(f"| {k} | {v['baseline']:.0f} | {v['first_minute_max']:.0f} | {v['last_minute_max']:.0f} | "
                     f"{v['peak']:.0f} | {v['after']:.0f} |" for k, v in result["worker_rss_mb"].items())
    (RESULTS / "soak.md").write_text(
        f"{args.users} users for {elapsed / 60:.1f} min: {result['sessions']} sessions, {result['tokens']} tokens, "
        f"{result['errors']} errors, {result['mismatches']} mismatches vs transformers; open sessions after: "
        f"{result['open_sessions_after']}, reserved KV bytes after: {result['reserved_kv_bytes_after']}\n\n"
        f"| worker | RSS baseline MB | max in first minute | max in last minute | peak MB | after MB |\n"
        f"|---|---:|---:|---:|---:|---:|\n{rows}\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

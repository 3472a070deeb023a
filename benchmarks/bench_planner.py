"""How long the planner takes, and how much better its plans are than the two baselines.

    python benchmarks/bench_planner.py                 # 8, 32, 64 workers × 80 layers, 5 seeds each
    python benchmarks/bench_planner.py --seeds 2 --repeats 1

Instances are `bloombee_nb.plan.synthetic.random_cluster`: a Llama-70B-like model (80 layers of
~1.6 GiB in bf16), about 20% GPU workers (24 or 80 GiB) and the rest CPU boxes, every pair of
participants linked at 10 Mbit/s–1 Gbit/s with 1–100 ms RTT. Workload: batch 128 (so the
micro-batch has 8 choices, 1…128), prompt 512, 128 new tokens, 5 offload fractions for weights
and 5 for KV; both objectives. Planning time is the wall time of `solve()` (tables included),
the best of ``--repeats`` runs. Where the plan is exact, the restricted search (what runs beyond
the exact limit) is also forced on the same instance to show how far from optimal it lands.
Writes benchmarks/results/planner_scale.json and planner_scale.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bloombee_nb.plan import InfeasiblePlanError, Workload, even_split, petals_greedy, solve
from bloombee_nb.plan.synthetic import random_cluster
from _common import RESULTS, write_json

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
OFFLOADS = (0.0, 0.25, 0.5, 0.75, 1.0)


def timed_solve(cluster, workload, repeats: int):
    times, plan = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        plan = solve(cluster, workload, micro_batches=MICRO_BATCHES, offloads=OFFLOADS)
        times.append(time.perf_counter() - t0)
    return plan, min(times)


def baseline_objective(fn, cluster, workload):
    try:
        return fn(cluster, workload).objective_s
    except InfeasiblePlanError:
        return None


def run_one(n_workers: int, seed: int, objective: str, repeats: int) -> dict:
    cluster = random_cluster(n_workers, seed=seed)
    workload = Workload(batch=128, prompt_len=512, new_tokens=128, objective=objective)
    plan, seconds = timed_solve(cluster, workload, repeats)
    # on instances small enough to solve exactly, how far the restricted search (used beyond the
    # exact limit) lands from the optimum
    restricted = None
    if plan.exact:
        forced = solve(cluster, workload, micro_batches=MICRO_BATCHES, offloads=OFFLOADS, exact_max_workers=1)
        restricted = forced.objective_s / plan.objective_s
    even = baseline_objective(even_split, cluster, workload)
    petals = baseline_objective(petals_greedy, cluster, workload)
    return dict(n_workers=n_workers, seed=seed, objective=objective, planning_s=seconds, method=plan.method,
                exact=plan.exact, objective_s=plan.objective_s, lower_bound_s=plan.lower_bound_s,
                gap_to_bound=plan.objective_s / plan.lower_bound_s - 1, micro_batch=plan.micro_batch,
                stages=[(s.worker, s.start, s.end, s.weight_offload, s.kv_offload) for s in plan.stages],
                latency_s=plan.latency_s, tokens_per_s=plan.tokens_per_s,
                restricted_over_exact=restricted, even_split_objective_s=even, petals_objective_s=petals,
                even_split_over_dp=None if even is None else even / plan.objective_s,
                petals_over_dp=None if petals is None else petals / plan.objective_s)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for n in sorted({r["n_workers"] for r in rows}):
        for obj in ("latency", "throughput"):
            rs = [r for r in rows if r["n_workers"] == n and r["objective"] == obj]
            ratio = lambda key: [r[key] for r in rs if r[key] is not None]
            out.append(dict(n_workers=n, objective=obj, instances=len(rs),
                            planning_s_median=statistics.median(r["planning_s"] for r in rs),
                            planning_s_max=max(r["planning_s"] for r in rs),
                            exact=sum(r["exact"] for r in rs),
                            gap_to_bound_max=max(r["gap_to_bound"] for r in rs),
                            restricted_over_exact_max=max(ratio("restricted_over_exact"), default=None),
                            even_split_over_dp_min=min(ratio("even_split_over_dp"), default=None),
                            even_split_over_dp_median=statistics.median(ratio("even_split_over_dp") or [np.nan]),
                            petals_over_dp_min=min(ratio("petals_over_dp"), default=None),
                            petals_over_dp_median=statistics.median(ratio("petals_over_dp") or [np.nan]),
                            dp_worse_than_a_baseline=sum(1 for r in rs if min(
                                [x for x in (r["even_split_over_dp"], r["petals_over_dp"]) if x is not None],
                                default=np.inf) < 1 - 1e-9)))
    return out


def plot(summary: list[dict], rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for obj, marker in (("latency", "o"), ("throughput", "s")):
        s = [x for x in summary if x["objective"] == obj]
        ns = [x["n_workers"] for x in s]
        ax1.plot(ns, [x["planning_s_median"] for x in s], marker=marker, label=f"{obj} (median)")
        ax1.plot(ns, [x["planning_s_max"] for x in s], marker=marker, ls=":", alpha=0.6, label=f"{obj} (max)")
        for key, ls in (("even_split_over_dp", "--"), ("petals_over_dp", "-")):
            pts = [(r["n_workers"], r[key]) for r in rows if r["objective"] == obj and r[key] is not None]
            ax2.scatter(*zip(*pts), marker=marker, alpha=0.6,
                        label=f"{'even split' if key.startswith('even') else 'Petals greedy'}, {obj}")
    ax1.axhline(1.0, color="red", lw=0.8, ls="--", label="1 s target")
    ns = sorted({x["n_workers"] for x in summary})
    exact = {n: all(x["exact"] == x["instances"] for x in summary if x["n_workers"] == n) for n in ns}
    for ax in (ax1, ax2):
        ax.set_xticks(ns, [f"{n}\n({'exact' if exact[n] else 'restricted'})" for n in ns])
    ax1.set(xlabel="workers (80 layers, 8 micro-batch × 25 offload choices)", ylabel="planning time (s)",
            title="solve() wall time, 2-core CPU")
    ax1.legend(fontsize=7)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set(yscale="log", xlabel="workers", ylabel="baseline objective / DP objective",
            title="how much worse the baselines are (>1: DP better)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="solve() runs per instance; the best is kept")
    args = ap.parse_args()
    rows = []
    for n in args.workers:
        for seed in range(args.seeds):
            for obj in ("latency", "throughput"):
                rows.append(run_one(n, seed, obj, args.repeats))
                r = rows[-1]
                print(f"{n:3d} workers seed {seed} {obj:10s} {r['planning_s'] * 1e3:7.1f} ms  {r['method']:50s} "
                      f"even/dp {r['even_split_over_dp'] or float('nan'):7.2f}  petals/dp "
                      f"{r['petals_over_dp'] or float('nan'):6.2f}  gap≤{r['gap_to_bound']:.2f}", flush=True)
    summary = summarize(rows)
    out = write_json("planner_scale", dict(micro_batches=MICRO_BATCHES, offloads=OFFLOADS, n_layers=80,
                                           summary=summary, instances=rows))
    plot(summary, rows, RESULTS / "planner_scale.png")
    for s in summary:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})
    print(f"wrote {out} and planner_scale.png")


if __name__ == "__main__":
    main()

"""The planner checked on a real cluster: predicted vs measured, and against the baselines.

    python benchmarks/bench_plan_applied.py

For each instance a Dask scheduler and three `bloombee-nb worker` processes (w0, w1, w2) are
started on this machine; the workers are made unequal by
- an added round-trip time on some workers' links (``BLOOMBEE_EMULATED_RTT_MS``: a sleep in the
  send path, since netem is unavailable — see bloombee_nb/transport/emulation.py), and
- a memory budget per worker (how many layers each lender grants), edited into the measured
  profile as a user would, so that no single worker can host the whole model.
The cluster is profiled for real (layer times, every link with real frames); then the DP plan,
an even split and the Petals-style greedy plan are each placed on the cluster and measured:
per-token decode latency and decode tokens/s for a batch — both for the chain (what the planner
models: links + stages) and end to end (adding the client's embeddings/LM head). Plans are solved
with chain forwarding, the whole batch at once and no offloading (``runtime_plan`` restricted to
those choices: this benchmark compares placements; micro-batches and offloading are measured in
bench_throughput.py and bench_offload.py), and the baselines are priced the same way.

Writes benchmarks/results/plan_applied.json and plan_applied.png.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import bloombee_nb as bb
from bloombee_nb.cluster.planning import runtime_plan
from bloombee_nb.cluster.profiling import profile_cluster
from bloombee_nb.plan import InfeasiblePlanError, Workload, cost, even_split, petals_greedy
from _common import RESULTS, shipped_model, write_json
BIN = str(Path(sys.executable).with_name("bloombee-nb"))

# ``rtt_ms`` is each worker's send-path hold setting (bloombee_nb/transport/emulation.py): a worker
# set to r adds r/2 to every message it sends, so its links to the client carry +r/2 ms of RTT and
# its links to another worker set to r' carry +(r + r')/2 ms.
INSTANCES = [
    {"name": "w2 behind a slow link (+10 ms RTT)", "rtt_ms": {"w2": 20}, "layers": {"w0": 3, "w1": 3, "w2": 6}},
    {"name": "w0 slow link (+6 ms), w1 small", "rtt_ms": {"w0": 12}, "layers": {"w0": 6, "w1": 2, "w2": 4}},
    {"name": "equal links, 2 layers each", "rtt_ms": {}, "layers": {"w0": 2, "w1": 2, "w2": 2}},
    {"name": "two slow links (+4, +8 ms), room on w1", "rtt_ms": {"w0": 8, "w2": 16}, "layers": {"w0": 4, "w1": 4, "w2": 4}},
    # Petals-style greedy: w0 (first to choose) takes layers 0-1, w1 the least-served 2-3, w2 2-5,
    # so layers 0-1 are only on w0 behind its slow link; the DP gives 0-1 to w1 and 2-5 to w2
    {"name": "w0 slow link (+10 ms) and first to choose", "rtt_ms": {"w0": 20}, "layers": {"w0": 2, "w1": 2, "w2": 4}},
]
WORKLOADS = {"latency": Workload(batch=1, prompt_len=32, new_tokens=32, objective="latency"),
             "throughput": Workload(batch=8, prompt_len=32, new_tokens=16, objective="throughput")}


def start_cluster(tmp: Path, rtt_ms: dict[str, float]):
    sched_file = tmp / "sched.json"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not sched_file.exists():
        time.sleep(0.1)
    addr = json.loads(sched_file.read_text())["address"]
    for name in ("w0", "w1", "w2"):
        env = dict(os.environ, BLOOMBEE_EMULATED_RTT_MS=str(rtt_ms.get(name, 0)))
        procs.append(subprocess.Popen([BIN, "worker", addr, "--name", name, "--listen", "127.0.0.1"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return addr, procs


def budgeted(profile, layers: dict[str, int], wl: Workload):
    """Each worker grants memory for exactly its number of layers (weights + the batch's KV); no disk."""
    for name, n in layers.items():
        need = max(cost.min_bytes_for(profile.model, w, n) for w in WORKLOADS.values())
        profile = profile.with_worker(name, ram_bytes=int(need * 1.01), disk_bytes=0)
    return profile


def one_run(model, wl: Workload, ids) -> tuple[list[float], list[float], float]:
    """One greedy generation through a session: (chain times, step times, tokens/s incl. prefill)."""
    with model.inference_session(max_length=wl.prompt_len + wl.new_tokens) as s:
        t_start, steps = time.perf_counter(), []
        nxt = model(ids, cache=s, logits_to_keep=1).logits.argmax(-1)
        for _ in range(wl.new_tokens - 1):
            t0 = time.perf_counter()
            nxt = model(nxt, cache=s, logits_to_keep=1).logits.argmax(-1)
            steps.append(time.perf_counter() - t0)
        rate = wl.batch * wl.new_tokens / (time.perf_counter() - t_start)
        return [t.wall_s for t in list(s.traces)[1:]], steps, rate


def measure_all(cluster, path, plans: dict, wl: Workload, repeats: int = 6) -> dict:
    """Place every plan at once and measure them interleaved (round robin, rotating the order), so
    load from other processes on this shared machine falls on all plans alike."""
    models = {n: bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=p.workers,
                                                                spans=p.layer_spans) for n, p in plans.items()}
    ids = torch.randint(10, 4000, (wl.batch, wl.prompt_len), generator=torch.Generator().manual_seed(0))
    samples = {n: ([], [], []) for n in models}
    names = list(models)
    for r in range(repeats + 1):
        for n in names[r % len(names):] + names[:r % len(names)]:
            chain, steps, rate = one_run(models[n], wl, ids)
            if r:  # round 0 warms up
                samples[n][0].extend(chain), samples[n][1].extend(steps), samples[n][2].append(rate)
    out = {}
    for n, (chain, steps, rates) in samples.items():
        models[n].close()
        chain_ms, step_ms = 1e3 * statistics.median(chain), 1e3 * statistics.median(steps)
        # what the planner models (the chain) and what a user sees (adds the client's embed/head)
        out[n] = {"chain_ms": chain_ms, "step_ms": step_ms, "tokens_per_s": 1e3 * wl.batch / chain_ms,
                  "decode_tokens_per_s_end_to_end": 1e3 * wl.batch / step_ms,
                  "generate_tokens_per_s": statistics.median(rates)}
    return out


def plans_for(profile, wl):
    out = {"dp": runtime_plan(profile, wl, micro_batches=(wl.batch,), offloads=(0.0,))}  # placement only
    priced = profile.priced_for_chain()      # … so the baselines are priced exactly as runtime_plan prices
    for name, fn in (("even", even_split), ("petals", petals_greedy)):
        kw = dict(micro_batches=(wl.batch,)) | (dict(offloads=(0.0,)) if fn is even_split else {})
        try:
            out[name] = fn(priced, wl, **kw)
        except InfeasiblePlanError as exc:
            out[name] = str(exc)
    return out


def main():
    path = shipped_model()
    results = {"model": Path(path).name, "setup": "loopback; added RTT by send-path hold", "instances": []}
    for inst in INSTANCES:
        with tempfile.TemporaryDirectory() as tmp:
            addr, procs = start_cluster(Path(tmp), inst["rtt_ms"])
            try:
                with bb.connect(addr) as cluster:
                    cluster.wait_for_workers(3)
                    profile = profile_cluster(cluster, path, progress=False)
                    row = {**inst, "workloads": {}}
                    for key, wl in WORKLOADS.items():
                        budget = budgeted(profile, inst["layers"], wl)
                        plans = plans_for(budget, wl)
                        entry = {n: {"infeasible": p} for n, p in plans.items() if isinstance(p, str)}
                        plans = {n: p for n, p in plans.items() if not isinstance(p, str)}
                        for name, m in measure_all(cluster, path, plans, wl).items():
                            plan = plans[name]
                            entry[name] = {"chain": [(s.worker, s.start, s.end) for s in plan.stages],
                                           "predicted_chain_ms": 1e3 * plan.latency_s,
                                           "predicted_tokens_per_s": plan.tokens_per_s, **m}
                            entry[name]["latency_gap"] = m["chain_ms"] / entry[name]["predicted_chain_ms"] - 1
                            entry[name]["throughput_gap"] = m["tokens_per_s"] / plan.tokens_per_s - 1
                            print(inst["name"], key, name, json.dumps(entry[name]), flush=True)
                        row["workloads"][key] = entry
                    results["instances"].append(row)
            finally:  # workers leave while the scheduler still answers them, then the scheduler
                for p in procs[1:]:
                    p.terminate()
                for p in procs[1:]:
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                procs[0].terminate()
                procs[0].wait(30)
    write_json("plan_applied", results)
    plot(results, RESULTS / "plan_applied.png")


def plot(results, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, key, metric, pred, title in [
        (axes[0], "latency", "chain_ms", "predicted_chain_ms", "per-token chain time, batch 1 (ms; lower is better)"),
        (axes[1], "throughput", "tokens_per_s", "predicted_tokens_per_s", "decode tokens/s of the chain, batch 8 (higher is better)")]:
        names = ["dp", "even", "petals"]
        for i, inst in enumerate(results["instances"]):
            for j, n in enumerate(names):
                e = inst["workloads"][key].get(n, {})
                if metric in e:
                    x = i * 4 + j
                    ax.bar(x, e[metric], color=["#3b7dd8", "#999", "#d8893b"][j], label=n if i == 0 else None)
                    ax.plot([x - 0.4, x + 0.4], [e[pred]] * 2, "k--", lw=1, label="predicted" if i == 0 and j == 0 else None)
        ax.set_xticks([i * 4 + 1 for i in range(len(results["instances"]))])
        ax.set_xticklabels([inst["name"] for inst in results["instances"]], fontsize=7, rotation=12)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()

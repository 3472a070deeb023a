"""One user alone: attached to the swarm vs on a private pipeline, the two modes alternating.

    python benchmarks/bench_swarm_alone.py --synthetic 58m    # ~4 minutes on 2 cores
    python benchmarks/bench_swarm_alone.py                    # the shipped tiny-llama

``bench_swarm.py`` runs every swarm configuration first and then every private one, one 32-token
generation each, so its one-user rows compare two single short runs taken minutes apart. This
runs the same client processes as ``bench_swarm.py`` (``configuration``: a client process per
user, untimed warm-up, then one timed greedy generation) for one user, ``--pairs`` times swarm
then private, on the same 3 ``bloombee-nb worker`` processes with the spans hosted all along
(the private client loads its own copy beside them). Writes
benchmarks/results/swarm_alone[_58m].json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from _common import RESULTS, SYNTHETIC_58M, random_checkpoint, shipped_model, stamp, write_json
from bench_swarm import BIN, configuration, start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--synthetic", choices=["58m"], default=None, help="a random-init 58M Llama instead")
    args = p.parse_args()
    import bloombee_nb as bb

    load0 = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_swarm_alone"
    logs.mkdir(exist_ok=True)
    model = random_checkpoint(logs / "synthetic_58m", **SYNTHETIC_58M) if args.synthetic else shipped_model()
    sched, address = start([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                           r"scheduler at (tcp://\S+)", logs / "scheduler.log")
    workers = [start([BIN, "worker", address, "--name", f"w{i}", "--listen", "127.0.0.1"], r"(joined)",
                     logs / f"w{i}.log")[0] for i in range(3)]
    runs = {"swarm": [], "private": []}
    try:
        with bb.connect(address) as cluster:
            cluster.wait_for_workers(3, 120)
            bb.host(model, cluster)
            for i in range(args.pairs):
                for mode in ("swarm", "private"):
                    row = configuration(address, cluster, model, mode, 1, args.new_tokens)
                    assert row["exact"] and row["attached"] == [mode == "swarm"], row
                    runs[mode].append(row["ms_per_token_per_user"][0])
                    print(f"pair {i}: {mode:8s} {runs[mode][-1]:6.2f} ms/token", flush=True)
    finally:
        for proc in [*workers, sched]:
            proc.kill()
    summary = {m: dict(median_ms=statistics.median(v), mean_ms=statistics.mean(v), min_ms=min(v), max_ms=max(v))
               for m, v in runs.items()}
    swarm_faster = sum(s < q for s, q in zip(runs["swarm"], runs["private"]))
    name = "swarm_alone" + (f"_{args.synthetic}" if args.synthetic else "")
    out = stamp(dict(model=args.synthetic or "shipped tiny-llama", new_tokens=args.new_tokens, pairs=args.pairs,
                     load_average_before=load0, load_average_after=os.getloadavg(), ms_per_token=runs,
                     summary=summary, pairs_where_swarm_was_faster=swarm_faster))
    write_json(name, out)
    rows = "\n".join(f"| {m} | {s['median_ms']:.1f} | {s['mean_ms']:.1f} | {s['min_ms']:.1f}–{s['max_ms']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in runs[m])} |" for m, s in summary.items())
    (RESULTS / f"{name}.md").write_text(
        f"# One user alone: swarm vs private, alternating\n\n`{out['command']}`: {out['model']}, {args.new_tokens} "
        f"greedy tokens, {args.pairs} pairs (swarm then private), 3 workers on loopback. Load average "
        f"{load0[0]:.1f} → {out['load_average_after'][0]:.1f} (2 cores, shared).\n\n"
        "| mode | median ms/token | mean | range | every run, in order |\n|---|---:|---:|---|---|\n"
        f"{rows}\n\nThe attached run was the faster of its pair in {swarm_faster} of {args.pairs}.\n")
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    sys.exit(main())

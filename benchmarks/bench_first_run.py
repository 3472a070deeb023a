"""The README's first command, timed: worker processes spawned (Dask's default) or forked from a
forkserver that imported torch, transformers and the stage code once (``bb.connect()``'s default).

    python benchmarks/bench_first_run.py            # --runs 3: ~2 minutes on 2 cores

Each run is a fresh ``bloombee-nb generate "def fibonacci(n):"`` process (an embedded 3-worker
cluster, the shipped model, 64 greedy tokens), wall time from start to exit; the two ways alternate
run by run so background load falls on both alike. Spawned is asked for the way a user would, with
``DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD=spawn`` (a start method the user configured
wins over ours). Both must print the same text. Writes benchmarks/results/first_run.json, .md, .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, stamp, write_json

BIN = str(Path(sys.executable).with_name("bloombee-nb"))
PROMPT = "def fibonacci(n):"
WAYS = {"spawned workers (Dask's default)": "spawn", "forkserver (bb.connect's default)": None}


def one_run(method: str | None) -> tuple[float, str]:
    env = dict(os.environ)
    env.pop("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", None)
    if method:
        env["DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"] = method
    t0 = time.perf_counter()
    out = subprocess.run([BIN, "generate", PROMPT], capture_output=True, text=True, env=env, check=True).stdout
    return time.perf_counter() - t0, out.split("\n# ")[0]  # the text, without the closing tokens/s line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    load0 = os.getloadavg()
    times = {way: [] for way in WAYS}
    texts = set()
    for _ in range(args.runs):
        for way, method in WAYS.items():
            s, text = one_run(method)
            times[way].append(s)
            texts.add(text)
            print(f"{way:36s} {s:6.2f} s", flush=True)
    rows = [{"way": way, "seconds": t, "median_s": statistics.median(t)} for way, t in times.items()]
    out = stamp(dict(prompt=PROMPT, runs=args.runs, rows=rows, same_text=len(texts) == 1,
                     load_average_before=load0, load_average_after=os.getloadavg()))
    write_json("first_run", out)
    spawned, forked = (r["median_s"] for r in rows)
    lines = [f"# The README's first command, timed ({out['machine']['cpus']} CPUs)", "",
             f"`{out['command']}`: `bloombee-nb generate \"{PROMPT}\"` in a fresh process, {args.runs} runs each, "
             "alternated.", "", "| workers start as | median s | every run (s) |", "|---|---:|---|"]
    lines += [f"| {r['way']} | {r['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['seconds'])} |" for r in rows]
    lines += ["", f"Forkserver ÷ spawned: {forked / spawned:.2f}× the wall time; same text in every run: "
              f"{out['same_text']}. Load average before / after: {load0} / {out['load_average_after']}."]
    (RESULTS / "first_run.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["way"] for r in rows], [r["median_s"] for r in rows])
    for i, r in enumerate(rows):
        ax.plot(r["seconds"], [i] * len(r["seconds"]), "k.")
    ax.set_xlabel("seconds, start to exit (median; dots: every run)")
    ax.set_title("bloombee-nb generate on an embedded 3-worker cluster")
    fig.tight_layout()
    fig.savefig(RESULTS / "first_run.png", dpi=110)


if __name__ == "__main__":
    main()

"""How long a swarm client pauses when the *only* host of some layers dies and a replica elsewhere
moves there by itself (lenders' rebalancing, ``--rebalance-every``).

    python benchmarks/bench_swarm_heal.py            # ~3 minutes on 2 cores; --runs 5

A scheduler and three ``bloombee-nb worker --host <shipped tiny-llama> --layers 3`` lenders on
loopback: they claim layers 0-2, 3-5 and a replica of 0-2. Each run, a client attaches
(``from_pretrained``), generates 32 greedy tokens, and after 8 tokens the only host of layers 3-5
is SIGKILLed. No replica holds those layers, so the client waits (``swarm_heal_s``) while a host of
0-2 notices (it checks every 5 s), lets its stage's sessions move to the other replica of 0-2,
drops its span and loads 3-5; then the session replays its history on the new route. A fresh
lender joins after each run and claims 0-2 again, so every run starts from the same swarm.

Measured per run: seconds from the kill to layers 3-5 hosted again, the longest gap between two
streamed tokens (what the user sees), and whether the output equals the uninterrupted run.
Writes benchmarks/results/swarm_heal.json and .md.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import bloombee_nb as bb
from bloombee_nb.cluster.swarm import hosted

sys.path.insert(0, str(Path(__file__).parent))
from bench_recovery import Stream  # noqa: E402
from bench_swarm import Lenders  # noqa: E402
from _common import RESULTS, shipped_model, stamp, write_json  # noqa: E402

NEW, FAULT_AT = 32, 8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    load0 = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_swarm_heal"
    logs.mkdir(exist_ok=True)
    runs = []
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with Lenders(shipped_model(), logs) as lenders:
        procs = lenders.procs
        for i in range(3):
            lenders.lend(f"w{i}")
        with bb.connect(lenders.address) as cluster:
            n_layers = hosted(cluster)[0].n_layers
            last = (3, n_layers)
            want = None
            for run in range(args.runs):
                model = bb.DistributedModelForCausalLM.from_pretrained(lenders.model_path, cluster=cluster, swarm=True)
                if want is None:
                    want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
                (only,) = [s for s in hosted(cluster) if s.span == last]
                healed = {}

                def kill():
                    t0 = time.monotonic()
                    procs[only.name].send_signal(signal.SIGKILL)

                    def watch():
                        while not [s for s in hosted(cluster) if s.span == last and s.name != only.name]:
                            time.sleep(0.05)
                        healed["s"] = time.monotonic() - t0
                        healed["by"] = next(s.name for s in hosted(cluster) if s.span == last)
                    threading.Thread(target=watch, daemon=True).start()

                streamer = Stream(kill, at=FAULT_AT)
                got = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, streamer=streamer)
                deadline = time.monotonic() + 30
                while "s" not in healed and time.monotonic() < deadline:
                    time.sleep(0.1)
                gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
                runs.append(dict(killed=only.name, moved=healed.get("by"), exact=bool(torch.equal(got, want)),
                                 rehosted_after_s=healed.get("s"), longest_gap_s=max(gaps),
                                 median_gap_s=statistics.median(gaps), recoveries=len(model.events)))
                print(f"run {run}: killed {only.name}, {healed.get('by')} moved there {healed.get('s', float('nan')):.1f} s "
                      f"later; longest gap {max(gaps):.1f} s, exact={runs[-1]['exact']}", flush=True)
                model.close()
                procs[only.name].wait(30)
                lenders.lend(f"w{3 + run}")  # a new lender claims the span the move left with one host
                lenders.wait_hosted(cluster, 3)
    healed_s = [r["rehosted_after_s"] for r in runs if r["rehosted_after_s"] is not None]
    out = stamp(dict(load_average_before=load0, load_average_after=os.getloadavg(), new_tokens=NEW, fault_at=FAULT_AT,
                     rebalance_every_s=5.0, median_rehosted_after_s=statistics.median(healed_s) if healed_s else None,
                     max_rehosted_after_s=max(healed_s) if healed_s else None,
                     median_longest_gap_s=statistics.median(r["longest_gap_s"] for r in runs),
                     all_exact=all(r["exact"] for r in runs), all_healed=len(healed_s) == len(runs), runs=runs))
    write_json("swarm_heal", out)
    lines = [f"# Swarm healing: the only host of layers 3-5 killed ({out['machine']['platform']}, "
             f"{out['machine']['cpus']} CPUs)", "",
             f"`{out['command']}`: {len(runs)} runs, shipped tiny-llama, lenders with `--host … --layers 3` "
             f"(0-2 twice, 3-5 once), SIGKILL of the 3-5 host after {FAULT_AT} of {NEW} tokens; a 0-2 host "
             "moves there by itself (checks every 5 s).", "",
             f"Layers re-hosted after: median {out['median_rehosted_after_s']:.1f} s, max "
             f"{out['max_rehosted_after_s']:.1f} s; the client's longest gap between tokens: median "
             f"{out['median_longest_gap_s']:.1f} s; every output exact: {out['all_exact']}. "
             f"Load average before/after: {load0} / {out['load_average_after']}.", "",
             "| run | killed | moved | re-hosted after (s) | longest gap (s) | median gap (ms) | exact |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {i} | {r['killed']} | {r['moved']} | {r['rehosted_after_s'] or float('nan'):.1f} | "
              f"{r['longest_gap_s']:.1f} | {r['median_gap_s'] * 1e3:.0f} | {r['exact']} |" for i, r in enumerate(runs)]
    (RESULTS / "swarm_heal.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

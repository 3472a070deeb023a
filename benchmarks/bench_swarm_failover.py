"""How long a swarm client pauses when a worker on its route dies and a replica holds the span.

    python benchmarks/bench_swarm_failover.py            # ~2 minutes on 2 cores; --runs 10
    python benchmarks/bench_swarm_failover.py --synthetic 58m --prompt-tokens 480 --kill last --replay both \
        --runs 10 --out swarm_failover_replay             # the lost stage's replica alone vs every stage

A scheduler and four ``bloombee-nb worker --host <shipped tiny-llama> --layers 3`` processes on
loopback: they claim layers 0-2, 3-5 and a replica of each. Each run, a client attaches
(``from_pretrained``), generates 32 greedy tokens, and after 8 tokens the worker hosting the first
stage of its route is SIGKILLed; the session re-routes through the other replica (no weights load:
it already holds them) and replays its history there: on that replica alone, the other stages keep the
session (``generate/replay.py``). Then a fresh worker joins with ``--host`` and
claims the span that lost its replica, so the next run starts from two replicas again.

``--kill last`` kills the last stage of the route instead (its replica replays from the logged
outputs of the stage before it); ``--replay full`` turns the stages' logs off (``replay_logs=False``:
every stage of the new route replays), ``--replay both`` alternates run by run, to compare in one run.

Measured per run: the longest gap between two streamed tokens (what the user sees), and the
recovery's detection / re-route / replay times and the stages that replayed; every output is checked
against the uninterrupted run. Writes benchmarks/results/swarm_failover.json and .md (``--out``).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
from pathlib import Path

import torch

import bloombee_nb as bb

sys.path.insert(0, str(Path(__file__).parent))
from bench_recovery import Stream  # noqa: E402
from bench_swarm import Lenders  # noqa: E402
from _common import RESULTS, SYNTHETIC_58M, random_checkpoint, shipped_model, stamp, write_json  # noqa: E402

NEW, FAULT_AT = 32, 8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--prompt-tokens", type=int, default=12, help="the history a replay re-sends grows with it")
    p.add_argument("--synthetic", choices=["58m"], default=None, help="a random-init 58M Llama (8 layers) instead")
    p.add_argument("--kill", choices=["first", "last"], default="first",
                   help="which stage of the route to kill: the first (its replica replays from the client's "
                        "history) or the last (from the stage before it's logged outputs)")
    p.add_argument("--replay", choices=["logs", "full", "both"], default="logs",
                   help="logs: only the lost stage's replica replays (replay_logs=True, the default); full: every "
                        "stage replays (replay_logs=False); both: alternate run by run")
    p.add_argument("--out", default="swarm_failover", help="result files' name in benchmarks/results")
    args = p.parse_args()
    load0 = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_swarm_failover"
    logs.mkdir(exist_ok=True)
    runs = []
    ids = torch.randint(3, 500, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    path = random_checkpoint(logs / "synthetic_58m", **SYNTHETIC_58M) if args.synthetic else shipped_model()
    with Lenders(path, logs, layers=4 if args.synthetic else 3) as lenders:
        procs = lenders.procs
        for i in range(4):
            lenders.lend(f"w{i}")
        with bb.connect(lenders.address) as cluster:
            want = None
            for run in range(args.runs):
                full = args.replay == "full" or (args.replay == "both" and run % 2 == 1)
                model = bb.DistributedModelForCausalLM.from_pretrained(lenders.model_path, cluster=cluster, swarm=True,
                                                                       replay_logs=not full)
                if want is None:
                    want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
                names = {a: str(w["name"]) for a, w in cluster.workers().items()}
                victim = names[model.placement.stages[0 if args.kill == "first" else -1].worker]
                streamer = Stream(lambda: procs[victim].send_signal(signal.SIGKILL), at=FAULT_AT)
                got = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0, streamer=streamer)
                (event,) = model.events
                gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
                runs.append(dict(replay="full" if full else "logs", victim=victim, exact=bool(torch.equal(got, want)), longest_gap_s=max(gaps),
                                 median_gap_s=statistics.median(gaps), detect_s=event.detect_s,
                                 reroute_s=event.rebuild_s, replay_s=event.replay_s, pause_s=event.pause_s,
                                 replayed_on_stages=event.replayed_on, route_stages=len(model.placement.stages)))
                print(f"run {run} ({runs[-1]['replay']}): killed {victim}, longest gap {max(gaps) * 1e3:.0f} ms (detect "
                      f"{event.detect_s * 1e3:.0f}, re-route {event.rebuild_s * 1e3:.0f}, replay "
                      f"{event.replay_s * 1e3:.0f}) exact={runs[-1]['exact']}", flush=True)
                model.close()
                procs[victim].wait(30)
                lenders.lend(f"w{4 + run}")  # a new lender claims the span that lost its replica
                lenders.wait_hosted(cluster, 4)
    gaps = sorted(r["longest_gap_s"] for r in runs)
    p95 = gaps[min(len(gaps) - 1, int(round(0.95 * (len(gaps) - 1))))]
    by_mode = {m: dict(median_longest_gap_s=statistics.median(r["longest_gap_s"] for r in rs),
                       median_replay_s=statistics.median(r["replay_s"] for r in rs), runs=len(rs))
               for m in ("logs", "full") if (rs := [r for r in runs if r["replay"] == m])}
    out = stamp(dict(load_average_before=load0, load_average_after=os.getloadavg(), new_tokens=NEW, fault_at=FAULT_AT,
                     model=args.synthetic or "shipped tiny-llama", prompt_tokens=args.prompt_tokens, kill=args.kill,
                     p95_longest_gap_s=p95, median_longest_gap_s=statistics.median(gaps), by_replay=by_mode,
                     all_exact=all(r["exact"] for r in runs), runs=runs))
    write_json(args.out, out)
    lines = [f"# Swarm failover: a replica on the route killed ({out['machine']['platform']}, "
             f"{out['machine']['cpus']} CPUs)", "",
             f"`{out['command']}`: {len(runs)} runs, {out['model']}, {args.prompt_tokens}-token prompt, 2 replicas of "
             f"each span on 4 lent workers, SIGKILL of the route's {args.kill} stage after {FAULT_AT} of {NEW} tokens.",
             "",
             *[f"- replay {m} ({v['runs']} runs): median longest gap {v['median_longest_gap_s'] * 1e3:.0f} ms, median "
               f"replay {v['median_replay_s'] * 1e3:.0f} ms" for m, v in by_mode.items()], "",
             f"Longest gap between streamed tokens: median {out['median_longest_gap_s'] * 1e3:.0f} ms, "
             f"p95 {p95 * 1e3:.0f} ms; every output exact: {out['all_exact']}. "
             f"Load average before/after: {load0} / {out['load_average_after']}.", "",
             "| run | killed | longest gap (ms) | median gap (ms) | detect (ms) | re-route (ms) | replay (ms) | "
             "replayed on | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i} ({r['replay']}) | {r['victim']} | {r['longest_gap_s'] * 1e3:.0f} | {r['median_gap_s'] * 1e3:.1f} | "
              f"{r['detect_s'] * 1e3:.0f} | {r['reroute_s'] * 1e3:.0f} | {r['replay_s'] * 1e3:.0f} | "
              f"{r['replayed_on_stages']} of {r['route_stages']} stages | {r['exact']} |" for i, r in enumerate(runs)]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

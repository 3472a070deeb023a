"""Churn soak of a swarm: users keep generating while lenders die, leave and come back (issue 16).

    python benchmarks/soak_swarm.py                     # 10 minutes, a worker killed or leaving every 60 s
    python benchmarks/soak_swarm.py --minutes 3 --period 30

A scheduler and ``--workers`` (6) ``bloombee-nb worker --host <shipped tiny-llama> --layers 3``
processes on loopback: they claim layers 0-2 and 3-5, each span with replicas. ``--clients`` (4)
client processes with ``--users`` (4) users each attach to the swarm and generate greedy
continuations of fresh random prompts in a loop; every output is checked token for token against
single-process transformers in that process. Every ``--period`` seconds one worker (taking turns)
is either SIGKILLed or asked to leave (SIGTERM: it hands its spans over and waits for its sessions
to move), and rejoins with ``--host`` a few seconds later.

At the end: generations, tokens, errors, mismatches (both must be 0), recoveries (and how many
replayed on the lost stage's replica alone, "spliced"), the users' longest pause
between two tokens, and the sessions still open on every stage once the clients closed (must be
0). Writes benchmarks/results/soak_swarm.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_swarm import BIN, RESULTS, start  # noqa: E402


def client(args) -> None:
    """One client process: ``--users`` threads generating and checking until told to stop."""
    import torch
    from transformers import AutoModelForCausalLM

    import bloombee_nb as bb

    torch.set_num_threads(1)
    ref = AutoModelForCausalLM.from_pretrained(args.model).eval()
    stop = threading.Event()
    stats = {"generations": 0, "tokens": 0, "errors": [], "mismatches": 0, "longest_gap_s": 0.0, "recoveries": 0}
    lock = threading.Lock()
    with bb.connect(args.client) as cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(args.model, cluster=cluster, swarm=True)
        print(json.dumps({"ready": True, "attached": model.attached, "client": cluster.client.id}), flush=True)

        def user(i):
            rng = random.Random(args.seed * 1000 + i)
            while not stop.is_set():
                ids = torch.tensor([[rng.randrange(3, ref.config.vocab_size) for _ in range(12)]])
                times = []

                class Clock:  # a streamer that only notes when each token arrived
                    def put(self, value):
                        times.append(time.monotonic())

                    def end(self):
                        pass
                try:
                    out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0,
                                         streamer=Clock())
                except Exception as exc:  # noqa: BLE001 — counted, the soak goes on
                    with lock:
                        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}"
                                            for f in reversed(traceback.extract_tb(exc.__traceback__)[-4:]))
                        stats["errors"].append(f"{type(exc).__name__}: {exc}"[:300] + f" at {where}")
                    continue
                want = ref.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
                gaps = [b - a for a, b in zip(times[1:], times[2:])]  # token to token, the prompt's put excluded
                with lock:
                    stats["generations"] += 1
                    stats["tokens"] += out.shape[1] - ids.shape[1]
                    stats["mismatches"] += int(not torch.equal(out, want))
                    stats["longest_gap_s"] = max([stats["longest_gap_s"], *gaps])
        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
        for t in threads:
            t.start()
        sys.stdin.readline()  # STOP
        stop.set()
        for t in threads:
            t.join()
        stats["recoveries"] = len(model.events)
        # replayed on the lost stage's replica alone (the other stages kept the session: generate/replay.py)
        stats["spliced"] = sum(0 < e.replayed_on < len(e.new_spans) for e in model.events)
        model.close()
    print(json.dumps(stats), flush=True)


def sessions_left(address: str) -> dict:
    import bloombee_nb as bb

    with bb.connect(address) as c:
        view = bb.swarm(c)
        return {k: load.sessions for k, load in view.loads.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--period", type=float, default=60)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--users", type=int, default=4, help="users per client process")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--out", default="soak_swarm", help="result files' name in benchmarks/results")
    p.add_argument("--client", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client(args)
    from bloombee_nb.shipped import default_model_path

    model = str(default_model_path())
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "soak_swarm"
    logs.mkdir(exist_ok=True)
    load0 = os.getloadavg()
    sched, address = start([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                           r"scheduler at (tcp://\S+)", logs / "scheduler.log")
    procs: dict[str, subprocess.Popen] = {}

    def lend(name) -> float:
        """Start lender ``name``; the seconds from its joining the scheduler to hosting its span."""
        procs[name], after_join = start([BIN, "worker", address, "--name", name, "--listen", "127.0.0.1", "--host",
                                         model, "--layers", "3"], r"hosts layers .* \(([\d.]+) s after joining\)",
                                        logs / f"{name}.log")
        return float(after_join)

    names = [f"w{i}" for i in range(args.workers)]
    for n in names:
        lend(n)
    clients = [subprocess.Popen([sys.executable, __file__, "--client", address, "--model", model, "--users",
                                 str(args.users), "--new-tokens", str(args.new_tokens), "--seed", str(k)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
               for k in range(args.clients)]
    ready = [json.loads(c.stdout.readline()) for c in clients]
    events, t_end, k = [], time.monotonic() + 60 * args.minutes, 0
    while time.monotonic() + args.period <= t_end:
        time.sleep(args.period - 5)
        name = names[k % len(names)]
        how = "kill" if k % 2 == 0 else "leave"
        proc = procs[name]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        gone_s = time.monotonic() - t0
        time.sleep(2)
        after_join = lend(name)
        events.append({"at_s": round(60 * args.minutes - (t_end - time.monotonic()), 1), "worker": name, "how": how,
                       "exit_s": round(gone_s, 2), "rejoined_s": round(time.monotonic() - t0, 2),
                       "hosted_after_join_s": after_join})
        print(events[-1], flush=True)
        k += 1
    for c in clients:
        c.stdin.write("STOP\n")
        c.stdin.flush()
    stats = [json.loads(c.stdout.readline()) for c in clients]
    for c in clients:
        c.wait(120)
    left = sessions_left(address)
    out = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "load_average_start": load0, "load_average_end": os.getloadavg(), "minutes": args.minutes,
           "period_s": args.period, "workers": args.workers, "client_processes": args.clients,
           "users": args.clients * args.users, "attached": [r["attached"] for r in ready],
           "clients": [r.get("client") for r in ready], "events": events,
           "generations": sum(s["generations"] for s in stats), "tokens": sum(s["tokens"] for s in stats),
           "errors": [e for s in stats for e in s["errors"]], "mismatches": sum(s["mismatches"] for s in stats),
           "recoveries": sum(s["recoveries"] for s in stats),
           "recoveries_spliced": sum(s.get("spliced", 0) for s in stats),
           "longest_gap_s": max(s["longest_gap_s"] for s in stats), "sessions_left_on_stages": left}
    for proc in [*procs.values(), sched]:
        proc.send_signal(signal.SIGKILL)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(out, indent=2))
    rejoin = [e["hosted_after_join_s"] for e in events]
    (RESULTS / f"{args.out}.md").write_text(
        f"# Swarm churn soak\n\nCommand: `{out['command']}` · {out['machine']} · load average {load0[0]:.1f} → "
        f"{out['load_average_end'][0]:.1f}\n\n{out['users']} users in {args.clients} client processes, "
        f"{args.workers} lenders, one killed or leaving every {args.period:.0f} s for {args.minutes:g} min "
        f"({len(events)} events).\n\n| generations | tokens | errors | mismatches | recoveries (spliced) | longest pause "
        f"between tokens | sessions left on stages |\n|---|---|---|---|---|---|---|\n| {out['generations']} | "
        f"{out['tokens']} | {len(out['errors'])} | {out['mismatches']} | {out['recoveries']} "
        f"({out['recoveries_spliced']}) | "
        f"{out['longest_gap_s']:.2f} s | {sum(left.values())} |\n\nA restarted lender hosts its span "
        f"{min(rejoin, default=0):.1f}–{max(rejoin, default=0):.1f} s after joining the scheduler; from the kill or "
        f"leave signal to hosting again (exit, 2 s pause, process start, join, load): "
        f"{min((e['rejoined_s'] for e in events), default=0):.1f}–{max((e['rejoined_s'] for e in events), default=0):.1f} s.\n")
    print(json.dumps({k: v for k, v in out.items() if k != "events"}, indent=2))


if __name__ == "__main__":
    main()

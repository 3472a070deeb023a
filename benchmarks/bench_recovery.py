"""Time to recover, per failure: a worker killed, hung, asked to leave, or its link dropped.

    python benchmarks/bench_recovery.py               # ~4-6 minutes on 2 cores; --repeats N
    python benchmarks/bench_recovery.py --no-wan      # without the namespace link emulator (root only)

A scheduler and four ``bloombee-nb worker`` processes (w0..w3, real processes on loopback) host the
shipped ``tiny-llama`` as a 3-stage chain (w0: layers 0-1, w1: 2-3, w2: 4-5; w3 idle). Each run
generates greedily and, after ``FAULT_AT`` tokens, injects a failure into w1, the middle stage:

- ``kill``:  SIGKILL (the process dies; the watchdog sees it gone from the scheduler);
- ``hang``:  SIGSTOP (connected but silent; noticed when a ping stays unanswered for
  ``ping_timeout_s``: the default 10 s, and 2 s), SIGCONT afterwards;
- ``leave``: SIGTERM (graceful: the stage refuses new steps, the worker exits once its sessions moved).

With root, the same chain on the link emulator (workers in network namespaces, ``ip link set … down``
on w1's veth): a 3 s drop with the default timeouts (TCP retransmits, only a pause) and a 20 s drop
with ``ping_timeout_s=5`` (w1 counts as hung, its span moves).

Every run's output is checked against an uninterrupted run, token for token. Measured per run, from
the ``RecoveryEvent`` the session records: detection (the failing call's wait), rebuild (find the
lost worker, load the spans on live ones), replay (re-send the history), and the longest gap between
two streamed tokens (what a user sees). Writes benchmarks/results/recovery.json and recovery.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer

import bloombee_nb as bb
from bloombee_nb.cluster import linkemu
from _common import RESULTS, shipped_model, stamp, write_json
BIN = str(Path(sys.executable).with_name("bloombee-nb"))
NEW_TOKENS, FAULT_AT = 48, 16
SPANS = [(0, 2), (2, 4), (4, 6)]
PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n"


class Stream(BaseStreamer):
    """Token arrival times; ``fault()`` once ``at`` new tokens arrived."""

    def __init__(self, fault=None, at: int = FAULT_AT):
        self.fault, self.at, self.times, self.prompt_seen = fault, at, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if len(self.times) == self.at and self.fault is not None:
            self.fault()

    def end(self):
        pass

    def longest_gap_s(self) -> float:
        return max(b - a for a, b in zip(self.times, self.times[1:]))

    def median_gap_s(self) -> float:
        return statistics.median(b - a for a, b in zip(self.times, self.times[1:]))


class Loopback:
    """Scheduler + named workers on 127.0.0.1, restartable by name."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        sched = subprocess.Popen([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not (m := re.search(r"scheduler at (tcp://\S+)", sched.stdout.readline())):
            assert sched.poll() is None, "the scheduler did not start"
        threading.Thread(target=sched.stdout.read, daemon=True).start()
        self.sched, self.address, self.procs = sched, m.group(1), {}
        for n in ("w0", "w1", "w2", "w3"):
            self.spawn(n)
        self.cluster = bb.connect(self.address)

    def spawn(self, name: str) -> None:
        log = open(self.log_dir / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen([BIN, "worker", self.address, "--name", name, "--listen", "127.0.0.1"],
                                            stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(os.environ, OMP_NUM_THREADS="1"))

    def ensure(self, names=("w0", "w1", "w2", "w3"), timeout_s: float = 120) -> dict[str, str]:
        """Every named worker running (restarting the ones that exited); name -> address."""
        for n in names:
            if self.procs[n].poll() is not None:
                self.spawn(n)
        deadline = time.monotonic() + timeout_s
        while True:
            live = {str(w["name"]): a for a, w in self.cluster.workers().items() if w.get("status") == "running"}
            if all(n in live for n in names):
                return live
            assert time.monotonic() < deadline, f"workers {names} did not all join: {sorted(live)}"
            time.sleep(0.2)

    def close(self):
        self.cluster.close()
        for p in [*self.procs.values(), self.sched]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)


def one_run(cluster, workers: list[str], ids, want, fault, after=None, **load) -> dict:
    model = bb.DistributedModelForCausalLM.from_pretrained(shipped_model(), cluster=cluster, workers=workers,
                                                           spans=SPANS, **load)
    try:
        model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=1)  # warm up the stages
        stream = Stream(fault)
        t0 = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=1, streamer=stream)
        total_s = time.perf_counter() - t0
    finally:
        if after is not None:
            after()
    events = list(model.events)
    model.close()
    row = dict(exact=bool(torch.equal(out, want)), total_s=total_s, longest_gap_s=stream.longest_gap_s(),
               median_gap_s=stream.median_gap_s(), recoveries=len(events))
    if events:
        e = events[0]
        row.update(lost=[f"{w.name} ({w.why})" for w in e.lost], detect_s=e.detect_s, rebuild_s=e.rebuild_s,
                   replay_s=e.replay_s, pause_s=e.pause_s, replayed_steps=e.replayed_steps,
                   new_spans=[list(s) for s in e.new_spans])
    return row


def loopback_settings(lb: Loopback):
    def sig(s):
        return lambda: lb.procs["w1"].send_signal(s)

    cont = sig(signal.SIGCONT)
    return {
        "kill": (sig(signal.SIGKILL), None, {}),
        "hang (ping timeout 10 s)": (sig(signal.SIGSTOP), cont, {}),
        "hang (ping timeout 2 s)": (sig(signal.SIGSTOP), cont, dict(ping_timeout_s=2)),
        "leave (SIGTERM)": (sig(signal.SIGTERM), None, {}),
    }


def run_loopback(repeats: int, ids, want, tmp: Path) -> dict:
    lb = Loopback(tmp)
    rows = {}
    try:
        for r in range(repeats):
            for name, (fault, after, load) in loopback_settings(lb).items():
                live = lb.ensure()
                row = one_run(lb.cluster, [live[n] for n in ("w0", "w1", "w2")], ids, want, fault, after, **load)
                print(f"{name} #{r}: {row}", flush=True)
                rows.setdefault(name, []).append(row)
                if name.startswith("leave"):
                    lb.procs["w1"].wait(60)
    finally:
        lb.close()
    return rows


def run_wan(repeats: int, ids, want) -> dict:
    rows = {}
    with linkemu.LinkEmulator(n_workers=4, scheduler_port=8796) as emu:
        with bb.connect(emu.scheduler_address) as cluster:
            cluster.wait_for_workers(4, 120)
            by_host = {a.split("//")[1].split(":")[0]: a for a in cluster.worker_addresses()}
            workers = [by_host[h] for h in emu.addresses[:3]]

            def drop(seconds):
                def go():
                    subprocess.run(["ip", "link", "set", "bbemu-v1", "down"], check=True)
                    threading.Timer(seconds, subprocess.run, (["ip", "link", "set", "bbemu-v1", "up"],)).start()
                return go

            settings = {"link down 3 s": (drop(3.0), {}),
                        "link down 20 s (ping timeout 5 s)": (drop(20.0), dict(ping_timeout_s=5))}
            for r in range(repeats):
                for name, (fault, load) in settings.items():
                    row = one_run(cluster, workers, ids, want, fault, **load)
                    print(f"{name} #{r}: {row}", flush=True)
                    rows.setdefault(name, []).append(row)
                    time.sleep(20 if "20 s" in name else 0)  # the link is back before the next run
    return rows


def summary(rows: dict) -> list[dict]:
    out = []
    for name, runs in rows.items():
        def med(key):
            vals = [r[key] for r in runs if key in r]
            return statistics.median(vals) if vals else None

        def rng(key):
            vals = [r[key] for r in runs if key in r]
            return (min(vals), max(vals)) if vals else None

        out.append(dict(setting=name, runs=len(runs), exact=sum(r["exact"] for r in runs),
                        recovered=sum(r["recoveries"] > 0 for r in runs),
                        lost=sorted({x for r in runs for x in r.get("lost", [])}),
                        detect_s=med("detect_s"), rebuild_s=med("rebuild_s"), replay_s=med("replay_s"),
                        pause_s=med("pause_s"), pause_range_s=rng("pause_s"),
                        longest_gap_s=med("longest_gap_s"), gap_range_s=rng("longest_gap_s"),
                        median_gap_s=med("median_gap_s"), replayed_steps=med("replayed_steps")))
    return out


def markdown(table: list[dict], meta: dict, host: dict) -> str:
    f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [f"Recovery on a 3-stage chain of the shipped tiny-llama ({host['processor']}, {host['cpus']} cores, "
             f"{NEW_TOKENS} greedy tokens, failure of the middle stage's worker after {FAULT_AT}; "
             f"{meta['repeats']} runs per setting). Times are medians in seconds; every run's tokens are "
             "compared with an uninterrupted run.", "",
             "| setting | exact | recovered | lost | detect | rebuild | replay | pause (event) | "
             "longest token gap (range) | normal token gap |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        gap = f"{f(r['longest_gap_s'])} ({f(r['gap_range_s'][0])}–{f(r['gap_range_s'][1])})"
        lines.append(f"| {r['setting']} | {r['exact']}/{r['runs']} | {r['recovered']}/{r['runs']} | "
                     f"{', '.join(r['lost']) or '—'} | {f(r['detect_s'])} | {f(r['rebuild_s'])} | "
                     f"{f(r['replay_s'])} | {f(r['pause_s'])} | {gap} | {f(r['median_gap_s'])} |")
    lines += ["", "- detect: the failing call's wait (watchdog: scheduler poll every 1 s, ping timeout as set); "
              "rebuild: find the lost worker and load the spans on live ones (the idle w3 takes the lost span); "
              "replay: re-send the session's history (prefill + decode steps before the failure).",
              "- link down 3 s: TCP retransmits deliver the step once the link is back; the pause is the drop plus "
              "the retransmission backoff, and nothing is re-placed. Link down 20 s: the worker stays silent past "
              "the 5 s ping timeout, counts as hung, and its span moves to the idle worker.",
              "- hang: detection = first watchdog check after 1 s + the ping timeout; the default (10 s) is meant "
              "for real links, where a few seconds of silence is not yet a failure."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-wan", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    path = shipped_model()
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(PROMPT, return_tensors="pt")
    # the uninterrupted run: plain transformers (the distributed model equals it: tests/generate)
    want = AutoModelForCausalLM.from_pretrained(path).eval().generate(**ids, max_new_tokens=NEW_TOKENS,
                                                                      do_sample=False, pad_token_id=1)
    rows = run_loopback(args.repeats, ids, want, Path(tempfile.mkdtemp(prefix="bench-recovery-")))
    why = linkemu.available()
    if not args.no_wan and why is None:
        rows.update(run_wan(args.repeats, ids, want))
    elif not args.no_wan:
        print(f"link emulator unavailable ({why}): no link-drop settings")
    meta = dict(repeats=args.repeats, new_tokens=NEW_TOKENS, fault_at=FAULT_AT)
    table = summary(rows)
    result = stamp(dict(meta=meta, summary=table, runs=rows))
    write_json("recovery", result)
    (RESULTS / "recovery.md").write_text(markdown(table, meta, result["machine"]))
    print(markdown(table, meta, result["machine"]))


if __name__ == "__main__":
    main()

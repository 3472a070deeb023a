"""Many independent clients on one swarm vs each client with its own private pipeline.

    python benchmarks/bench_swarm.py                 # ~3 minutes on 2 cores; --users 1 4 8 16 --new-tokens 32
    python benchmarks/bench_swarm.py --synthetic 58m # a random-init 58M Llama (_common.SYNTHETIC_58M): memory shows

A scheduler and three ``bloombee-nb worker`` processes on loopback. For each number of users U,
the users are spread over min(U, 4) client *processes* (threads inside each), each user generating
``--new-tokens`` greedy tokens from its own 16-token prompt (random ids, seeded per user) with the
shipped ``tiny-llama`` (or ``--synthetic 58m``):

- ``swarm``: the spans are hosted once (``bb.host``) and every client process attaches to them
  (``from_pretrained`` finds the model in the swarm's registry); their sessions' steps meet at the
  same stages.
- ``private``: every client process loads its own spans (``swarm=False``): the pipeline mode
  every client used before the swarm.

Measured per configuration: tokens/s over all users (first step to last token), each user's mean
time per token, the workers' resident memory once every client has loaded (one copy of the model
for everyone, or one per client process), stage actors alive, and exactness: every user's tokens
against single-process transformers. Then the same users, prompts and client processes against a
real Petals 2.2 swarm of 3 servers serving the same checkpoint (``_petals.py``: its own venv, servers
in a loopback-only network namespace; ``--no-petals`` skips it, and if it cannot install the JSON
says why). With ``--link MBIT,RTT_MS`` our workers sit behind the namespace link emulator and each
Petals server behind a delay line with the same rate and round trip (``_delayline.py``; this kernel
has no ``netem``, so neither delay is the kernel's). Writes benchmarks/results/swarm[_58m][_link].json,
.md and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from _common import RESULTS, SYNTHETIC_58M, random_checkpoint, shipped_model, stamp, write_json

BIN = str(Path(sys.executable).with_name("bloombee-nb"))


# ---- one client process ----------------------------------------------------------------------------
def client(args) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import bloombee_nb as bb

    torch.set_num_threads(1)
    path = args.model
    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = [torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(args.first + i))
               for i in range(args.users)]
    with bb.connect(args.client) as cluster:
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, swarm=args.mode == "swarm")
        # untimed warm-up (a few tokens): the first forward of a process or a fresh stage pays one-time
        # costs (lazy imports, allocator growth) that would otherwise land on whichever mode runs first
        model.generate(prompts[0][:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        print(json.dumps({"ready": True, "attached": model.attached}), flush=True)
        sys.stdin.readline()  # GO
        results = [None] * args.users

        def user(i):
            t0 = time.time()
            out = model.generate(prompts[i], max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
            results[i] = dict(start=t0, end=time.time(), tokens=out[0, 16:].tolist())
        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        model.close()
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    for i, r in enumerate(results):
        want = ref.generate(prompts[i], max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        r["exact"] = want[0, 16:].tolist() == r["tokens"]
    print(json.dumps({"users": results}), flush=True)


# ---- the run -----------------------------------------------------------------------------------------
def start(cmd, pattern: str, log: Path):
    """Start ``cmd``; return it and the first group of the first output line matching ``pattern``
    (its output goes on into ``log``)."""
    import re

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    f = open(log, "a", buffering=1)  # line by line, kept across restarts of the same name (soak_swarm rejoins)
    for line in proc.stdout:
        f.write(line)
        if m := re.search(pattern, line):
            threading.Thread(target=lambda: [f.write(x) for x in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    raise RuntimeError(f"{cmd} exited: see {log}")


class Lenders:
    """A scheduler and ``bloombee-nb worker --host MODEL --layers N`` lenders on loopback, for the
    churn benchmarks: ``lend(name)`` starts one and returns once it hosts its span; ``procs`` maps
    names to processes (to kill); ``wait_hosted(cluster, n)`` waits until n spans are hosted again.
    As a context manager it kills them all on exit."""

    def __init__(self, model_path: str, logs: Path, layers: int = 3):
        self.model_path, self.logs, self.layers, self.procs = model_path, logs, layers, {}
        self.sched, self.address = start([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--dashboard-address", ":0"], r"scheduler at (tcp://\S+)",
                                         logs / "scheduler.log")

    def lend(self, name: str) -> None:
        self.procs[name] = start([BIN, "worker", self.address, "--name", name, "--listen", "127.0.0.1", "--host",
                                  self.model_path, "--layers", str(self.layers)], r"(hosts layers)",
                                 self.logs / f"{name}.log")[0]

    def wait_hosted(self, cluster, n: int, timeout: float = 60) -> None:
        from bloombee_nb.cluster.swarm import hosted

        deadline = time.monotonic() + timeout
        while len(hosted(cluster)) < n and time.monotonic() < deadline:
            time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for proc in [*self.procs.values(), self.sched]:
            proc.kill()


@contextmanager
def workers(link: str | None, logs: Path):
    """``(cluster, links)``: three ``bloombee-nb worker`` processes and a scheduler on loopback, or
    (``link`` = "MBIT,RTT_MS") three workers behind the link emulator with every link shaped; ``links``
    says which, for the results. Everything is stopped on exit."""
    import bloombee_nb as bb

    if link:
        from bloombee_nb.cluster import linkemu

        rate, rtt = (float(x) for x in link.split(","))
        with linkemu.emulated_cluster(n_workers=3) as (cluster, shape):
            yield cluster, f"{rate:g} Mbit/s, {rtt:g} ms RTT: " + shape(rate, rtt)
        return
    sched, address = start([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                           r"scheduler at (tcp://\S+)", logs / "scheduler.log")
    procs = [start([BIN, "worker", address, "--name", f"w{i}", "--listen", "127.0.0.1"], r"(joined)",
                   logs / f"w{i}.log")[0] for i in range(3)]
    try:
        with bb.connect(address) as cluster:
            cluster.wait_for_workers(3, 120)
            yield cluster, "loopback"
    finally:
        for proc in [*procs, sched]:
            proc.kill()


def worker_memory(cluster) -> dict:
    def rss(dask_worker):
        import psutil

        from bloombee_nb.cluster.stage import hosted_stages

        stages = hosted_stages(dask_worker)
        return {"rss_bytes": psutil.Process().memory_info().rss, "stages": len(stages),
                "weight_bytes": sum(st.runner.info()["resident_weight_bytes"] for st in stages)}
    return cluster.client.run(rss)


def configuration(address: str, cluster, model: str, mode: str, users: int, new_tokens: int) -> dict:
    procs_n = min(users, 4)
    share = [users // procs_n + (1 if i < users % procs_n else 0) for i in range(procs_n)]
    firsts = [sum(share[:i]) for i in range(procs_n)]
    procs = [subprocess.Popen([sys.executable, __file__, "--client", address, "--mode", mode, "--users", str(n),
                               "--first", str(f), "--new-tokens", str(new_tokens), "--model", model],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
             for n, f in zip(share, firsts)]
    ready = [json.loads(p.stdout.readline()) for p in procs]
    mem = worker_memory(cluster)
    for p in procs:
        p.stdin.write("GO\n")
        p.stdin.flush()
    results = [u for p in procs for u in json.loads(p.stdout.readline())["users"]]
    for p in procs:
        p.wait(120)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(len(r["tokens"]) for r in results)
    return dict(mode=mode, users=users, client_processes=procs_n, attached=[r["attached"] for r in ready],
                tokens=tokens, wall_s=wall, tokens_per_s=tokens / wall,
                ms_per_token_per_user=[1e3 * (r["end"] - r["start"]) / len(r["tokens"]) for r in results],
                exact=all(r["exact"] for r in results),
                worker_rss_bytes=sum(m["rss_bytes"] for m in mem.values()),
                stage_weight_bytes=sum(m["weight_bytes"] for m in mem.values()),
                stage_actors=sum(m["stages"] for m in mem.values()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--synthetic", choices=["58m"], default=None, help="a random-init 58M Llama instead")
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--no-petals", action="store_true", help="skip the real Petals 2.2 swarm (the JSON says so)")
    p.add_argument("--link", metavar="MBIT,RTT_MS", help="workers behind the namespace link emulator (root), every "
                   "link shaped to MBIT Mbit/s and RTT_MS ms round trip, e.g. 100,10, and each Petals server behind a "
                   "delay line with the same; results in swarm[_58m]_link.*")
    args = p.parse_args()
    if args.client:
        args.users = args.users[0]
        return client(args)

    import bloombee_nb as bb

    load0 = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_swarm"
    logs.mkdir(exist_ok=True)
    model = shipped_model()
    if args.synthetic:
        model = random_checkpoint(logs / "synthetic_58m", **SYNTHETIC_58M)
    rows = []
    with workers(args.link, logs) as (cluster, links):
        address = cluster.address
        for mode in ("swarm", "private"):  # swarm first: private's memory may keep what swarm freed
            if mode == "swarm":
                bb.host(model, cluster)
            else:
                bb.unhost(cluster)
            for users in args.users:
                row = configuration(address, cluster, model, mode, users, args.new_tokens)
                rows.append(row)
                print(f"{mode:8s} users={users:2d} procs={row['client_processes']} {row['tokens_per_s']:7.1f} tok/s "
                      f"weights held {row['stage_weight_bytes'] / 2**20:6.0f} MiB (RSS {row['worker_rss_bytes'] / 2**20:5.0f}) "
                      f"stages {row['stage_actors']} "
                      f"exact={row['exact']}", flush=True)
    link = tuple(float(x) for x in args.link.split(",")) if args.link else None
    petals = {} if args.no_petals else petals_rows(model, args.users, args.new_tokens, logs, link)
    rows += petals.pop("rows", [])
    name = "swarm" + (f"_{args.synthetic}" if args.synthetic else "") + ("_link" if args.link else "")
    out = stamp(dict(model=args.synthetic or "shipped tiny-llama", new_tokens=args.new_tokens, links=links,
                     load_average_before=load0, load_average_after=os.getloadavg(), rows=rows, petals=petals))
    write_json(name, out)
    write_md(out, name)
    plot(out, name)


def petals_rows(model: str, users: list[int], new_tokens: int, logs: Path, link: tuple[float, float] | None) -> dict:
    """The same users (same prompts, same client processes) against a real Petals 2.2 swarm of 3
    servers on the same model, after ours (``_petals.py``); or why it could not run. With ``link``
    (Mbit/s, RTT ms) each server sits behind a delay line with that rate and round trip
    (``_delayline.py``), and the bytes that crossed each one are recorded per row."""
    from _petals import PetalsSwarm, ensure_petals_venv
    from bench_petals import users_row

    env = ensure_petals_venv()
    if env.python is None:
        return {"not_measured": env.why_not}
    rows = []
    with PetalsSwarm(model, 3, python=env.python, logs=logs / "petals", link=link) as swarm:
        for n in users:
            before = swarm.link_bytes()
            row = users_row(swarm, model, n, new_tokens)
            if link:
                time.sleep(1.2)  # the delay line writes its counters every second
            crossed = {k: {d: v[d] - before.get(k, {}).get(d, 0) for d in v} for k, v in swarm.link_bytes().items()}
            mem = row.get("server_memory") or {}
            rows.append({**row, "mode": "Petals 2.2, 3 servers", "stage_weight_bytes": None,
                         "worker_rss_bytes": mem.get("rss_bytes"), "worker_pss_bytes": mem.get("pss_bytes"),
                         "stage_actors": None, **({"link_bytes": crossed} if link else {})})
    return {"versions": env.versions, "spans": swarm.spans, "rows": rows,
            **({"links": f"{link[0]:g} Mbit/s, {link[1]:g} ms RTT: a user-space delay line in front of each server "
                         "(benchmarks/_delayline.py), the client's requests and the servers' pushes both cross it"}
               if link else {})}


def write_md(out: dict, name: str) -> None:
    lines = [f"# Swarm vs private pipelines ({out['machine']['platform']}, {out['machine']['cpus']} CPUs)", "",
             f"`{out['command']}`: {out['model']}, {out['new_tokens']} greedy tokens per user, 3 workers, links: "
             f"{out.get('links', 'loopback')}; users spread over up to 4 client processes.", "",
             "| mode | users | client processes | tokens/s | mean ms/token per user | weights held by the stages (MiB) | workers' RSS (MiB) | stage actors | exact |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        ms = sum(r["ms_per_token_per_user"]) / len(r["ms_per_token_per_user"])
        if r["stage_weight_bytes"] is None:  # Petals: its servers' memory (PSS counts shared libraries once)
            held = f"— | PSS {r['worker_pss_bytes'] / 2**20:.0f} (RSS {r['worker_rss_bytes'] / 2**20:.0f}) | 3 servers"
        else:
            held = f"{r['stage_weight_bytes'] / 2**20:.0f} | {r['worker_rss_bytes'] / 2**20:.0f} | {r['stage_actors']}"
        lines.append(f"| {r['mode']} | {r['users']} | {r['client_processes']} | {r['tokens_per_s']:.1f} | {ms:.1f} | "
                     f"{held} | {r['exact']} |")
    lines += ["", "Weights held: the stages' own accounting of resident weight bytes (one copy per stage actor). "
              "Workers' RSS is the processes' resident memory: freed spans stay in the allocator, so the private "
              "runs (after the swarm runs, in the same workers) do not show their copies there.",
              f"Load average before / after the run: {out['load_average_before']} / {out['load_average_after']} "
              "(2 cores, shared).", "",
              (f"Petals 2.2 ({out['petals']['versions'].get('petals')}): a DHT root and 3 servers in a loopback-only "
               f"network namespace serving the same checkpoint (blocks {out['petals']['spans']}), the same prompts from "
               "the same number of client processes, measured after ours in the same run"
               + (f"; links: {out['petals']['links']}." if out["petals"].get("links") else ".")
               if out.get("petals", {}).get("versions") else
               f"A real Petals 2.2 swarm was not measured: {out.get('petals', {}).get('not_measured', '--no-petals')}.")]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def plot(out: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in out["rows"]):
        rows = [r for r in out["rows"] if r["mode"] == mode]
        a.plot([r["users"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=mode)
        held = [r["stage_weight_bytes"] if r["stage_weight_bytes"] is not None else r["worker_pss_bytes"] for r in rows]
        b.plot([r["users"] for r in rows], [h / 2**20 for h in held], "o-",
               label=mode if rows[0]["stage_weight_bytes"] is not None else f"{mode} (servers' PSS)")
    a.set(xlabel="users", ylabel="tokens/s (all users)", title="throughput")
    b.set(xlabel="users", ylabel="weights held by the stages (MiB)", title="memory held by the workers")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()

"""bloombee_nb against a real Petals 2.2 swarm, in one run, on the same checkpoint (issue 18 item 3).

    python benchmarks/bench_petals.py                       # ~15 minutes on 2 shared cores
    python benchmarks/bench_petals.py --users 1 4 8 16      # also many users against the swarm (issue 16 item 6)

The workload of the peer baseline: bench_pipeline's random-init 58M Llama (8 layers, fp32, saved
with save_pretrained), a 32-token prompt, 64 greedy tokens, 1 torch thread in every process:

- ``transformers``: one process, ``generate`` on the whole model;
- ``bloombee_nb``: an embedded LocalCluster of 3 workers, a private chain over 2 and 3 of them;
- ``Petals``: Petals 2.2.0.post1 in its own venv (benchmarks/_petals.py installs it on first use),
  a DHT root and 2 (and 3) servers in a loopback-only network namespace, the client in it too.

Every system is timed the same way: ``generate(..., streamer=)`` with a streamer that stamps each
token (time to first token, per-token gaps, tokens/s over the whole generation), after one warm-up
generation. Every system's tokens are checked against transformers'. transformers runs again at
the end: the gap between its two figures shows how much the shared machine's load moved in between. If Petals cannot be
installed, the JSON says why and the rest is still measured. With ``--users``, the same swarm
(the largest one) also serves 1, 4, 8, 16 users at once from up to 4 client processes (threads
inside each), as bench_swarm.py does for bloombee_nb.

Writes benchmarks/results/petals.json, petals.md, petals.png (and petals.html with plotly), and
petals_users.json/.md with ``--users``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _petals import PetalsSwarm, ensure_petals_venv, petals_multi_user, summarize, timed_generate  # noqa: E402
from bench_pipeline import synthetic_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def bench_transformers(path: str, ids, new_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        runs = [timed_generate(model, ids, new_tokens) for _ in range(repeats + 1)]
    return summarize(runs[1:], new_tokens)


def bench_bloombee(cluster, path: str, n: int, ids, new_tokens: int, repeats: int) -> dict:
    import bloombee_nb as bb

    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, relay="chain", swarm=False,
                                                           workers=cluster.worker_addresses()[:n])
    try:
        with torch.inference_mode():
            runs = [timed_generate(model, ids, new_tokens) for _ in range(repeats + 1)]
        return dict(summarize(runs[1:], new_tokens), spans=[list(s) for s in model.placement.spans])
    finally:
        model.close()


def bench_petals(env, path: str, servers: list[int], ids, new_tokens: int, repeats: int, logs: Path,
                 users: list[int], user_tokens: int) -> tuple[dict, list, dict]:
    """Each swarm size: start it, time one client's generations; the last swarm also serves --users."""
    out, user_rows, errors = {}, [], {}
    for n in servers:
        t0 = time.perf_counter()
        try:
            with PetalsSwarm(path, n, python=env.python, logs=logs / f"petals_{n}") as swarm:
                start_s = time.perf_counter() - t0
                res = swarm.client({"prompts": ids.tolist(), "new_tokens": new_tokens, "repeats": repeats}, 600)
                out[f"{n}-servers"] = dict(summarize(res["runs"], new_tokens), spans=swarm.spans,
                                           swarm_start_s=start_s, server_memory=swarm.server_memory())
                if users and n == servers[-1]:
                    user_rows = [users_row(swarm, path, u, user_tokens) for u in users]
        except (RuntimeError, TimeoutError) as exc:  # a client that hung or died: say so, keep the rest
            errors[f"{n}-servers"] = str(exc)[-800:]
            print(f"Petals {n} servers failed: {exc}", flush=True)
    return out, user_rows, errors


def users_row(swarm, path: str, users: int, new_tokens: int) -> dict:
    """bench_swarm's users (16-token prompts seeded per user) against the Petals swarm, checked here."""
    from transformers import AutoModelForCausalLM

    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(users)]
    row = petals_multi_user(swarm, [p[0].tolist() for p in prompts], new_tokens, timeout_s=600)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        row["exact"] = all(timed_generate(ref, p, new_tokens)["tokens"] == t for p, t in zip(prompts, row.pop("user_tokens")))
    print(f"petals users={users:2d} procs={row['client_processes']} {row['tokens_per_s']:6.1f} tok/s "
          f"server PSS {row['server_memory']['pss_bytes'] / 2**20:.0f} MiB exact={row['exact']}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per system, after one warm-up")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 3], help="bloombee_nb chain lengths")
    ap.add_argument("--servers", type=int, nargs="+", default=[2, 3], help="Petals swarm sizes")
    ap.add_argument("--users", type=int, nargs="*", default=[], help="also N users at once against Petals")
    ap.add_argument("--user-tokens", type=int, default=32)
    ap.add_argument("--no-petals", action="store_true", help="skip Petals (the JSON says so)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))  # so the swarm's processes get killed
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_petals"
    path = synthetic_checkpoint(logs / "synthetic_58m")
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(10, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    result = {"command": "python benchmarks/bench_petals.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "model": "synthetic_58m (bench_pipeline's random-init Llama, 8 layers)", "dtype": "float32",
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "torch_threads_per_process": 1, "timing": "generate() with a streamer stamping each token",
              "load_average_before": load0, "versions": versions()}
    result["transformers_single_process"] = bench_transformers(path, ids, args.new_tokens, args.repeats)
    print("transformers", fmt(result["transformers_single_process"]), flush=True)

    import bloombee_nb as bb

    result["bloombee_nb"] = {}
    with bb.connect(n_workers=max(args.workers)) as cluster:
        for n in args.workers:
            r = result["bloombee_nb"][f"{n}-workers-chain"] = bench_bloombee(cluster, path, n, ids, args.new_tokens,
                                                                             args.repeats)
            print(f"bloombee_nb {n} workers", fmt(r), flush=True)
    result["load_average_mid"] = os.getloadavg()

    result["petals"], user_rows = {}, []
    env = ensure_petals_venv() if not args.no_petals else None
    if env is None or env.python is None:
        result["petals_not_measured"] = env.why_not if env else "--no-petals given"
    else:
        result["versions"]["petals_venv"] = env.versions
        result["petals"], user_rows, errors = bench_petals(env, path, args.servers, ids, args.new_tokens,
                                                           args.repeats, logs, args.users, args.user_tokens)
        if errors:
            result["petals_errors"] = errors
        for k, r in result["petals"].items():
            print(f"Petals {k}", fmt(r), flush=True)
    # the same baseline again at the end: how far the shared machine's load moved the numbers
    result["transformers_single_process_again_at_end"] = bench_transformers(path, ids, args.new_tokens, args.repeats)
    print("transformers again", fmt(result["transformers_single_process_again_at_end"]), flush=True)
    result["load_average_after"] = os.getloadavg()
    finish(result, user_rows, args)


def finish(result: dict, user_rows: list, args) -> None:
    """Exactness and ratios against transformers and the best Petals; write JSON, markdown, plots."""
    want = result["transformers_single_process"]["tokens"]
    for group in ("bloombee_nb", "petals"):
        for r in result[group].values():
            r["exact"] = r["tokens"] == want
    result["transformers_single_process_again_at_end"]["exact"] = (
        result["transformers_single_process_again_at_end"]["tokens"] == want)
    best_petals = max((r["tokens_per_s"] for r in result["petals"].values()), default=None)
    for r in result["bloombee_nb"].values():
        r["x_best_petals_tokens_per_s"] = r["tokens_per_s"] / best_petals if best_petals else None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "petals.json").write_text(json.dumps(result, indent=1))
    write_md(result)
    plot(result)
    if user_rows:
        users = {k: result[k] for k in ("command", "machine", "versions", "load_average_before", "load_average_after")}
        users.update(model=result["model"], new_tokens=args.user_tokens, prompt_len=16, rows=user_rows)
        (RESULTS / "petals_users.json").write_text(json.dumps(users, indent=1))
        write_users_md(users)


def versions() -> dict:
    import blosc2
    import dask
    import transformers

    import bloombee_nb

    return {"torch": torch.__version__, "transformers": transformers.__version__, "dask": dask.__version__,
            "blosc2": blosc2.__version__, "bloombee_nb": getattr(bloombee_nb, "__version__", "?")}


def fmt(r: dict) -> str:
    return (f"decode {r['decode_ms_median']:.1f} ms/token, TTFT {r['ttft_ms_median']:.0f} ms, "
            f"{r['tokens_per_s']:.1f} tokens/s")


def rows(result: dict) -> list[tuple[str, dict]]:
    return ([("transformers, 1 process", result["transformers_single_process"])]
            + [(f"bloombee_nb, {k.replace('-', ' ')}", r) for k, r in result["bloombee_nb"].items()]
            + [(f"Petals 2.2, {k.replace('-', ' ')}", r) for k, r in result["petals"].items()]
            + [("transformers, 1 process, again at the end", result["transformers_single_process_again_at_end"])])


def write_md(result: dict) -> None:
    lines = [f"# bloombee_nb vs a real Petals 2.2 swarm ({result['machine']})", "",
             f"`{result['command']}`: {result['model']}, {result['dtype']}, prompt {result['prompt_len']} tokens, "
             f"{result['new_tokens']} greedy tokens, 1 torch thread per process, median of {result['repeats']} "
             "generations after a warm-up, all on loopback in one run.", "",
             "| system | decode ms/token (median) | p90 | TTFT ms | tokens/s | spans | exact vs transformers |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows(result):
        lines.append(f"| {name} | {r['decode_ms_median']:.1f} | {r['decode_ms_p90']:.1f} | {r['ttft_ms_median']:.0f} | "
                     f"{r['tokens_per_s']:.1f} | {r.get('spans', '')} | {r.get('exact', True)} |")
    for k, r in result["bloombee_nb"].items():
        if r["x_best_petals_tokens_per_s"]:
            lines.append(f"\nbloombee_nb {k}: {r['x_best_petals_tokens_per_s']:.2f}x the best Petals tokens/s.")
    if "petals_not_measured" in result:
        lines.append(f"\nPetals was not measured: {result['petals_not_measured']}")
    lines += ["", f"Load average before / middle / after: {result['load_average_before']} / "
              f"{result['load_average_mid']} / {result['load_average_after']} (2 cores, shared with other work)."]
    (RESULTS / "petals.md").write_text("\n".join(lines) + "\n")


def write_users_md(out: dict) -> None:
    lines = ["# Many users against a real Petals 2.2 swarm", "",
             f"`{out['command']}`: {out['model']}, 16-token prompts, {out['new_tokens']} greedy tokens per user, "
             "users spread over up to 4 client processes (threads inside each).", "",
             "| users | client processes | servers | tokens/s | mean ms/token per user | servers' PSS (MiB) | servers' RSS (MiB) | exact |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        ms = sum(r["ms_per_token_per_user"]) / len(r["ms_per_token_per_user"])
        lines.append(f"| {r['users']} | {r['client_processes']} | {r['servers']} | {r['tokens_per_s']:.1f} | {ms:.1f} | "
                     f"{r['server_memory']['pss_bytes'] / 2**20:.0f} | {r['server_memory']['rss_bytes'] / 2**20:.0f} | {r['exact']} |")
    (RESULTS / "petals_users.md").write_text("\n".join(lines) + "\n")


def plot(result: dict) -> None:
    """A matplotlib PNG (always) and a plotly HTML (when plotly is installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, rs = zip(*rows(result))
    colors = ["#888" if n.startswith("transformers") else "#3b7dd8" if n.startswith("bloombee") else "#d8893b"
              for n in names]
    keys = [("decode_ms_median", "decode ms/token (median)"), ("ttft_ms_median", "time to first token (ms)"),
            ("tokens_per_s", "tokens/s")]
    fig, axes = plt.subplots(1, 3, figsize=(18, 4.5))
    for ax, (key, title) in zip(axes, keys):
        ax.bar([n.replace(", ", "\n") for n in names], [r[key] for r in rs], color=colors)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"58M Llama fp32, prompt {result['prompt_len']}, {result['new_tokens']} greedy tokens, "
                 "1 thread per process, loopback", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "petals.png", dpi=110)
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:
        return
    pfig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in keys])
    for col, (key, _) in enumerate(keys, 1):
        pfig.add_trace(go.Bar(x=list(names), y=[r[key] for r in rs], marker_color=colors, showlegend=False), 1, col)
    pfig.write_html(str(RESULTS / "petals.html"), include_plotlyjs="cdn")


if __name__ == "__main__":
    main()

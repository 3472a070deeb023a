"""Many users at once on an emulated WAN: aggregate tokens/s and per-user latency.

    sudo python benchmarks/bench_throughput.py --model wide                  # 2 links × 1/4/8/16 users × 4 configurations (~6 min)
    sudo python benchmarks/bench_throughput.py --model wide --micro-batch 8 --out throughput_mb8
    python benchmarks/bench_throughput.py --quick        # one link, 1 and 4 users

Three workers in their own network namespaces (:mod:`bloombee_nb.cluster.linkemu`, 100 Mbit/s
links shaped by ``tc tbf``, RTT held in the send path), the shipped model split 2 + 2 + 2. For
each link and each number of users, in the same run, on the same workers, with the same prompts:

- ``petals``: the Petals-style configuration — the client relays every hop (star), raw frames,
  each stage runs one step at a time in arrival order;
- ``ours, no micro-batching``: chain relay + ``compression="auto"``, one step at a time per stage;
- ``ours, latency mode``: the same, and decode steps of different sessions that reach a stage
  together run as one forward of at most ``MICRO_BATCH`` rows (set by hand here;
  ``from_pretrained(plan=…)`` takes it from the plan);
- ``ours`` (throughput mode, ``group=True``): also the client's concurrent decode steps travel
  the chain together as micro-batches of up to ``MICRO_BATCH`` sessions, one message per hop.

Users arrive ``STAGGER_S`` apart, each with its own prompt (16–160 tokens), and decode
``NEW_TOKENS`` greedy tokens in their own session (one client process, one thread per user).
Every user's tokens are checked against single-process transformers (``exact`` in the JSON).

Reported: aggregate tokens/s (all users' new tokens / makespan, prompts included), decode
tokens/s (the users' decode rates added up), per-user decode latency (mean time between
tokens), time to first token, how many steps each stage forward ran (merging), and where the
CPU went: the client's and the workers' CPU seconds per new token, and how busy they kept the
machine's cores. On a machine whose cores the client and every stage share, a configuration
whose cores are all busy cannot go faster than its CPU per token allows, so Petals-style's CPU per
token ÷ ours is the most ours can gain there. Writes benchmarks/results/throughput.json,
throughput.md (the README table) and a plotly figure (throughput.html + .png).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import bloombee_nb as bb
from bloombee_nb.cluster import linkemu
from bloombee_nb.generate.deployment import choose_compression
from _common import RESULTS, WIDE, random_checkpoint, scratch, shipped_model, write_json
LINKS = [(100, 5), (100, 50)]  # (Mbit/s, RTT ms)
USERS = (1, 4, 8, 16)
NEW_TOKENS, STAGGER_S, MICRO_BATCH = 32, 0.05, 4
SPANS = [(0, 2), (2, 4), (4, 6)]
CONFIGS = {
    "Petals-style": dict(relay="star", compression=None, merge=False, micro_batch=None, prefill_chunk=None),
    "ours, no micro-batching": dict(relay="chain", compression="auto", merge=False, micro_batch=None),
    "ours, latency mode": dict(relay="chain", compression="auto", merge=True, group=False, micro_batch=MICRO_BATCH),
    "ours": dict(relay="chain", compression="auto", merge=True, group=True, micro_batch=MICRO_BATCH),
}


def model_path(which: str) -> str:
    """The shipped tiny model, or ``wide``: a random-init Llama with 16x the shipped model's
    per-layer compute (``_common.WIDE``), built from its config and saved once (no downloads)."""
    return shipped_model() if which == "shipped" else random_checkpoint(scratch("wide"), **WIDE)


def prompts(n_users: int, vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n_users)
    return [torch.randint(2, vocab, (1, int(torch.randint(16, 161, (1,), generator=g))), generator=g)
            for _ in range(n_users)]


def reference_tokens(path: str, users: list[torch.Tensor]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.inference_mode():
        return [model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
                for ids in users]


def run_users(model, users: list[torch.Tensor]) -> dict:
    """Every user in its own thread and session, arriving STAGGER_S apart."""
    out: list[dict | None] = [None] * len(users)
    errors: list[BaseException] = []

    def user(i: int, ids: torch.Tensor) -> None:
        time.sleep(i * STAGGER_S)
        try:
            t0 = time.perf_counter()
            with torch.inference_mode(), model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as s:
                nxt = model(ids, cache=s, logits_to_keep=1).logits.argmax(-1)  # as generate() asks
                ttft, tokens = time.perf_counter() - t0, [int(nxt)]
                for _ in range(NEW_TOKENS - 1):
                    nxt = model(nxt, cache=s, logits_to_keep=1).logits.argmax(-1)
                    tokens.append(int(nxt))
            end = time.perf_counter()
            out[i] = {"start": t0, "end": end, "ttft_s": ttft, "decode_s": end - t0 - ttft, "tokens": tokens}
        except BaseException as exc:  # noqa: BLE001 — reported below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i, ids)) for i, ids in enumerate(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    makespan = max(r["end"] for r in out) - min(r["start"] for r in out)
    return {"tokens_per_s": len(users) * NEW_TOKENS / makespan, "makespan_s": makespan,
            "decode_tokens_per_s": sum((NEW_TOKENS - 1) / r["decode_s"] for r in out),
            "per_token_s": statistics.mean(r["decode_s"] / (NEW_TOKENS - 1) for r in out),
            "per_token_s_max": max(r["decode_s"] / (NEW_TOKENS - 1) for r in out),
            "ttft_s": statistics.mean(r["ttft_s"] for r in out), "tokens": [r["tokens"] for r in out]}


def cpu_seconds(cluster) -> dict:
    """CPU seconds used so far by this (the client's) process and by each worker process."""
    return {"client": time.process_time(), **cluster.client.run(time.process_time)}


def cpu_account(before: dict, after: dict, tokens: int, makespan_s: float) -> dict:
    """Where one configuration's CPU went while its users ran: the client's and the workers'
    seconds, per new token, and how busy that kept the machine's cores (1.0: every core, all along)."""
    used = {k: after[k] - before[k] for k in before}
    workers = sum(v for k, v in used.items() if k != "client")
    return {"cpu_client_s": used["client"], "cpu_workers_s": workers,
            "cpu_ms_per_token": (used["client"] + workers) / tokens * 1e3,
            "cpu_busy": (used["client"] + workers) / (makespan_s * (os.cpu_count() or 1))}


def merged_share(model) -> float:
    """Steps per forward on the stages so far (1.0: nothing merged)."""
    info = model.chain.info()
    return sum(i["steps"] for i in info) / max(1, sum(i["forwards"] for i in info))


def main():
    global NEW_TOKENS, MICRO_BATCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one link (100 Mbit/s, 50 ms), 1 and 4 users")
    ap.add_argument("--out", default="throughput")
    ap.add_argument("--rtt", type=float, nargs="*", help="only these RTTs (ms) at 100 Mbit/s")
    ap.add_argument("--users", type=int, nargs="*", help="only these numbers of users")
    ap.add_argument("--model", choices=["shipped", "wide"], default="shipped")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"tokens per user (default {NEW_TOKENS})")
    ap.add_argument("--micro-batch", type=int, default=MICRO_BATCH,
                    help=f"rows per micro-batch of the merging configurations (default {MICRO_BATCH})")
    args = ap.parse_args()
    NEW_TOKENS, MICRO_BATCH = args.new_tokens, args.micro_batch
    for kw in CONFIGS.values():
        if kw.get("micro_batch") is not None:
            kw["micro_batch"] = MICRO_BATCH
    links, user_counts = (LINKS, USERS) if not args.quick else ([(100, 50)], (1, 4))
    links = [(100, r) for r in args.rtt] if args.rtt else links
    user_counts = tuple(args.users) if args.users else user_counts
    path = model_path(args.model)
    rows = []
    with linkemu.emulated_cluster(n_workers=3) as (cluster, shape):
        workers = cluster.worker_addresses()
        models = {name: bb.DistributedModelForCausalLM.from_pretrained(
            path, cluster=cluster, workers=workers, spans=SPANS, client_threads=1, **kw)
            for name, kw in CONFIGS.items()}
        vocab = models["ours"].config.vocab_size
        want = {n: reference_tokens(path, prompts(n, vocab)) for n in user_counts}
        for rate, rtt in links:
            emulation = shape(rate, rtt)
            for name, model in models.items():
                if model.chain.compression == "auto":
                    choose_compression(model.chain, cluster, model.embed_tokens)
                run_users(model, prompts(2, vocab))  # warm-up: lazy inits, first-call costs
            for n in user_counts:
                users = prompts(n, vocab)
                row = {"rate_mbit": rate, "rtt_ms": rtt, "users": n, "new_tokens": NEW_TOKENS, "emulation": emulation}
                for name, model in models.items():
                    before = model.chain.info()
                    cpu0 = cpu_seconds(cluster)
                    r = run_users(model, users)
                    cpu1 = cpu_seconds(cluster)
                    after = model.chain.info()
                    r.update(cpu_account(cpu0, cpu1, n * NEW_TOKENS, r["makespan_s"]))
                    steps = sum(a["steps"] - b["steps"] for a, b in zip(after, before))
                    forwards = sum(a["forwards"] - b["forwards"] for a, b in zip(after, before))
                    r["steps_per_forward"] = steps / max(1, forwards)
                    r["exact"] = r.pop("tokens") == want[n]
                    row[name] = r
                rows.append(row)
                print(f"{rate} Mbit/s {rtt} ms, {n} users: " + ", ".join(
                    f"{k} {row[k]['tokens_per_s']:.1f} tok/s ({row[k]['per_token_s'] * 1e3:.0f} ms/token, "
                    f"{row[k]['steps_per_forward']:.2f} steps/forward, exact={row[k]['exact']})" for k in CONFIGS),
                    flush=True)
        for m in models.values():
            m.close()
    result = {"benchmark": "throughput",
              "model": ("shipped tiny-llama (6 layers, hidden 256, fp32)" if args.model == "shipped" else
                        "random-init llama, 6 layers, hidden 1024, fp32 (--model wide)"), "spans": SPANS, "micro_batch": MICRO_BATCH,
              "stagger_s": STAGGER_S, "configs": CONFIGS, "rows": rows}
    write_json(args.out, result)
    (RESULTS / f"{args.out}.md").write_text(table(result))
    plot(result, RESULTS / args.out)
    print(table(result))


def table(result: dict) -> str:
    names = list(result["configs"])
    both = " / ".join(names)
    lines = [f"| link | users | tokens/s, prompts included ({both}) | ours ÷ Petals-style | decode tokens/s ({both}) "
             f"| ours ÷ Petals-style | ms per token per user ({both}) | TTFT s ({both}) | steps per forward (ours) "
             f"| CPU ms per token ({both}) | CPU busy ({both}) | exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cell = lambda key, fmt, scale=1: " / ".join(format(r[n][key] * scale, fmt) for n in names)  # noqa: E731
        ratio = lambda key: r["ours"][key] / r["Petals-style"][key]  # noqa: E731
        cpu = lambda key, fmt: cell(key, fmt) if all(key in r[n] for n in names) else "–"  # noqa: E731
        lines.append(
            f"| {r['rate_mbit']:g} Mbit/s · {r['rtt_ms']:g} ms | {r['users']} | {cell('tokens_per_s', '.1f')} "
            f"| {ratio('tokens_per_s'):.2f}× | {cell('decode_tokens_per_s', '.1f')} | {ratio('decode_tokens_per_s'):.2f}× "
            f"| {cell('per_token_s', '.0f', 1e3)} | {cell('ttft_s', '.2f')} "
            f"| {r['ours']['steps_per_forward']:.2f} | {cpu('cpu_ms_per_token', '.1f')} | {cpu('cpu_busy', '.0%')} "
            f"| {'yes' if all(r[n]['exact'] for n in names) else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows, names = result["rows"], list(result["configs"])
    links = list(dict.fromkeys((r["rate_mbit"], r["rtt_ms"]) for r in rows))
    fig = make_subplots(rows=2, cols=len(links), shared_xaxes=True,
                        subplot_titles=[f"{a:g} Mbit/s · {b:g} ms: {what}" for what in ("aggregate tokens/s",
                                        "ms per token per user") for a, b in links])
    colors = {"Petals-style": "#e76f51", "ours, no micro-batching": "#e9c46a", "ours, latency mode": "#8ab17d",
              "ours": "#2a9d8f"}
    for c, link in enumerate(links, start=1):
        sub = [r for r in rows if (r["rate_mbit"], r["rtt_ms"]) == link]
        for n in names:
            x = [r["users"] for r in sub]
            fig.add_scatter(x=x, y=[r[n]["tokens_per_s"] for r in sub], name=n, line_color=colors.get(n),
                            legendgroup=n, showlegend=c == 1, row=1, col=c)
            fig.add_scatter(x=x, y=[r[n]["per_token_s"] * 1e3 for r in sub], name=n, line_color=colors.get(n),
                            legendgroup=n, showlegend=False, row=2, col=c)
    fig.update_xaxes(title_text="concurrent users", type="log", tickvals=list(USERS), row=2)
    fig.update_layout(height=700, width=1200,
                      title=f"{result['model']}, 3 stages — {rows[0]['emulation'] if rows else ''}")
    fig.write_html(str(stem) + ".html", include_plotlyjs="cdn")
    try:
        fig.write_image(str(stem) + ".png")
    except Exception as exc:  # kaleido/Chrome missing: the HTML is the figure
        print(f"(no PNG: {exc})")


if __name__ == "__main__":
    main()

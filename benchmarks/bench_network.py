"""The network path on an emulated WAN: chain + per-link compression vs the Petals-style star.

    sudo python benchmarks/bench_network.py            # the full grid (~10 min on 2 cores)
    python benchmarks/bench_network.py --quick         # one link, one prompt, 16 tokens

Three workers in their own network namespaces (:mod:`bloombee_nb.cluster.linkemu`: veth pairs
shaped with ``tc tbf``, RTT held in the send path since netem is missing), the shipped model
split evenly (2 + 2 + 2 layers). For every link setting, prompt length and batch, in the same
run and on the same workers:

- ``ours``: chain forwarding (stage → stage → client) and ``compression="auto"`` (per link and
  frame size, the codec that pays on the link's measured bandwidth);
- ``petals``: the Petals-style configuration — the client relays every hop (star), no compression;
- ``bound``: the physical bound of one token — the stages' measured compute plus one traversal
  of the links (N+1 one-way hops of RTT/2 + bytes/rate), no runtime overhead at all.

Without root, the links fall back to in-process shaping (``BLOOMBEE_EMULATED_MBIT``), and every
result says so in its ``emulation`` field. Writes benchmarks/results/network_grid.json, a plotly
figure (network_grid.html + .png) and network_grid.md (the README table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import bloombee_nb as bb
from bloombee_nb.cluster import linkemu
from bloombee_nb.generate.deployment import choose_compression
from _common import RESULTS, shipped_model, write_json
LINKS = [(1000, 5), (100, 5), (100, 100), (12.5, 50)]  # (Mbit/s, RTT ms)
PROMPTS, BATCHES, NEW_TOKENS = (128, 512), (1, 8), 64
SPANS = [(0, 2), (2, 4), (4, 6)]


def run_one(model, ids, n_new):
    """Greedy prefill + n_new-1 decode steps on a fresh session; times and the session's traces."""
    b, p = ids.shape
    with torch.inference_mode(), model.inference_session(max_length=p + n_new) as s:
        t0 = time.perf_counter()
        nxt = model(ids, cache=s).logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(n_new - 1):
            t0 = time.perf_counter()
            nxt = model(nxt, cache=s).logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - t0)
        traces = list(s.traces)
    total = ttft + sum(steps)
    decode = traces[1:]
    step_wall = sum(t.wall_s for t in traces)
    compute = sum(sum(t.stage_compute_s) for t in traces)
    return {
        "ttft_s": ttft,
        "per_token_s": statistics.median(steps),
        "tokens_per_s": b * n_new / total,
        "wire_bytes_per_token": statistics.mean(t.wire_bytes for t in decode) / b,
        "raw_bytes_per_token": statistics.mean(t.raw_bytes for t in decode) / b,
        "prefill_wire_bytes": traces[0].wire_bytes,
        "prefill_raw_bytes": traces[0].raw_bytes,
        "transfer_share": max(0.0, step_wall - compute) / total,  # links + runtime per hop, of the wall time
        "decode_compute_s": statistics.mean(sum(t.stage_compute_s) for t in decode),
        "prefill_compute_s": sum(traces[0].stage_compute_s),
        "hops": len(traces[0].hop_wire_bytes),
    }


def bound(row: dict, rate_mbit: float, rtt_ms: float, hidden_bytes: int, batch: int, prompt: int, n_stages: int):
    """Stages' own compute + one traversal (N+1 one-way hops) of raw hidden states, nothing else."""
    bps = rate_mbit * 1e6 / 8
    hop = lambda nbytes: rtt_ms / 2e3 + nbytes / bps  # noqa: E731
    return {"per_token_s": row["decode_compute_s"] + (n_stages + 1) * hop(batch * hidden_bytes),
            "ttft_s": row["prefill_compute_s"] + (n_stages + 1) * hop(batch * prompt * hidden_bytes)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one link, prompt 128, batch 1, 16 tokens")
    ap.add_argument("--out", default="network_grid")
    args = ap.parse_args()
    links, prompts, batches, n_new = (LINKS, PROMPTS, BATCHES, NEW_TOKENS) if not args.quick else \
        ([(12.5, 50)], (128,), (1,), 16)
    path = str(shipped_model())
    rows = []
    with linkemu.emulated_cluster(n_workers=3) as (cluster, shape):
        workers = cluster.worker_addresses()
        ours = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers, spans=SPANS,
                                                              relay="chain", compression="auto",
                                                              client_threads=1)  # namespaced workers share the cores
        petals = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers, spans=SPANS,
                                                                relay="star", compression=None, client_threads=1)
        hidden_bytes = ours.config.hidden_size * ours.embed_tokens.weight.element_size()
        vocab = ours.config.vocab_size
        for rate, rtt in links:
            emulation = shape(rate, rtt)
            choose_compression(ours.chain, cluster, ours.embed_tokens)  # measures this setting's links
            codecs = [str(p) for _, _, p in ours.chain.link_codecs()]
            print(f"{rate} Mbit/s {rtt} ms: codecs per hop {codecs}", flush=True)
            for prompt in prompts:
                for batch in batches:
                    ids = torch.randint(2, vocab, (batch, prompt), generator=torch.Generator().manual_seed(prompt + batch))
                    if not rows:  # warm both paths up once (lazy inits, first-call costs)
                        run_one(ours, ids[:, :16], 4), run_one(petals, ids[:, :16], 4)
                    r_ours, r_petals = run_one(ours, ids, n_new), run_one(petals, ids, n_new)
                    row = {"rate_mbit": rate, "rtt_ms": rtt, "prompt": prompt, "batch": batch, "new_tokens": n_new,
                           "emulation": emulation, "codecs": codecs, "ours": r_ours, "petals_style": r_petals,
                           "bound": bound(r_ours, rate, rtt, hidden_bytes, batch, prompt, len(SPANS))}
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("rate_mbit", "rtt_ms", "prompt", "batch")}),
                          f"per-token ours {r_ours['per_token_s'] * 1e3:.1f} ms, Petals-style {r_petals['per_token_s'] * 1e3:.1f}"
                          f" ms, bound {row['bound']['per_token_s'] * 1e3:.1f} ms", flush=True)
        ours.close(), petals.close()
    result = {"benchmark": "network_grid",
              "model": "shipped tiny-llama (6 layers, hidden 256, fp32)", "stages": len(SPANS), "spans": SPANS,
              "rows": rows}
    write_json(args.out, result)
    (RESULTS / f"{args.out}.md").write_text(table(result))
    plot(result, RESULTS / args.out)
    print(table(result))


def table(result: dict) -> str:
    lines = ["| link | prompt × batch | TTFT ours / Petals-style / bound (s) | per-token ours / Petals-style / bound (ms) | "
             "tokens/s ours / Petals-style | speed-up | wire bytes per token raw → sent | prefill bytes raw → sent | "
             "transfer share ours / Petals-style |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o, p, b = r["ours"], r["petals_style"], r["bound"]
        lines.append(
            f"| {r['rate_mbit']:g} Mbit/s · {r['rtt_ms']:g} ms | {r['prompt']} × {r['batch']} "
            f"| {o['ttft_s']:.2f} / {p['ttft_s']:.2f} / {b['ttft_s']:.2f} "
            f"| {o['per_token_s'] * 1e3:.1f} / {p['per_token_s'] * 1e3:.1f} / {b['per_token_s'] * 1e3:.1f} "
            f"| {o['tokens_per_s']:.1f} / {p['tokens_per_s']:.1f} | {o['tokens_per_s'] / p['tokens_per_s']:.2f}× "
            f"| {o['raw_bytes_per_token'] / 1024:.1f} → {o['wire_bytes_per_token'] / 1024:.1f} KiB "
            f"| {o['prefill_raw_bytes'] / 2**20:.2f} → {o['prefill_wire_bytes'] / 2**20:.2f} MiB "
            f"| {o['transfer_share']:.0%} / {p['transfer_share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, stem: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    rows = result["rows"]
    label = lambda r: f"{r['rate_mbit']:g}M·{r['rtt_ms']:g}ms<br>{r['prompt']}×{r['batch']}"  # noqa: E731
    x = [label(r) for r in rows]
    fig = make_subplots(rows=2, cols=1, subplot_titles=("per-token decode latency (ms)", "time to first token (s)"))
    for key, name, color in (("ours", "chain + auto compression", "#2a9d8f"), ("petals_style", "Petals-style star, raw", "#e76f51"),
                             ("bound", "physical bound", "#264653")):
        fig.add_bar(x=x, y=[r[key]["per_token_s"] * 1e3 for r in rows], name=name, marker_color=color, row=1, col=1,
                    legendgroup=key)
        fig.add_bar(x=x, y=[r[key]["ttft_s"] for r in rows], name=name, marker_color=color, row=2, col=1,
                    legendgroup=key, showlegend=False)
    fig.update_yaxes(type="log", row=2, col=1)
    fig.update_layout(barmode="group", height=750, width=1300,
                      title=f"{result['model']}, {result['stages']} stages — {rows[0]['emulation'] if rows else ''}")
    fig.write_html(str(stem) + ".html", include_plotlyjs="cdn")
    try:
        fig.write_image(str(stem) + ".png")
    except Exception as exc:  # kaleido/Chrome missing: the HTML is the figure
        print(f"(no PNG: {exc})")


if __name__ == "__main__":
    main()

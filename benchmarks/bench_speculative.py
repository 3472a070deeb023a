"""Speculative decoding across the chain on emulated slow links: the shipped target/draft pair.

    python benchmarks/bench_speculative.py            # RTT 5, 50, 100 ms; ~3-5 minutes on 2 cores
    python benchmarks/bench_speculative.py --wan      # root: the namespace link emulator and the four
                                                      # link settings of bench_network.py

An embedded 3-worker cluster hosts the shipped ``tiny-llama`` (3 stages of 2 layers, chain relay);
the client holds the draft (``tiny-llama-draft``). Every participant holds each message it sends
for half the set RTT (``bloombee_nb.cluster.linkemu.set_rtt``), so a traversal of the chain
(client → 3 stages → client) costs about 2 RTTs of latency before any compute. Variants:

- ``plain``: no draft, one token per traversal;
- ``linear``: a Petals-style linear draft of 4 tokens, ``tree_widths=(1, 1, 1, 1)``;
- ``tree``: a fixed token tree ``(2, 2, 1, 1)``;
- ``auto``: the link-aware tree, re-chosen every round from the measured link, compute and acceptance.

Greedy decoding, so every variant must produce plain greedy's tokens exactly (checked). Writes
benchmarks/results/speculative.json, .png and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoTokenizer

import bloombee_nb as bb
from bloombee_nb.cluster import linkemu
from bloombee_nb.cluster.linkemu import set_rtt
from bloombee_nb.generate.speculative import SpeculationSummary, load_draft
from bloombee_nb.shipped import DRAFT_PATH
from _common import RESULTS, shipped_model, stamp, write_json
RTTS_MS = (5, 50, 100)
NEW_TOKENS = 40
PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Queue:\n    def __init__(self, maxsize=0):\n",
]
VARIANTS = {"plain": None, "linear": (1, 1, 1, 1), "tree": (2, 2, 1, 1), "auto": "auto"}


def run_variant(model, tok, draft, widths) -> dict:
    """Every prompt once; per-token latency excludes the prefill (time to first token)."""
    rows = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")
        spec = {} if widths is None else dict(assistant_model=draft, tree_widths=widths)
        with model.inference_session(max_length=ids["input_ids"].shape[1] + NEW_TOKENS + 128) as s:
            t0 = time.perf_counter()
            out = model.generate(**ids, session=s, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tok.pad_token_id, **spec)
            total_s = time.perf_counter() - t0
            traces, rounds = list(s.traces), list(s.rounds)
        new = out.shape[1] - ids["input_ids"].shape[1]
        prefill_s = traces[0].wall_s
        traversals = len(traces) - 1
        summary = SpeculationSummary.of(rounds) if rounds else None
        rows.append(dict(tokens=out[0].tolist(), new_tokens=new, total_s=total_s,
                         per_token_ms=1e3 * (total_s - prefill_s) / new, tokens_per_s=new / total_s,
                         traversals=traversals, tokens_per_traversal=new / max(traversals, 1),
                         traversal_ms=1e3 * statistics.median(t.wall_s for t in traces[1:]),
                         acceptance_rate=summary.acceptance_rate if summary else None,
                         acceptance_by_depth=list(summary.acceptance_by_depth) if summary else None,
                         mean_tree_tokens=summary.mean_tree_tokens if summary else 1.0,
                         trees=Counter(",".join(map(str, r.widths)) or "off" for r in rounds)))
    return rows


def aggregate(rows: list[dict]) -> dict:
    mean = lambda k: statistics.fmean(r[k] for r in rows)  # noqa: E731
    new = sum(r["new_tokens"] for r in rows)
    acc = [r["acceptance_rate"] for r in rows if r["acceptance_rate"] is not None]
    return dict(per_token_ms=mean("per_token_ms"), tokens_per_s=new / sum(r["total_s"] for r in rows),
                tokens_per_traversal=new / sum(r["traversals"] for r in rows), traversal_ms=mean("traversal_ms"),
                acceptance_rate=statistics.fmean(acc) if acc else None, mean_tree_tokens=mean("mean_tree_tokens"),
                trees=dict(sum((r["trees"] for r in rows), Counter()).most_common()))


WAN_LINKS = [(1000, 5), (100, 5), (100, 100), (12.5, 50)]  # (Mbit/s, RTT ms), as bench_network.py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wan", action="store_true", help="workers in network namespaces, tbf-shaped links (root)")
    args = ap.parse_args()
    emu = None
    if args.wan:
        if (why := linkemu.available()) is not None:
            raise SystemExit(f"--wan needs the link emulator: {why}")
        emu = linkemu.LinkEmulator(n_workers=3).__enter__()
    settings = WAN_LINKS if emu is not None else [(None, r) for r in RTTS_MS]
    stem = "speculative_wan" if emu is not None else "speculative"
    tok = AutoTokenizer.from_pretrained(shipped_model())
    draft = load_draft(str(DRAFT_PATH))
    result = {"model": "tiny-llama (6 layers, 4.4M params) + tiny-llama-draft (2 layers, 0.8M)",
              "prompts": PROMPTS, "new_tokens": NEW_TOKENS, "decoding": "greedy", "rtts_ms": list(RTTS_MS),
              "link_emulation": ("workers in network namespaces, bandwidth shaped by tc tbf on veth pairs, RTT/2 "
                                 "held in every participant's send path" if emu is not None else
                                 "in-process send-path hold of RTT/2 on every participant (client and workers); "
                                 "no bandwidth shaping; loopback underneath"),
              "settings": {}}
    t_start = time.perf_counter()
    cluster = bb.connect(emu.scheduler_address) if emu is not None else bb.connect(n_workers=3)
    with cluster:
        cluster.wait_for_workers(3, 60)
        # the namespaced workers share this machine's 2 cores although their addresses are not local:
        # the client's own torch work gets one thread, as "auto" gives it on an embedded cluster
        model = bb.DistributedModelForCausalLM.from_pretrained(shipped_model(), cluster=cluster, client_threads=1)
        torch.set_num_threads(1)  # … and so does the draft, which runs here
        result["spans"] = model.placement.spans
        try:
            for rate, rtt in settings:
                if emu is not None:
                    emu.shape(rate, rtt, cluster.client)
                else:
                    set_rtt(rtt, cluster.client)
                key = f"{rate:g} Mbit/s · {rtt}" if rate else str(rtt)
                run_variant(model, tok, draft, "auto")  # warm-up (and the draft's first call)
                setting = {name: run_variant(model, tok, draft, w) for name, w in VARIANTS.items()}
                plain = [r["tokens"] for r in setting["plain"]]
                result["settings"][key] = {
                    name: {**aggregate(rows), "exact": [r["tokens"] for r in rows] == plain}
                    for name, rows in setting.items()}
                print(rtt, "ms:", json.dumps({k: round(v["per_token_ms"], 1) for k, v in
                                              result["settings"][key].items()}), flush=True)
        finally:
            set_rtt(0, cluster.client)
            model.close()
    if emu is not None:
        emu.__exit__(None, None, None)
    result["wall_s"] = time.perf_counter() - t_start
    for rtt, setting in result["settings"].items():
        for v in setting.values():
            v["speedup_vs_plain"] = setting["plain"]["per_token_ms"] / v["per_token_ms"]
    result = stamp(result)
    write_json(stem, result)
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    plot(result, RESULTS / f"{stem}.png")
    print(markdown(result))


def markdown(result) -> str:
    lines = [f"# Speculative decoding across the chain ({result['model']})", "",
             f"{result['new_tokens']} new tokens per prompt, {len(result['prompts'])} prompts, greedy; "
             f"3 stages {result['spans']} on an embedded 3-worker cluster; {result['link_emulation']}. "
             f"Machine: {result['machine']['processor']}, {result['machine']['cpus']} cores shared with other work "
             f"(timings are noisy), torch {result['machine']['torch']}. "
             f"Whole run: {result['wall_s']:.0f} s.", "",
             "| RTT | variant | trees sent | tokens / traversal | acceptance rate | traversal ms | per-token ms "
             "| tokens/s | speedup vs plain | exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rtt, setting in result["settings"].items():
        for name, v in setting.items():
            acc = f"{v['acceptance_rate']:.0%}" if v["acceptance_rate"] is not None else "—"
            fixed = VARIANTS[name]
            top = ", ".join(f"{t} ×{n}" for t, n in list(v["trees"].items())[:3])
            more = f" (+{len(v['trees']) - 3} more)" if len(v["trees"]) > 3 else ""
            trees = top + more if name == "auto" else ",".join(map(str, fixed)) if fixed else "—"
            lines.append(f"| {rtt} ms | {name} | {trees} | {v['tokens_per_traversal']:.2f} | {acc} | "
                         f"{v['traversal_ms']:.0f} | {v['per_token_ms']:.1f} | {v['tokens_per_s']:.1f} | "
                         f"{v['speedup_vs_plain']:.2f}× | {'yes' if v['exact'] else 'NO'} |")
    lines += ["", "acceptance rate: accepted drafts / drafted depth (rows × tree depth) over speculative rounds; "
              "tokens / traversal: new tokens / chain traversals after the prefill; per-token ms excludes the prefill.",
              "`auto`: the trees the link-aware policy chose most often (rounds; `off` = a plain step); it starts "
              "from the acceptance measured by the previous generation with the same pair."]
    return "\n".join(lines) + "\n"


def plot(result, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result["settings"])
    rtts = list(range(len(labels)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"plain": "#888", "linear": "#d8893b", "tree": "#3b7dd8", "auto": "#2a9d4b"}
    for name in VARIANTS:
        for ax, key in zip(axes, ["per_token_ms", "tokens_per_s", "tokens_per_traversal"]):
            ax.plot(rtts, [result["settings"][r][name][key] for r in labels], "o-", color=colors[name], label=name)
    for ax, title in zip(axes, ["per-token latency (ms, lower is better)", "tokens/s", "tokens per chain traversal"]):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("emulated link (RTT ms)")
        ax.set_xticks(rtts, [f"{x} ms" for x in labels], fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(f"Speculative decoding across a 3-stage chain: {result['model']}, greedy, exact", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()

"""Does a long prompt stall everyone else's decoding? Chunked prompts against prompts in one piece.

    python benchmarks/bench_prefill_stall.py           # ~2 min on 2 cores

Four users decode (64 greedy tokens each) on one embedded cluster of three workers (the ``wide``
model of bench_throughput.py: hidden 1024, 6 layers, 2 + 2 + 2). Half a second in, a fifth
user sends a 1536-token prompt. Measured per configuration, in the same run on the same workers:
the decoding users' longest gap between two tokens while the prompt is read, their median gap,
and the prompt's time to first token. Configurations: ``prefill_chunk=256`` (the default: the
prompt travels as 6 chunks and the stages run the others' decode steps between chunks) and
``prefill_chunk=None`` (the prompt in one piece: every decode step queued behind it waits for
all of it). Every user's tokens are checked against single-process transformers.
Writes benchmarks/results/prefill_stall.json and .md.
"""

from __future__ import annotations

import statistics
import threading
import time

import torch
from transformers import AutoModelForCausalLM

import bloombee_nb as bb
from _common import RESULTS, WIDE, random_checkpoint, scratch, write_json
SPANS = [(0, 2), (2, 4), (4, 6)]
DECODERS, NEW_TOKENS, LONG_PROMPT, LONG_AT_S = 4, 64, 1536, 0.5
CONFIGS = {"chunks of 256": dict(prefill_chunk=256), "one piece": dict(prefill_chunk=None)}


def run(model, short: list[torch.Tensor], long: torch.Tensor) -> dict:
    stamps: list[list[float]] = [[] for _ in short]
    tokens: list = [None] * (len(short) + 1)
    window = {}

    def decoder(i, ids):
        with torch.inference_mode(), model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as s:
            nxt, got = model(ids, cache=s, logits_to_keep=1).logits.argmax(-1), []
            for _ in range(NEW_TOKENS):
                got.append(int(nxt))
                stamps[i].append(time.perf_counter())
                nxt = model(nxt, cache=s, logits_to_keep=1).logits.argmax(-1)
        tokens[i] = got

    def reader():
        time.sleep(LONG_AT_S)
        with torch.inference_mode(), model.inference_session(max_length=long.shape[1] + 2) as s:
            window["start"] = time.perf_counter()
            nxt = model(long, cache=s, logits_to_keep=1).logits.argmax(-1)  # as generate() asks
            window["end"] = time.perf_counter()
        tokens[-1] = [int(nxt)]

    threads = [threading.Thread(target=decoder, args=(i, ids)) for i, ids in enumerate(short)]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gaps_in, gaps_all = [], []
    for st in stamps:
        for a, b in zip(st, st[1:]):
            gaps_all.append(b - a)
            if b > window["start"] and a < window["end"]:
                gaps_in.append(b - a)
    return {"long_ttft_s": window["end"] - window["start"], "max_gap_during_prompt_s": max(gaps_in, default=0.0),
            "median_gap_s": statistics.median(gaps_all), "tokens": tokens}


def main():
    path = random_checkpoint(scratch("wide"), **WIDE)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(1)
    short = [torch.randint(2, ref.config.vocab_size, (1, 24 + 8 * i), generator=g) for i in range(DECODERS)]
    long = torch.randint(2, ref.config.vocab_size, (1, LONG_PROMPT), generator=g)
    with torch.inference_mode():
        want = [ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
                for ids in short] + [ref.generate(long, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1:].tolist()]
    cluster = bb.connect(n_workers=3)
    rows = {}
    try:
        workers = cluster.worker_addresses()
        for name, kw in CONFIGS.items():
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers, spans=SPANS,
                                                                   client_threads=1, **kw)
            run(model, short[:2], long[:, :300])  # warm-up
            r = run(model, short, long)
            r["exact"] = r.pop("tokens") == want
            rows[name] = r
            print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
            model.close()
    finally:
        cluster.close()
    result = {"benchmark": "prefill_stall",
              "model": "random-init llama, 6 layers, hidden 1024, fp32 (_common.WIDE, as bench_throughput --model wide)",
              "decoders": DECODERS, "long_prompt": LONG_PROMPT, "rows": rows}
    write_json("prefill_stall", result)
    lines = ["| prompt sent as | decoders' longest gap while it is read (s) | decoders' median gap (s) | "
             "prompt's time to first token (s) | exact |", "|---|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['max_gap_during_prompt_s']:.2f} | {r['median_gap_s']:.3f} | {r['long_ttft_s']:.2f} "
                     f"| {'yes' if r['exact'] else 'NO'} |")
    (RESULTS / "prefill_stall.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

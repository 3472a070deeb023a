"""Where a decode step's milliseconds go, one user on loopback (issue 18): the pipeline's parts
measured one by one, beside the end-to-end decode on 1, 2 and 3 stages and single-process
transformers, all in one run on the same checkpoint with 1 torch thread everywhere.

    python benchmarks/bench_latency.py --synthetic 58m            # the 58M 8-layer Llama
    python benchmarks/bench_latency.py --synthetic 58m --profile  # + py-spy of the client and a worker

Parts (medians over many repetitions, this process unless said):

- client: embedding of one token, final norm + LM head (what the client computes per token);
- frames: encode + decode of one decode step's hidden state ``[1, 1, D]``;
- hand-offs: ``client.sync`` of a no-op coroutine (the caller's thread to the client's event loop
  and back), one private-thread hand-off on an event loop (``run_in_executor`` of a no-op);
- Dask: one message round trip from the client to a worker over its connection pool
  (``identity``), and one actor call round trip (``StageActor.ping``);
- layers: the span's 8 layers on one token in a :class:`SpanRunner` (mask + rotary once, then the
  layers) against the same 8 layers of the transformers model in this process, and the mask +
  rotary construction alone;
- end to end: decode ms/token of single-process transformers and of the pipeline (chain relay) on
  1, 2 and 3 stages, and from the traces the client-observed chain time minus the stages' compute;
- timeline: one decode step cut into segments by stamps in the client and the stages
  (``_timeline.py``) — hand-offs, each Dask message, the layers — on 1 and 3 stages, measured last
  (its wrappers stay installed).

Writes benchmarks/results/latency[_<name>].json and .md (a table) beside the other results; with
``--profile``, py-spy's collapsed stacks of the client and of the single stage's worker during a
1-stage decode, and a summary of where their samples fall.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import bloombee_nb as bb
from bloombee_nb import transport
from bloombee_nb.model.span import SpanRunner

sys.path.insert(0, str(Path(__file__).parent))
import _timeline  # noqa: E402
from bench_pipeline import bench_distributed, bench_local, greedy_steps, synthetic_checkpoint  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def median_ms(fn, n: int = 300, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def client_parts(model, D: int) -> dict:
    tok = torch.tensor([[17]])
    h = torch.randn(1, 1, D)
    frame = transport.encode(h)
    with torch.inference_mode():
        return {"client_embedding_ms": median_ms(lambda: model.model.embed_tokens(tok)),
                "client_norm_lm_head_ms": median_ms(lambda: model.lm_head(model.model.norm(h))),
                "frame_encode_decode_ms": median_ms(lambda: transport.decode(transport.encode(h))),
                "frame_decode_ms": median_ms(lambda: transport.decode(frame))}


def layer_parts(path: str, model, n_layers: int, past: int = 32) -> dict:
    """The span's layers on one token after a ``past``-token prompt: ours vs transformers' own."""
    runner = SpanRunner(path, 0, n_layers)
    ids = torch.randint(10, model.config.vocab_size, (1, past), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        h0 = model.model.embed_tokens(ids)
        runner.open("s", 1, past + 4000)
        runner.forward("s", h0, torch.arange(past)[None], torch.ones(1, past, dtype=torch.long))
        h1 = model.model.embed_tokens(ids[:, :1])
        sess = runner.sessions["s"]

        def ours():
            n = sess.length
            runner.forward("s", h1, torch.tensor([[n]]), torch.ones(1, 1, dtype=torch.long))
            runner.rollback("s", n)

        cache = DynamicCache(config=model.config)
        model.model(inputs_embeds=h0, past_key_values=cache, use_cache=True)

        def theirs():
            model.model(inputs_embeds=h1, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # the one position just added

        def mask_and_rotary():
            from bloombee_nb.model.span import MASK_FUNCTIONS

            n = sess.length
            mask = torch.ones(1, n + 1, dtype=torch.long)
            kw = dict(config=runner.config, inputs_embeds=h1, attention_mask=mask, cache=sess.cache,
                      position_ids=torch.tensor([[n]]))
            {k: MASK_FUNCTIONS[k](**kw, layer_idx=i) for k, i in runner.mask_layer_idx.items()}
            runner.position_embeddings(h1, torch.tensor([[n]]))

        return {"span_layers_ms": median_ms(ours, n=100), "transformers_layers_ms": median_ms(theirs, n=100),
                "mask_and_rotary_ms": median_ms(mask_and_rotary)}


def dask_parts(cluster, model) -> dict:
    client = cluster.client
    worker = model.placement.stages[0].worker

    async def nop():
        return None

    async def identity():
        return await client.rpc(worker).identity()

    pool = ThreadPoolExecutor(1)
    loop = asyncio.new_event_loop()

    async def handoff():
        await loop.run_in_executor(pool, int)

    out = {"client_sync_handoff_ms": median_ms(lambda: client.sync(nop)),
           "dask_message_round_trip_ms": median_ms(lambda: client.sync(identity)),
           "actor_call_round_trip_ms": median_ms(lambda: model.chain.actors[0].ping().result()),
           "thread_handoff_ms": median_ms(lambda: loop.run_until_complete(handoff()))}
    loop.close()
    pool.shutdown()
    return out


def timeline(cluster, path: str, ids, n_new: int, repeats: int) -> dict:
    """Each segment of a decode step between stamps (``_timeline.py``), on 1 and 3 chained stages."""
    _timeline.install_client()
    cluster.client.run(_timeline.install_stage)
    out = {}
    for n in (1, 3):
        workers = cluster.worker_addresses()[:n]
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers, relay="chain")
        for r in range(repeats + 1):
            if r == 1:  # after a warm-up
                _timeline.clear()
                cluster.client.run(_timeline.stage_stamps, clear=True)
            with model.inference_session(max_length=ids.shape[1] + n_new) as s:
                greedy_steps(lambda x: model(x, cache=s, logits_to_keep=1).logits, ids, n_new)
        stamps = _timeline.collected() + [st for got in cluster.client.run(_timeline.stage_stamps, clear=True).values()
                                          for st in got]
        model.close()
        out[f"{n}-chain"] = [{"segment": k, "ms_median": ms, "steps": c} for k, ms, c in
                             _timeline.segments(stamps, [s.worker for s in model.placement.stages])]
    return out


def profile(cluster, path: str, ids, out: Path, seconds: float = 8.0) -> dict:
    """py-spy (collapsed stacks, idle included) of this client and of the stage's worker while a
    1-stage chain decodes; returns where the samples fall, by the frames they are in."""
    workers = cluster.worker_addresses()[:1]
    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, workers=workers)
    pid = cluster.client.run(os.getpid, workers=workers)[workers[0]]
    files = {"client": out / "latency_profile_client.txt", "worker": out / "latency_profile_worker.txt"}
    procs = [subprocess.Popen(["py-spy", "record", "--pid", str(p), "--duration", str(int(seconds)), "--rate", "500",
                               "--format", "raw", "--idle", "--threads", "--nonblocking", "-o", str(f)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for p, f in ((os.getpid(), files["client"]), (pid, files["worker"]))]
    t_end = time.monotonic() + seconds + 1
    while time.monotonic() < t_end:
        with model.inference_session(max_length=ids.shape[1] + 200) as s:
            x = model(ids, cache=s, logits_to_keep=1).logits[:, -1:].argmax(-1)
            for _ in range(150):
                if time.monotonic() >= t_end:
                    break
                x = model(x, cache=s, logits_to_keep=1).logits[:, -1:].argmax(-1)
    for p in procs:
        p.wait(timeout=60)
    model.close()
    return {k: summarize_profile(f) for k, f in files.items() if f.exists()}


CATEGORIES = [  # (label, substrings of a stack: the first that matches names the sample)
    ("transformers layers", ("modeling_llama.py",)),
    ("torch linear / sdpa", ("torch/nn/modules/linear.py", "functional.py")),
    ("mask + rotary", ("masking_utils.py", "rotary")),
    ("frames (encode/decode)", ("transport/frame.py", "transport/codec.py")),
    ("Dask comm (tcp, serialization)", ("distributed/comm/", "distributed/protocol/")),
    ("stage queue and protocol", ("cluster/batching.py", "cluster/stage.py", "cluster/wire.py", "cluster/protocol.py")),
    ("client relay", ("cluster/relay.py", "cluster/chain.py", "cluster/groups.py", "cluster/trace.py")),
    ("client generate / session", ("generate/model.py", "generate/session.py")),
    ("event loop (tornado/asyncio)", ("asyncio/", "tornado/")),
    ("Dask's own threads (monitor, nanny)", ("distributed/system_monitor", "psutil", "distributed/nanny.py")),
    ("thread hand-off", ("threading.py", "concurrent/futures")),
]


IDLE = ("wait (threading.py", "select (selectors.py", "poll (selectors.py", "_recv (multiprocessing",
        "poll (multiprocessing", "popen_fork.py", "_worker (concurrent/futures/thread.py:81)", "acquire", "sleep")  # a thread blocked here does nothing


def summarize_profile(path: Path) -> dict:
    """Where the busy samples fall (a sample whose innermost frame blocks is idle and left out), each
    counted under its innermost matching category; ``per_token_ms`` turns shares into milliseconds."""
    counts: dict[str, int] = {}
    total = busy = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        total += n
        frames = stack.split(";")
        if any(k in frames[-1] for k in IDLE):
            continue
        busy += n
        label = "other"
        for frame in reversed(frames):
            hit = next((lab for lab, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit:
                label = hit
                break
        counts[label] = counts.get(label, 0) + n
    return {"samples": total, "busy_samples": busy,
            "busy_share": {k: round(v / max(busy, 1), 3) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}}


def table(r: dict) -> str:
    e2e, parts = r["end_to_end"], r["parts"]
    base = e2e["transformers_single_process"]["decode_ms_median"]
    lines = [f"# Where a decode step's time goes: {r['model']} ({r['params'] / 1e6:.0f}M), loopback, 1 torch thread",
             "", f"Command: `{r['command']}` · {r['machine']} · load average {r['load_average'][0]:.1f} at start", "",
             "| end to end | decode ms/token (median) | added vs transformers | added per stage |",
             "|---|---|---|---|", f"| transformers, one process | {base:.2f} | – | – |"]
    for key, row in e2e["distributed"].items():
        n = int(key.split("-")[0])
        added = row["decode_ms_median"] - base
        lines.append(f"| {key} | {row['decode_ms_median']:.2f} | {added:+.2f} ({row['decode_ms_median'] / base:.2f}×) | "
                     f"{added / n:+.2f} |")
    lines += ["", "| part (one decode step) | ms (median) |", "|---|---|"]
    lines += [f"| {k.removesuffix('_ms').replace('_', ' ')} | {v:.3f} |" for k, v in parts.items()]
    for key, segs in r.get("timeline", {}).items():
        lines += ["", f"One decode step, {key}, stamp by stamp (`benchmarks/_timeline.py`; medians over the steps; "
                  "a segment seen in fewer steps than the others is an order that happened only sometimes):", "",
                  "| segment | ms (median) | steps |", "|---|---|---|"]
        lines += [f"| {s['segment']} | {s['ms_median']:.3f} | {s['steps']} |" for s in segs]
    for who, prof in r.get("profile", {}).items():
        lines += ["", f"py-spy, {who} process, 1-stage decode: {prof['busy_samples']} busy samples of {prof['samples']} "
                  "(every thread at 500 Hz; a thread blocked in a wait is idle and left out):", "",
                  "| where the busy samples are | share |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in prof["busy_share"].items()]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", choices=["58m"], default="58m")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="py-spy the client and a worker during a 1-stage decode")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        ap.error("--profile runs py-spy, which is not installed here: `pip install py-spy` (a benchmark-only tool)")
    torch.set_num_threads(1)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory()
    path = synthetic_checkpoint(Path(tmp.name) / "m")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg = model.config
    ids = torch.randint(10, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    r = {"model": f"synthetic_{args.synthetic}", "params": sum(p.numel() for p in model.parameters()),
         "command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
         f"Python {platform.python_version()}, torch {torch.__version__}", "load_average": os.getloadavg(),
         "parts": {**client_parts(model, cfg.hidden_size), **layer_parts(path, model, cfg.num_hidden_layers)}}
    r["end_to_end"] = {"transformers_single_process": bench_local(path, ids, args.new_tokens, args.repeats),
                       "distributed": {}}
    with bb.connect(n_workers=3) as cluster:
        probe = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster,
                                                               workers=cluster.worker_addresses()[:1])
        r["parts"].update(dask_parts(cluster, probe))
        probe.close()
        for n in (1, 2, 3):
            r["end_to_end"]["distributed"][f"{n}-chain"] = bench_distributed(cluster, path, n, ids, args.new_tokens,
                                                                            args.repeats, "chain")
        if args.profile:
            r["profile"] = profile(cluster, path, ids, out)
        r["timeline"] = timeline(cluster, path, ids, args.new_tokens, args.repeats)  # last: it wraps functions
    r["load_average_after"] = os.getloadavg()
    stem = f"latency_{r['model']}"
    (out / f"{stem}.json").write_text(json.dumps(r, indent=2))
    (out / f"{stem}.md").write_text(table(r))
    print(table(r))


if __name__ == "__main__":
    main()

"""The OpenAI endpoint under load: N concurrent streaming clients against `bloombee_nb.serve`.

    python benchmarks/bench_serve.py                       # loopback embedded cluster, 1..32 clients
    sudo python benchmarks/bench_serve.py --link 100,50    # workers behind the link emulator (100 Mbit/s, 50 ms RTT)
    python benchmarks/bench_serve.py --quick               # 1 and 4 clients

The shipped tiny model split 2 + 2 + 2 over three workers, served over HTTP on 127.0.0.1 by
the same server `bloombee-nb serve` runs, in its two modes, one after the other on the same
workers: ``latency`` (the default: each request's steps go alone; steps that reach a stage
together still run as one forward) and ``throughput`` (``--throughput``: the concurrent requests'
decode steps travel the chain together, one message per hop). The clients are the official ``openai`` package's
``AsyncOpenAI`` in a separate process (so they do not share the server's interpreter), all
started together; each streams one greedy completion of ``--new-tokens`` tokens for its own
prompt. Per client: time to first token (request sent → first text chunk) and decode tokens/s
(tokens after the first / time after the first); for the run: aggregate tokens/s (all tokens /
makespan), how many decode steps each stage forward ran (concurrent sessions merging), and
whether every client's text equals single-process transformers' greedy text (``exact``).

``--peer llama-cpp`` compares with a peer's OpenAI server on one model: SmolLM2-135M-Instruct's
Q4_1 GGUF (``python -m bloombee_nb.model.gguf`` fetches it) behind llama-cpp-python's server
(``pip install "llama-cpp-python[server]"``; on this machine it compiles llama.cpp from source,
so it may live in its own environment: ``--peer-python /path/to/python``) and behind ``bloombee-nb
serve`` (the same file, dequantized once by transformers, 30 layers over the 3 workers)::

    python benchmarks/bench_serve.py --peer llama-cpp --peer-python /work/llamacpp-venv/bin/python

Writes benchmarks/results/serve[_<link>].json, .md (table) and .png (``serve_peer_llama_cpp.*``
for the peer comparison).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bloombee_nb as bb
from bloombee_nb import serve
from bloombee_nb.serve import ServeSettings
from bloombee_nb.shipped import default_model_path

RESULTS = Path(__file__).parent / "results"
SPANS = [(0, 2), (2, 4), (4, 6)]
MODES = {"latency": {}, "throughput": {"group": True}}   # from_pretrained keywords (the CLI's --throughput)
USERS = (1, 2, 4, 8, 16, 32)
SNIPPETS = ["def fibonacci(n):", "import os", "class Config:", "for i in range(", "def main():", "with open(",
            "from collections import", "try:", "def __init__(self", "return sorted(", "if __name__ ==", "while True:"]


def prompt(i: int) -> str:
    return SNIPPETS[i % len(SNIPPETS)] + " " * (i // len(SNIPPETS))


# ---- the clients (run in another process) ---------------------------------------------------

def load(url: str, n: int, new_tokens: int, model: str = "tiny-llama") -> list[dict]:
    return asyncio.run(_load(url, n, new_tokens, model))


async def _load(url: str, n: int, new_tokens: int, model: str) -> list[dict]:
    import httpx2
    from openai import AsyncOpenAI

    limits = httpx2.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    client = AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600,
                         http_client=httpx2.AsyncClient(limits=limits, timeout=600))
    return await asyncio.gather(*(_one(client, model, prompt(i), new_tokens) for i in range(n)))


async def _one(client, model: str, text: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    stream = await client.completions.create(model=model, prompt=text, max_tokens=new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].text)
            chunks += 1
        if chunk.usage:
            usage = chunk.usage.completion_tokens
    end = time.perf_counter()
    # llama-cpp-python's server sends no usage when streaming: one text chunk per token there
    return {"ttft_s": first - t0, "decode_s": end - first, "start": t0, "end": end,
            "tokens": usage if usage is not None else chunks, "text": "".join(pieces)}


# ---- the server side ------------------------------------------------------------------------

def reference(n: int, new_tokens: int, tok, gguf: Path | None = None) -> list[str]:
    """Single-process transformers' greedy texts (on a GGUF file: transformers' own GGUF reader)."""
    model = (AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name) if gguf is not None
             else AutoModelForCausalLM.from_pretrained(default_model_path())).eval()
    out = []
    with torch.inference_mode():
        for i in range(n):
            ids = tok(prompt(i), return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def run(url: str, model, pool, n: int, new_tokens: int, want: list[str], name: str = "tiny-llama") -> dict:
    """``n`` clients streaming from ``url`` at once; ``model``: ours (its stages count merged steps) or None."""
    before = model.chain.info() if model is not None else []
    clients = pool.submit(load, url, n, new_tokens, name).result()
    after = model.chain.info() if model is not None else []
    steps = sum(a["steps"] - b["steps"] for a, b in zip(after, before))
    forwards = sum(a["forwards"] - b["forwards"] for a, b in zip(after, before))
    makespan = max(c["end"] for c in clients) - min(c["start"] for c in clients)
    tokens = sum(c["tokens"] for c in clients)
    per_client = [(c["tokens"] - 1) / c["decode_s"] for c in clients if c["tokens"] > 1 and c["decode_s"] > 0]
    return {"users": n, "new_tokens": new_tokens, "tokens": tokens, "makespan_s": makespan,
            "aggregate_tokens_per_s": tokens / makespan,
            "ttft_s_mean": statistics.mean(c["ttft_s"] for c in clients),
            "ttft_s_max": max(c["ttft_s"] for c in clients),
            "client_tokens_per_s_mean": statistics.mean(per_client), "client_tokens_per_s_min": min(per_client),
            "steps_per_forward": steps / forwards if forwards else None,
            "exact": [c["text"] for c in clients] == want[:n],
            "same_text_as_reference": sum(c["text"] == w for c, w in zip(clients, want)) / n}


def direct(model, tok, n: int, new_tokens: int) -> float:
    """The same n greedy generations without HTTP: n threads calling model.generate (aggregate tokens/s)."""
    counts, threads = [0] * n, []

    def one(i: int) -> None:
        ids = tok(prompt(i), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        counts[i] = out.shape[1] - ids["input_ids"].shape[1]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def serve_mode(cluster, tok, mode: str, kwargs: dict, users: tuple[int, ...], new_tokens: int,
               want: list[str], path: str | None = None, name: str | None = None, spans=SPANS,
               direct_too: bool = True) -> list[dict]:
    """One server for one mode; every number of clients in turn (``spans=None``: an even split)."""
    placed = {"workers": cluster.worker_addresses(), "spans": spans} if spans else {}
    model = bb.DistributedModelForCausalLM.from_pretrained(path or default_model_path(), cluster=cluster,
                                                           **placed, **kwargs)
    server = serve.serve(model, tok, name, port=0,
                         settings=ServeSettings(max_running=max(users), max_queue=max(users)))
    name, rows = server.app.state.bloombee.engine.name, []
    try:
        with ProcessPoolExecutor(1) as pool:
            run(server.url, model, pool, 2, 8, want, name)  # warm-up: first-call costs on every side
            for n in users:
                r = {"mode": mode, **run(server.url, model, pool, n, new_tokens, want, name)}
                # the same generations without HTTP, right after, same conditions
                r["direct_tokens_per_s"] = direct(model, tok, n, new_tokens) if direct_too else None
                rows.append(r)
                _print(r)
    finally:
        server.stop()
        model.close()
    return rows


def _print(r: dict) -> None:
    no_http = f" (direct, no HTTP: {r['direct_tokens_per_s']:.1f})" if r.get("direct_tokens_per_s") else ""
    steps = f", {r['steps_per_forward']:.2f} steps/forward" if r.get("steps_per_forward") else ""
    print(f"{r['mode']}, {r['users']:>2} clients: {r['aggregate_tokens_per_s']:.1f} tok/s total{no_http}, per client "
          f"{r['client_tokens_per_s_mean']:.1f} tok/s, TTFT {r['ttft_s_mean'] * 1e3:.0f} ms (max "
          f"{r['ttft_s_max'] * 1e3:.0f}){steps}, exact={r['exact']}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, nargs="*", help=f"numbers of concurrent clients (default {USERS})")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--link", default=None, metavar="MBIT,RTT_MS",
                    help="workers behind the link emulator (root: namespaces + tc; else in-process shaping)")
    ap.add_argument("--quick", action="store_true", help="1 and 4 clients")
    ap.add_argument("--peer", choices=["llama-cpp"], default=None,
                    help="SmolLM2 GGUF: llama-cpp-python's OpenAI server against bloombee-nb serve on the same file")
    ap.add_argument("--peer-python", default=os.environ.get("BLOOMBEE_NB_PEER_PYTHON", sys.executable),
                    help="a Python with llama-cpp-python[server] installed (default: this one)")
    ap.add_argument("--peer-threads", type=int, default=os.cpu_count(), help="llama.cpp's threads")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the workers share these cores: more threads here stall everyone (DESIGN.md)
    users = tuple(args.users) if args.users else ((1, 4) if args.quick else USERS)
    if args.peer:
        return peer_main(args, users)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    want = reference(max(users), args.new_tokens, tok)
    rows, load_before = [], os.getloadavg()[0]
    with _cluster(args.link) as (cluster, emulation):
        for mode, kwargs in MODES.items():
            rows += serve_mode(cluster, tok, mode, kwargs, users, args.new_tokens, want)
    out = "serve" + (f"_{args.link.replace(',', '_')}" if args.link else "")
    result = {"benchmark": "serve", "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "model": "shipped tiny-llama (6 layers, hidden 256, fp32)", "spans": SPANS, "link": emulation,
              "load_avg_1min": [load_before, os.getloadavg()[0]],  # the machine is shared: how busy it was
              "modes": MODES, "clients": "openai.AsyncOpenAI, streaming, one process", "command": _command(args),
              "rows": rows}
    _write(result, out)


def _command(args) -> str:
    return ("python benchmarks/bench_serve.py" + (" --quick" if args.quick else "")
            + (f" --users {' '.join(map(str, args.users))}" if args.users else "")
            + (f" --new-tokens {args.new_tokens}" if args.new_tokens != 32 else "")
            + (f" --link {args.link}" if args.link else "")
            + (f" --peer {args.peer} --peer-python {args.peer_python} --peer-threads {args.peer_threads}"
               if args.peer else ""))


def _write(result: dict, out: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{out}.md").write_text(table(result))
    plot(result, RESULTS / f"{out}.png")
    print(table(result))

# ---- a peer's OpenAI server on the same model: llama-cpp-python on the SmolLM2 GGUF ------------

PEER_NAME = "smollm2"   # the model id both servers answer to


def peer_main(args, users: tuple[int, ...]) -> None:
    """SmolLM2-135M-Instruct: its Q4_1 GGUF behind llama-cpp-python's OpenAI server, and the same
    file (dequantized once by transformers, as bloombee_nb reads every GGUF) behind `bloombee-nb
    serve` on the embedded 3-worker cluster in both modes; the same clients against each, one server
    at a time. A peer that cannot be installed or started is recorded as such (``peer.error``)."""
    from bloombee_nb.model.checkpoint import resolve_checkpoint
    from bloombee_nb.model.gguf import smollm2_gguf

    gguf = smollm2_gguf()
    folder = resolve_checkpoint(gguf)
    tok = AutoTokenizer.from_pretrained(folder)
    memo = Path(tempfile.gettempdir()) / f"bench_serve_ref_{gguf.stat().st_size}_{max(users)}_{args.new_tokens}.json"
    want = json.loads(memo.read_text()) if memo.is_file() else reference(max(users), args.new_tokens, tok, gguf)
    memo.write_text(json.dumps(want))  # a rerun skips the slow single-process reference
    rows, load_before = [], os.getloadavg()[0]
    peer = {"server": "llama-cpp-python's OpenAI server (python -m llama_cpp.server), llama.cpp on the Q4_1 GGUF "
                      "itself, one process", "python": args.peer_python, "threads": args.peer_threads}
    try:
        peer["version"], rows_peer = run_llama_cpp(args.peer_python, gguf, args.peer_threads, users,
                                                   args.new_tokens, want)
        rows += rows_peer
    except PeerUnavailable as exc:
        peer["error"] = str(exc)
        print(f"peer not measured: {exc}", flush=True)
    with _cluster(None) as (cluster, emulation):
        for mode, kwargs in MODES.items():
            rows += serve_mode(cluster, tok, mode, kwargs, users, args.new_tokens, want, path=str(gguf),
                               name=PEER_NAME, spans=None, direct_too=False)
    result = {"benchmark": "serve_peer", "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
              "model": f"SmolLM2-135M-Instruct ({gguf.name}; ours: dequantized to fp32, 30 layers over 3 workers)",
              "ours": "bloombee-nb serve, embedded LocalCluster, 3 workers (1 torch thread each), both modes",
              "peer": peer, "link": emulation, "load_avg_1min": [load_before, os.getloadavg()[0]], "modes": MODES,
              "clients": "openai.AsyncOpenAI, streaming, one process", "command": _command(args), "rows": rows,
              "notes": "exact: every client's text equals single-process transformers greedy on the dequantized "
                       "weights; llama.cpp computes with the quantized weights (Q4_1 x Q8 dot products), so its "
                       "text may differ: same_text_as_reference says how often it does not"}
    _write(result, "serve_peer_llama_cpp")


class PeerUnavailable(RuntimeError):
    """The peer's server cannot run here (not installed, or it did not start)."""


def run_llama_cpp(python: str, gguf: Path, threads: int, users: tuple[int, ...], new_tokens: int,
                  want: list[str]) -> tuple[str, list[dict]]:
    """Start llama-cpp-python's server on ``gguf``, load it with each number of clients, stop it."""
    import socket
    import subprocess
    import sys

    check = "import llama_cpp, llama_cpp.server, sys; sys.stdout.write(llama_cpp.__version__)"
    probe = subprocess.run([python, "-c", check], capture_output=True, text=True)
    if probe.returncode != 0:
        raise PeerUnavailable(f"llama-cpp-python[server] is not importable by {python}: "
                              f"{probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [python, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", PEER_NAME, "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_ctx", "2048", "--verbose", "False"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url, rows = f"http://127.0.0.1:{port}/v1", []
    try:
        _wait_http(url + "/models", proc)
        with ProcessPoolExecutor(1) as pool:
            run(url, None, pool, 2, 8, want, PEER_NAME)  # warm-up
            for n in users:
                r = {"mode": "llama-cpp-python", **run(url, None, pool, n, new_tokens, want, PEER_NAME)}
                rows.append(r)
                _print(r)
    finally:
        proc.terminate()
        proc.wait(30)
    return probe.stdout.strip(), rows


def _wait_http(url: str, proc, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise PeerUnavailable(f"the peer's server exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise PeerUnavailable(f"the peer's server did not answer {url} within {timeout_s:.0f} s")


class _cluster:
    """(cluster, label): the embedded loopback cluster, or one behind the link emulator."""

    def __init__(self, link: str | None):
        self.link, self.ctx = link, None

    def __enter__(self):
        if self.link is None:
            self.cluster = bb.connect(n_workers=3)
            self.cluster.wait_for_workers(3, 60)
            return self.cluster, "loopback (embedded LocalCluster)"
        from bloombee_nb.cluster import linkemu

        rate, rtt = (float(x) for x in self.link.split(","))
        self.ctx = linkemu.emulated_cluster(n_workers=3)
        cluster, shape = self.ctx.__enter__()
        return cluster, f"{rate:g} Mbit/s, {rtt:g} ms RTT: " + shape(rate, rtt)

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        self.cluster.close()


def table(result: dict) -> str:
    head = ("| mode | clients | aggregate tok/s | without HTTP | per-client tok/s (mean / min) | TTFT ms (mean / max) "
            "| steps per forward | exact |\n|---|---:|---:|---:|---:|---:|---:|:---:|\n")
    load = "load average {:.1f} → {:.1f}".format(*result["load_avg_1min"]) if "load_avg_1min" in result else ""
    peer = result.get("peer")
    about = (f"{result['model']}. Ours: {result['ours']}. Peer: {peer['server']}"
             + (f" {peer['version']}, {peer['threads']} threads" if "version" in peer else "")
             + (f" — NOT MEASURED: {peer['error']}" if "error" in peer else "") + ".\n\n") if peer else ""
    return (f"Command: `{result['command']}` — {result['link']}, {result['machine']} {load}\n\n" + about + head
            + "".join(
        f"| {r['mode']} | {r['users']} | {r['aggregate_tokens_per_s']:.1f} | "
        f"{_num(r.get('direct_tokens_per_s'), '.1f')} | {r['client_tokens_per_s_mean']:.1f} / "
        f"{r['client_tokens_per_s_min']:.1f} | {r['ttft_s_mean'] * 1e3:.0f} / {r['ttft_s_max'] * 1e3:.0f} | "
        f"{_num(r.get('steps_per_forward'), '.2f')} | {_exact(r)} |\n" for r in result["rows"]))


def _num(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _exact(r: dict) -> str:
    if r["exact"]:
        return "yes"
    return f"NO ({r['same_text_as_reference']:.0%} same)" if "same_text_as_reference" in r else "NO"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    for mode, color in zip(modes, ("tab:blue", "tab:orange", "tab:green")):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        n = [r["users"] for r in rows]
        a.plot(n, [r["aggregate_tokens_per_s"] for r in rows], "o-", color=color, label=f"{mode}: aggregate")
        a.plot(n, [r["client_tokens_per_s_mean"] for r in rows], "s--", color=color, label=f"{mode}: per client")
        if rows and rows[0].get("direct_tokens_per_s") is not None:
            a.plot(n, [r["direct_tokens_per_s"] for r in rows], ":", color=color, label=f"{mode}: aggregate, no HTTP")
        b.plot(n, [r["ttft_s_mean"] * 1e3 for r in rows], "o-", color=color, label=f"{mode}: mean")
        b.plot(n, [r["ttft_s_max"] * 1e3 for r in rows], "s--", color=color, label=f"{mode}: max")
    n = sorted({r["users"] for r in result["rows"]})
    a.set(xscale="log", xlabel="concurrent streaming clients", ylabel="tokens/s", title="throughput")
    b.set(xscale="log", xlabel="concurrent streaming clients", ylabel="ms", title="time to first token")
    for ax in (a, b):
        ax.set_xticks(n, [str(x) for x in n])
        ax.legend(fontsize=8)
    what = ("SmolLM2-135M GGUF: bloombee-nb serve (latency, throughput) vs llama-cpp-python's server"
            if result.get("peer") else "bloombee-nb serve, tiny-llama 2+2+2")
    fig.suptitle(f"{what} — {result['link'][:60]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

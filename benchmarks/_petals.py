"""A real Petals 2.2 swarm on this machine, to measure bloombee_nb against it in the same run.

Petals 2.2.0.post1 pins transformers < 4.35 and hivemind 1.1.10, so it lives in its own venv
(``ensure_petals_venv``): hivemind 1.1.11 installed with ``--no-deps`` (1.1.10's wheels no longer
install) plus the Linux ``p2pd`` binary taken from the hivemind 1.1.12 wheel, pydantic 2 (what
hivemind 1.1.11 needs; Petals' ``pydantic<2`` pin is only a pin), and the torch on disk.

The swarm (``PetalsSwarm``) runs inside a network namespace made by ``unshare --net`` that has only
loopback, so its DHT cannot reach any outside host (Petals' default initial peers are public). A
``sleep`` holds the namespace; the DHT root, every server and every client are started in it with
``nsenter --net=/proc/<pid>/ns/net``. Every process runs torch with 1 thread (OMP_NUM_THREADS=1).

With ``link=(mbit, rtt_ms)`` every server is reached only through a delay line in the namespace
(``_delayline.py``): the server listens on one port and announces another, where the delay line
holds each chunk for the link's rate and half its round trip in either direction. The client's
requests and the servers' pushes to the next server both cross it, as every message our stages
send is held by the link emulator (this kernel has no ``netem``). The DHT's traffic is not delayed.

This file is imported by the benchmarks (the main venv) and is also the client script run by the
Petals venv (``python _petals.py client``): it imports nothing of bloombee_nb and nothing of
Petals at module level.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

PETALS = "petals==2.2.0.post1"
HIVEMIND = "hivemind==1.1.11"        # installed with --no-deps
P2PD_WHEEL = "hivemind==1.1.12"      # only its Linux p2pd binary is used
TORCH = "torch==2.13.0"              # the CPU build on this machine's disk
# Petals 2.2.0.post1's install_requires (minus the hivemind pin) and hivemind 1.1.11's, as floors
# and the caps of its era (transformers < 4.35, accelerate < 0.24 for huggingface-hub 0.17, numpy 1).
REQUIREMENTS = [
    "transformers>=4.32,<4.35", "accelerate>=0.22,<0.24", "huggingface-hub>=0.11.1,<1", "tokenizers>=0.13.3",
    "pydantic>=2", "humanfriendly", "async-timeout>=4.0.2", "packaging>=20.9", "sentencepiece>=0.1.99",
    "safetensors>=0.3.1", "Dijkstar>=2.6", "cpufeature>=0.2", "peft==0.5.0", "tensor-parallel==1.0.23",
    "speedtest-cli==2.1.3", "bitsandbytes==0.41.1", "PyYAML", "numpy>=1.17,<2", "scipy>=1.2.1", "prefetch_generator>=1.0.1",
    "msgpack>=0.5.6", "sortedcontainers", "uvloop>=0.14", "grpcio-tools>=1.33.2", "protobuf>=5.29",
    "configargparse>=1.2.3", "py-multihash>=0.2.3", "cryptography>=3.4.6", "varint>=1.0.2", "base58>=1.0.2",
    "netaddr>=1.3", "idna>=3.10", "py-cid>=0.3", "psutil", "requests",
]
DEFAULT_VENV = Path(os.environ.get("PETALS_VENV", "/tmp/petals-venv"))
ENV_1_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
RESULT_MARK = "PETALS_RESULT "
DHT_PREFIX = "bloombee-bench"


# ---- the venv ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PetalsEnv:
    """Where Petals can run: ``python`` of its venv, or ``why_not`` (a sentence) when it cannot."""
    python: str | None
    why_not: str | None = None
    versions: dict = field(default_factory=dict)


def ensure_petals_venv(venv: Path = DEFAULT_VENV) -> PetalsEnv:
    """Create (once) the Petals venv; idempotent: a stamp file marks a venv that imported fine."""
    venv = Path(venv)
    python, stamp = venv / "bin" / "python", venv / "bloombee_petals_ok.json"
    if stamp.exists() and python.exists():
        return PetalsEnv(str(python), versions=json.loads(stamp.read_text()))
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return PetalsEnv(None, f"`{tool}` is not installed: the swarm needs a network namespace")
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        return PetalsEnv(None, "`unshare --net` failed (needs root or user namespaces)")
    try:
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)])
        pip = [str(python), "-m", "pip", "install", "-q"]
        _run([*pip, TORCH])
        _run([*pip, "--no-deps", PETALS, HIVEMIND])
        _run([*pip, *REQUIREMENTS])
        _install_p2pd(python)
        out = _run([str(python), "-c", "import json, petals, hivemind, transformers, torch, pydantic; print(json.dumps("
                    "{m.__name__: m.__version__ for m in (petals, hivemind, transformers, torch, pydantic)}))"])
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        return PetalsEnv(None, f"installing Petals failed: {' '.join(exc.cmd[:6])}...: {' | '.join(tail)}")
    stamp.write_text(out.strip().splitlines()[-1])
    return PetalsEnv(str(python), versions=json.loads(stamp.read_text()))


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _install_p2pd(python: Path) -> None:
    """hivemind 1.1.11's py3-none-any wheel ships a macOS arm64 p2pd; put the Linux one from the
    1.1.12 manylinux wheel in its place."""
    site = _run([str(python), "-c", "import hivemind, os; print(os.path.dirname(hivemind.__file__))"]).strip()
    target = Path(site) / "hivemind_cli" / "p2pd"
    if target.exists() and target.read_bytes()[:4] == b"\x7fELF":
        return
    dl = python.parent.parent / "p2pd-wheel"
    _run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:", P2PD_WHEEL, "-d", str(dl)])
    wheel = next(dl.glob("hivemind-1.1.12-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(z.read("hivemind/hivemind_cli/p2pd"))
    target.chmod(0o755)


# ---- the swarm -----------------------------------------------------------------------------------
class PetalsSwarm:
    """A DHT root and ``n_servers`` Petals servers, each serving ``blocks_per_server`` consecutive
    blocks of ``model_dir`` (a local save_pretrained checkpoint), all inside one loopback-only
    network namespace. ``client(request)`` runs one client process there; ``client_processes``
    starts several at once. Server logs go to ``logs``."""

    SERVER_PORT, LINK_PORT = 40000, 41000  # server i listens on 40000 + i; with a link, announces 41000 + i

    def __init__(self, model_dir: str, n_servers: int, blocks_per_server: int | None = None, *, python: str,
                 logs: Path, dtype: str = "float32", start_timeout_s: float = 600,
                 link: tuple[float, float] | None = None):
        self.model_dir, self.n, self.link = str(model_dir), n_servers, link
        self.spans = server_spans(_num_layers(model_dir), n_servers, blocks_per_server)
        self.python, self.logs, self.dtype, self.timeout_s = python, Path(logs), dtype, start_timeout_s
        self.procs: list[subprocess.Popen] = []
        self.initial_peer = ""

    def __enter__(self) -> "PetalsSwarm":
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                                             "ip link set lo up && exec sleep 100000"], start_new_session=True)
            self._wait_loopback()
            if self.link:
                self._start_delayline()
            self._start_dht()
            for i in range(self.n):
                self._start_server(i)
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        """Kill each process group we started (a server forks connection handlers and a p2pd that
        outlive a plain SIGTERM to the server), then the namespace's holder."""
        for p in [*reversed(self.procs), getattr(self, "_holder", None)]:
            if p is not None:
                _kill_group(p)

    def nsenter(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self._holder.pid}/ns/net", "--", *argv]

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.nsenter([self.python, *argv]), stdout=open(self.logs / log, "w"),
                                stderr=subprocess.STDOUT, env=dict(os.environ, **ENV_1_THREAD), cwd=self.logs,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_loopback(self) -> None:
        for _ in range(100):
            out = subprocess.run(self.nsenter(["ip", "-o", "link", "show", "lo"]), capture_output=True, text=True)
            if "LOWER_UP" in out.stdout:
                return
            time.sleep(0.05)
        raise RuntimeError("the network namespace's loopback did not come up")

    def _start_dht(self) -> None:
        self._spawn(["-m", "petals.cli.run_dht", "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
                     "--identity_path", str(self.logs / "dht.id")], "dht.log")
        self.initial_peer = self._wait_log("dht.log", r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", self.procs[-1])

    def _start_delayline(self) -> None:
        mbit, rtt_ms = self.link
        pairs = [f"{self.LINK_PORT + i}:{self.SERVER_PORT + i}" for i in range(self.n)]
        proc = self._spawn([str(Path(__file__).with_name("_delayline.py")), "--rtt-ms", str(rtt_ms), "--mbit", str(mbit),
                            "--stats", str(self.logs / "delayline.json"), *pairs], "delayline.log")
        self._wait_log("delayline.log", r"(READY)", proc)

    def link_bytes(self) -> dict:
        """Bytes each server's delay line forwarded so far, ``{"LINK:SERVER": {"in": …, "out": …}}``."""
        path = self.logs / "delayline.json"
        return json.loads(path.read_text()) if self.link and path.exists() else {}

    def _start_server(self, i: int) -> None:
        first, end = self.spans[i]
        port = self.SERVER_PORT + i if self.link else 0
        announce = ["--announce_maddrs", f"/ip4/127.0.0.1/tcp/{self.LINK_PORT + i}"] if self.link else []
        self._spawn(["-m", "petals.cli.run_server", self.model_dir, "--initial_peers", self.initial_peer,
                     "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}", *announce, "--block_indices", f"{first}:{end}",
                     "--torch_dtype", self.dtype, "--device", "cpu", "--throughput", "1",  # no speed test
                     "--no_auto_relay", "--skip_reachability_check", "--cache_dir", str(self.logs / "cache"),
                     "--identity_path", str(self.logs / f"server{i}.id"),
                     "--dht_prefix", DHT_PREFIX], f"server{i}.log")  # a local path gives no prefix of its own

    def _wait_ready(self) -> None:
        for i, proc in enumerate(self.procs[-self.n:]):
            self._wait_log(f"server{i}.log", r"(Started|ONLINE|are online)", proc)

    def _wait_log(self, log: str, pattern: str, proc: subprocess.Popen) -> str:
        """Poll ``log`` until ``pattern`` shows up; fail with the log's tail if ``proc`` dies."""
        deadline = time.time() + self.timeout_s
        while time.time() < deadline:
            text = (self.logs / log).read_text(errors="replace")
            if m := re.search(pattern, text):
                return m.group(1)
            if proc.poll() is not None:
                raise RuntimeError(f"Petals {log} exited ({proc.returncode}): {text[-1500:]}")
            time.sleep(0.2)
        raise TimeoutError(f"Petals {log} not ready after {self.timeout_s:.0f} s")

    def server_memory(self) -> dict:
        """Memory of the servers and the processes they started (connection handlers, p2pd):
        RSS summed (counts pages shared by forked handlers once per process) and PSS (each shared
        page split between its sharers: the memory the servers really hold)."""
        import psutil

        procs = [q for proc in self.procs[-self.n:] for p in [psutil.Process(proc.pid)] for q in [p, *p.children(recursive=True)]]
        info = [q.memory_full_info() for q in procs]
        return {"rss_bytes": sum(i.rss for i in info), "pss_bytes": sum(i.pss for i in info), "processes": len(procs)}

    def client_processes(self, requests: list[dict], timeout_s: float = 900) -> list[dict]:
        """Start one client process per request, let each load its model, then start them together
        (all loaded before the first token); return each process's result. Clients still running
        after ``timeout_s`` are killed (their result then raises with the log's tail)."""
        procs = [subprocess.Popen(self.nsenter([self.python, __file__, "client"]), stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=open(self.logs / f"client{i}.log", "w"), text=True,
                                  env=dict(os.environ, **ENV_1_THREAD), start_new_session=True) for i in range(len(requests))]
        for p, req in zip(procs, requests):
            p.stdin.write(json.dumps(dict(req, model=self.model_dir, initial_peer=self.initial_peer)) + "\n")
            p.stdin.flush()
        timer = threading.Timer(timeout_s, lambda: [_kill_group(p) for p in procs])
        timer.start()
        try:
            for i, p in enumerate(procs):
                _read_result(p, f"client{i}.log", self.logs)  # {"ready": true}
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
            return [_read_result(p, f"client{i}.log", self.logs) for i, p in enumerate(procs)]
        finally:
            timer.cancel()
            for p in procs:  # a client's DHT is a forked process that outlives it: end the whole group
                _kill_group(p)

    def client(self, request: dict, timeout_s: float = 900) -> dict:
        return self.client_processes([request], timeout_s)[0]


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads (it was started with ``start_new_session``)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _num_layers(model_dir: str) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]


def server_spans(n_layers: int, n_servers: int, per: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [first, end) blocks per server: ``per`` each (the last one clipped), or an even
    split (the first servers take one more) when ``per`` is None."""
    if per is None:
        sizes = [n_layers // n_servers + (i < n_layers % n_servers) for i in range(n_servers)]
    else:
        sizes = [max(0, min(per, n_layers - i * per)) for i in range(n_servers)]
    if 0 in sizes or sum(sizes) < n_layers:
        raise ValueError(f"{n_servers} servers x {per} blocks do not cover {n_layers} layers exactly once")
    ends = [sum(sizes[:i + 1]) for i in range(n_servers)]
    return [(e - s, e) for s, e in zip(sizes, ends)]


def _read_result(proc: subprocess.Popen, log: str, logs: Path) -> dict:
    for line in proc.stdout:
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise RuntimeError(f"Petals client exited ({proc.wait()}): {(logs / log).read_text()[-1500:]}")


# ---- timing one greedy generation (runs in either venv) ----------------------------------------------
class TimedStreamer:
    """A transformers streamer that stamps each ``put``: the first put is the prompt, the next
    ones the new tokens, so TTFT and per-token gaps come from the same clock for every system."""

    def __init__(self):
        self.t0, self.stamps, self.tokens = time.perf_counter(), [], []

    def put(self, value):
        self.stamps.append(time.perf_counter())
        if len(self.stamps) > 1:
            self.tokens += value.reshape(-1).tolist()

    def end(self):
        pass


def timed_generate(model, ids, new_tokens: int) -> dict:
    """Greedy ``generate`` of ``new_tokens`` after ``ids`` [1, T]: TTFT, per-token gaps, tokens."""
    s = TimedStreamer()
    s.t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   streamer=s, pad_token_id=0)
    return {"ttft_s": s.stamps[1] - s.t0, "decode_s": [b - a for a, b in zip(s.stamps[1:], s.stamps[2:])],
            "total_s": s.stamps[-1] - s.t0, "tokens": s.tokens}


def summarize(runs: list[dict], new_tokens: int) -> dict:
    """The same summary for every system: medians over the measured (not warm-up) runs."""
    decode = [d for r in runs for d in r["decode_s"]]
    return {"decode_ms_median": 1e3 * statistics.median(decode),
            "decode_ms_p90": 1e3 * sorted(decode)[int(0.9 * len(decode))],
            "ttft_ms_median": 1e3 * statistics.median(r["ttft_s"] for r in runs),
            "tokens_per_s": new_tokens / statistics.median(r["total_s"] for r in runs),
            "tokens": runs[-1]["tokens"]}


# ---- the client process (Petals venv) -----------------------------------------------------------------
def _client_main() -> None:
    """Read a request, load the Petals client, say ready, wait for GO, generate, print the result.
    Request: model, initial_peer, prompts (lists of ids), new_tokens, repeats (single user: timed
    runs after a warm-up) or users threads (multi-user: one generation per prompt, in threads)."""
    import torch
    from petals import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)
    req = json.loads(sys.stdin.readline())
    model = AutoDistributedModelForCausalLM.from_pretrained(req["model"], initial_peers=[req["initial_peer"]],
                                                            dht_prefix=DHT_PREFIX, torch_dtype=torch.float32)
    prompts = [torch.tensor([p]) for p in req["prompts"]]
    print(RESULT_MARK + json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # GO
    if req.get("threads"):
        out = _users_in_threads(model, prompts, req["new_tokens"])
    else:
        with torch.inference_mode():
            runs = [timed_generate(model, prompts[0], req["new_tokens"]) for _ in range(req["repeats"] + 1)]
        out = {"runs": runs[1:]}
    print(RESULT_MARK + json.dumps(out), flush=True)
    sys.stderr.flush()
    os._exit(0)  # the client's DHT threads and p2pd keep a normal exit waiting forever


def _users_in_threads(model, prompts, new_tokens: int) -> dict:
    """One greedy generation per prompt, all at once in threads: each user's start, end and tokens."""
    import torch

    users = [None] * len(prompts)

    def user(i):
        with torch.inference_mode():
            t0 = time.time()
            r = timed_generate(model, prompts[i], new_tokens)
            users[i] = {"start": t0, "end": time.time(), "ttft_s": r["ttft_s"], "tokens": r["tokens"]}
    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"users": users}


# ---- many users against the swarm (issue 16 item 6; bench_swarm.py calls this) -----------------------
def petals_multi_user(swarm: PetalsSwarm, prompts: list[list[int]], new_tokens: int, processes: int = 4,
                      timeout_s: float = 900) -> dict:
    """All ``prompts`` (one per user) at once, spread over ``min(len(prompts), processes)`` client
    processes (threads inside each), as bench_swarm spreads its users. Returns a row with the keys
    bench_swarm's rows have (``exact`` is for the caller to fill in: this venv has no reference)."""
    n = min(len(prompts), processes)
    share = [prompts[i::n] for i in range(n)]
    order = [i for k in range(n) for i in range(k, len(prompts), n)]  # user index of each result
    mem_before = swarm.server_memory()
    results = swarm.client_processes([{"prompts": s, "new_tokens": new_tokens, "threads": True} for s in share],
                                     timeout_s)
    users = [None] * len(prompts)
    for i, u in zip(order, [u for r in results for u in r["users"]]):
        users[i] = u
    wall = max(u["end"] for u in users) - min(u["start"] for u in users)
    tokens = sum(len(u["tokens"]) for u in users)
    return dict(mode="petals", users=len(prompts), client_processes=n, tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, ms_per_token_per_user=[1e3 * (u["end"] - u["start"]) / len(u["tokens"])
                                                                   for u in users],
                ttft_ms_per_user=[1e3 * u["ttft_s"] for u in users], user_tokens=[u["tokens"] for u in users],
                server_memory_before=mem_before, server_memory=swarm.server_memory(), servers=swarm.n)


if __name__ == "__main__" and sys.argv[1:] == ["client"]:
    _client_main()

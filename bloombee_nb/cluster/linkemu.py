"""An emulated WAN on one Linux machine: workers in their own network namespaces, shaped links.

    with LinkEmulator(n_workers=3) as emu:          # root only; everything torn down on exit
        emu.shape(rate_mbit=100, rtt_ms=5)           # every link: 100 Mbit/s, 5 ms round trip
        cluster = bb.connect(emu.scheduler_address)  # the client stays in the root namespace
        ...
        emu.shape(rate_mbit=12.5, rtt_ms=50)         # change the links while the cluster runs

What is real and what is not:

- bandwidth is the kernel's: each worker ``i`` lives in namespace ``bbemu-<i>`` with one end of
  a veth pair (``10.231.0.<10+i>``); the other end joins a bridge in the root namespace
  (``10.231.0.1``, where the scheduler and the client run). A ``tc … tbf`` qdisc on *both* ends
  shapes what the worker sends and what it receives, so client→worker, worker→client and
  worker→worker traffic all cross at least one shaper at the set rate;
- latency is not the kernel's: these kernels have no ``netem`` qdisc, so the round-trip time is
  held in the send path of every participant (:mod:`bloombee_nb.transport.emulation`); the
  emulator sets ``BLOOMBEE_EMULATED_RTT_MS`` on the workers (live, through ``client.run``) and in
  this process for the client.

Only addresses inside the namespaces it made (and the bridge it made) are used. Where it cannot
run (not root, no ``ip``/``tc``), :func:`available` says why, and benchmarks fall back to
``BLOOMBEE_EMULATED_MBIT`` — an in-process shaping, labelled as such in their results.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ..transport.emulation import ENV as RTT_ENV
from ..transport.emulation import ENV_MBIT as MBIT_ENV

SUBNET = "10.231.0"
BRIDGE = "bbemu-br"
HUB = f"{SUBNET}.1"


def available() -> str | None:
    """``None`` when the emulator can run here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the `{tool}` command is missing (iproute2)"
    try:
        _sh("ip", "netns", "add", "bbemu-check")
        _sh("ip", "netns", "del", "bbemu-check")
    except subprocess.CalledProcessError as exc:
        return f"cannot create network namespaces: {exc.stderr.strip()}"
    return None


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _tbf(dev: str, rate_mbit: float, netns: str | None = None) -> None:
    rate_bps = rate_mbit * 1e6
    burst = max(32 << 10, int(rate_bps / 8 / 100))  # ≥ 10 ms of traffic (the kernel needs ≥ rate/HZ)
    cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate_bps)}bit",
           "burst", str(burst), "latency", "200ms"]
    _sh(*(["ip", "netns", "exec", netns] if netns else []), *cmd)


class LinkEmulator:
    """Namespaces, veth pairs, a bridge, a scheduler and ``n_workers`` ``bloombee-nb worker`` processes."""

    def __init__(self, n_workers: int = 3, scheduler_port: int = 8799, worker_memory_limit: str = "2GiB"):
        self.n_workers, self.port, self.memory_limit = n_workers, scheduler_port, worker_memory_limit
        self.namespaces = [f"bbemu-{i}" for i in range(n_workers)]
        self.addresses = [f"{SUBNET}.{10 + i}" for i in range(n_workers)]
        self.procs: list[subprocess.Popen] = []
        self.rate_mbit: float | None = None
        self.rtt_ms = 0.0
        self.log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "bbemu-logs"

    @property
    def scheduler_address(self) -> str:
        return f"tcp://{HUB}:{self.port}"

    # ---- set-up and tear-down ---------------------------------------------------------------
    def __enter__(self) -> "LinkEmulator":
        if (why := available()) is not None:
            raise RuntimeError(f"the link emulator cannot run here: {why}")
        self._teardown_network()  # leftovers of a run that was killed
        try:
            self._network()
            self._start_processes()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
        os.environ.pop(RTT_ENV, None)
        self._teardown_network()

    def _network(self) -> None:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{HUB}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses)):
            outer, inner = f"bbemu-v{i}", f"bbemu-p{i}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "master", BRIDGE)
            _sh("ip", "link", "set", outer, "up")
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{addr}/24", "dev", inner)
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", inner, "up")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def _teardown_network(self) -> None:
        for ns in self.namespaces:
            _sh("ip", "netns", "del", ns, check=False)  # takes its veth end (and the pair) with it
        for i in range(self.n_workers):
            _sh("ip", "link", "del", f"bbemu-v{i}", check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)

    def _start_processes(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        bin_dir = Path(sys.executable).parent
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        env.pop(RTT_ENV, None)
        sched = [str(bin_dir / "dask"), "scheduler", "--host", HUB, "--port", str(self.port), "--no-dashboard"]
        self.procs.append(subprocess.Popen(sched, env=env, stdout=open(self.log_dir / "scheduler.log", "w"),
                                           stderr=subprocess.STDOUT))
        _wait_port(HUB, self.port)
        for i, (ns, addr) in enumerate(zip(self.namespaces, self.addresses)):
            cmd = ["ip", "netns", "exec", ns, str(bin_dir / "bloombee-nb"), "worker", self.scheduler_address,
                   "--name", f"emu-{i}", "--listen", addr, "--memory-limit", self.memory_limit]
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=open(self.log_dir / f"worker-{i}.log", "w"),
                                               stderr=subprocess.STDOUT))

    # ---- the links --------------------------------------------------------------------------
    def shape(self, rate_mbit: float, rtt_ms: float = 0.0, client=None) -> None:
        """Every link at ``rate_mbit`` Mbit/s (both directions) and ``rtt_ms`` round trip.

        Pass the Dask ``client`` once workers have joined so their send-path hold changes too.
        """
        for i, ns in enumerate(self.namespaces):
            _tbf(f"bbemu-v{i}", rate_mbit)           # into worker i
            _tbf(f"bbemu-p{i}", rate_mbit, ns)       # out of worker i
        self.rate_mbit, self.rtt_ms = rate_mbit, rtt_ms
        set_rtt(rtt_ms, client)

    def describe(self) -> dict:
        return {"emulation": "network namespaces + veth + tc tbf (bandwidth); send-path hold (RTT)",
                "rate_mbit": self.rate_mbit, "rtt_ms": self.rtt_ms, "workers": self.addresses}


def set_rtt(rtt_ms: float, client=None) -> None:
    """Set the send-path hold of this process (the client) and, given ``client``, of every worker."""
    def setenv(value=str(rtt_ms)):
        os.environ[RTT_ENV] = value

    setenv()
    if client is not None:
        client.run(setenv)


@contextmanager
def emulated_cluster(n_workers: int = 3):
    """``(cluster, shape)`` for a benchmark on slow links: workers behind the namespace emulator
    where it can run, else an embedded cluster whose links are shaped in-process
    (``BLOOMBEE_EMULATED_MBIT``). ``shape(rate_mbit, rtt_ms)`` sets every link and returns a label
    of how it did, for the results. Everything is closed and torn down on exit."""
    from .connect import connect

    why = available()
    emu = LinkEmulator(n_workers=n_workers).__enter__() if why is None else None
    if why is not None:
        print(f"link emulator unavailable ({why}): in-process shaping instead")
    try:
        cluster = connect(emu.scheduler_address) if emu is not None else connect(n_workers=n_workers)
        try:
            cluster.wait_for_workers(n_workers, 60)

            def shape(rate_mbit: float, rtt_ms: float) -> str:
                if emu is not None:
                    emu.shape(rate_mbit, rtt_ms, cluster.client)
                    return emu.describe()["emulation"]
                os.environ[MBIT_ENV] = str(rate_mbit)
                cluster.client.run(lambda r=str(rate_mbit): os.environ.__setitem__(MBIT_ENV, r))
                set_rtt(rtt_ms, cluster.client)
                return "IN-PROCESS shaping (send-path hold of bytes/rate + RTT/2); not a kernel-shaped link"

            yield cluster, shape
        finally:
            cluster.close()
    finally:
        if emu is not None:
            emu.__exit__(None, None, None)


def _wait_port(host: str, port: int, timeout_s: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the emulator's scheduler did not listen on {host}:{port} within {timeout_s:.0f}s")


if __name__ == "__main__":  # a quick check: python -m bloombee_nb.cluster.linkemu
    print(available() or "the link emulator can run here")

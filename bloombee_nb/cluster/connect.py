"""``bb.connect()``: an embedded LocalCluster by default, or an existing Dask scheduler."""

from __future__ import annotations

import html
import importlib.util
import logging
import multiprocessing
import os
import socket
import time
import weakref
from multiprocessing import forkserver
from urllib.parse import urlsplit

import dask
from distributed import Client, LocalCluster
from distributed.utils import get_mp_context

from ..errors import NotEnoughWorkersError

DEFAULT_WORKERS = 3

#: Dask settings for the processes that host stages, where a decode step is latency-bound. With Dask's
#: defaults 8 decoder layers of a 58M Llama took 12.1 ms per decode step in a worker against 11.4 ms in
#: a plain process, 11.65 with both of these (benchmarks/bench_worker_config.py): the worker's
#: statistical profiler samples every thread every 10 ms, holding the GIL between torch's ops, and the
#: nanny's ``MALLOC_TRIM_THRESHOLD_=65536`` makes glibc hand freed activation buffers back to the kernel
#: after every step, so the next step faults them in again. Stage workers keep 16 MiB of freed heap.
STAGE_WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 16 << 20,
}

#: What an embedded cluster's worker processes find imported: they start from a forkserver that imported
#: these once, as Dask's own test suite starts its workers. Spawned (Dask's default), each worker imports
#: torch and transformers itself before it loads a span: the README's first command took 17.0 s on the
#: build machine's 2 cores, 9.4 s so (benchmarks/bench_first_run.py); and the workers share those
#: modules' memory with the server.
FORKSERVER_PRELOAD = ["distributed", "torch", "transformers", "blosc2", "bloombee_nb.cluster.stage"]

EMBEDDED_LOST_WORKER_TIMEOUT = "120s"  # how long an embedded cluster waits for a restarted worker


class BloombeeCluster:
    """A Dask client plus, when we started it, the embedded ``LocalCluster`` behind it.

    Use it as a context manager or call :meth:`close`. The models placed through it are
    remembered (weakly, as their ``Deployment``) so the status panel can show which worker hosts
    which layers, and their recoveries.
    """

    def __init__(self, client: Client, local: LocalCluster | None = None):
        self.client, self.local = client, local
        #: the models placed through this handle (their Deployments): the status panel shows their spans and recoveries
        self.deployments: weakref.WeakSet = weakref.WeakSet()

    @property
    def address(self) -> str:
        return self.client.scheduler.address

    @property
    def dashboard_link(self) -> str | None:
        return self.client.dashboard_link if importlib.util.find_spec("bokeh") else None

    def workers(self) -> dict[str, dict]:
        """address -> Dask's worker info (name, nthreads, memory_limit, …), in a stable order."""
        # asked directly: the client's cached scheduler_info() is refreshed without workers in the background
        info = self.client.sync(self.client.scheduler.identity, n_workers=-1)["workers"]
        return dict(sorted(info.items(), key=lambda kv: (str(kv[1].get("name")), kv[0])))

    def worker_addresses(self) -> list[str]:
        return list(self.workers())

    def wait_for_workers(self, n: int, timeout_s: float = 60) -> None:
        try:
            self.client.wait_for_workers(n, timeout=timeout_s)
        except TimeoutError:
            raise NotEnoughWorkersError(
                f"waited {timeout_s:.0f}s for {n} workers at {self.address}, have {len(self.workers())}; "
                "start more with `bloombee-nb worker " + self.address + "`") from None

    def shares_host(self) -> bool:
        """Whether some worker runs on this machine (then the client competes with it for cores)."""
        if self.local is not None:
            return True
        local = {"127.0.0.1", "localhost", socket.gethostname()}
        try:
            local.add(socket.gethostbyname(socket.gethostname()))
        except OSError:
            pass
        return any(urlsplit(a).hostname in local for a in self.workers())

    def recovery_events(self, last: int = 8) -> list:
        """The latest recoveries of the models placed here (``RecoveryEvent``), oldest first."""
        events = [e for d in list(self.deployments) for e in d.events]
        return sorted(events, key=lambda e: e.at)[-last:]

    def hosted_spans(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for d in list(self.deployments):
            for st in d.placement.stages:
                out.setdefault(st.worker, []).append(f"{d.name}: layers {st.start}–{st.end - 1}")
        return out

    def close(self) -> None:
        self.client.close()
        if self.local is not None:
            self.local.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        kind = "embedded LocalCluster" if self.local is not None else "remote scheduler"
        return f"<BloombeeCluster {self.address} ({kind}), {len(self.workers())} workers>"

    def _repr_html_(self):
        spans = self.hosted_spans()
        rows = "".join(
            f"<tr><td>{html.escape(str(w.get('name')))}{_status_note(w)}</td><td><code>{html.escape(a)}</code></td>"
            f"<td>{w.get('nthreads')}</td><td>{(w.get('memory_limit') or 0) / 2**30:.1f} GiB</td>"
            f"<td>{'<br>'.join(map(html.escape, spans.get(a, []))) or '—'}</td></tr>"
            for a, w in self.workers().items())
        dash = self.dashboard_link
        link = f' · <a href="{html.escape(dash)}" target="_blank">Dask dashboard</a>' if dash else ""
        kind = "embedded LocalCluster" if self.local is not None else "remote scheduler"
        return (f"<div><b>bloombee_nb cluster</b> <code>{html.escape(self.address)}</code> ({kind}){link}"
                "<table><tr><th>worker</th><th>address</th><th>threads</th><th>memory</th><th>hosts</th></tr>"
                f"{rows}</table>{_events_html(self.recovery_events())}</div>")


def _status_note(worker: dict) -> str:
    status = worker.get("status", "running")
    return "" if status == "running" else f" <i>({'leaving' if status == 'closing_gracefully' else status})</i>"


def _events_html(events) -> str:
    """Workers lost and spans re-placed, newest last (a RecoveryEvent per recovered session)."""
    if not events:
        return ""
    lines = "".join(f"<li>{time.strftime('%H:%M:%S', time.localtime(e.at))} {html.escape(e.describe())}</li>"
                    for e in events)
    return f"<div class='bloombee-recoveries'><b>recoveries</b><ul>{lines}</ul></div>"


def preload_forkserver() -> None:
    """Make ``forkserver`` the default start method of Dask's worker processes in this process and
    start the server now, importing :data:`FORKSERVER_PRELOAD` while this process goes on (a server
    already running keeps what it has). It gets the environment Dask's nanny sets before it starts a
    stage worker (``distributed.nanny.pre-spawn-environ`` with :data:`STAGE_WORKER_CONFIG`'s, set here
    in ``os.environ`` as the nanny does). ``bloombee-nb generate`` calls it before its own imports.
    A start method the user configured still wins; a platform without forkserver keeps spawning."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return
    dask.config.update_defaults({"distributed": {"worker": {"multiprocessing-method": "forkserver"}}})
    if dask.config.get("distributed.worker.multiprocessing-method") != "forkserver":
        return
    get_mp_context()  # Dask sets its own preload list once; ours replaces it
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    with dask.config.set(STAGE_WORKER_CONFIG):
        env = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    os.environ.update({k: os.environ.get(k, str(v)) for k, v in env.items() if v is not None})
    forkserver.ensure_running()


def connect(address: str | None = None, *, n_workers: int = DEFAULT_WORKERS, threads_per_worker: int = 1,
            direct_to_workers: bool = True, security=None, **local_kwargs) -> BloombeeCluster:
    """Start an embedded ``LocalCluster`` (``address=None``) or join a running Dask scheduler.

    ``direct_to_workers=True`` sends actor calls straight to workers (~0.5 ms per call instead of
    ~0.75 ms through the scheduler); pass ``False`` when the client is behind NAT (e.g. Colab).
    ``security``: a credentials folder (``bloombee-nb credentials``) or a Dask ``Security``;
    with it an embedded cluster speaks mutual TLS too.
    """
    from .security import load_security

    security = load_security(security)
    if address is None and security is not None:
        local_kwargs.setdefault("protocol", "tls://")
    if address is None:
        local_kwargs.setdefault("dashboard_address", ":0" if importlib.util.find_spec("bokeh") else None)
        local_kwargs.setdefault("silence_logs", logging.WARNING)
        # a killed worker's nanny starts it again, but LocalCluster closes a nanny whose worker is not
        # back within lost-worker-timeout (read when the worker goes, so not scoped like the above):
        # Dask's 15 s is less than a stage worker takes to import torch on a busy 2-core machine (CI
        # lost a worker so). As a default, so a value the user configured still wins.
        dask.config.update_defaults({"distributed": {"deploy": {"lost-worker-timeout": EMBEDDED_LOST_WORKER_TIMEOUT}}})
        with dask.config.set(STAGE_WORKER_CONFIG):  # the nannies keep the config they were made with
            preload_forkserver()  # a default too: a nanny reads it again when it restarts a killed worker
            local = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, processes=True,
                                 security=security, **local_kwargs)
        client = Client(local, direct_to_workers=direct_to_workers, security=security)
        return BloombeeCluster(client, local)
    client = Client(address, direct_to_workers=direct_to_workers, security=security)
    return BloombeeCluster(client)

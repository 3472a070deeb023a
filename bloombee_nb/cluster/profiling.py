"""Measuring the cluster for the planner: per-layer compute, memory per tier, every link.

Everything is measured on the real path: compute by running layer 0 of the actual checkpoint
inside a :class:`SpanRunner` on each worker (decode against a KV cache, prefill at several
lengths); links by sending real frames between the client and a :class:`ProbeActor` on each
worker, and between probe actors (worker -> worker), through the same Dask actor calls the
hidden states take. The result is a :class:`~bloombee_nb.plan.ClusterProfile` value: save it,
edit it by hand to plan for machines that are not here, and show it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from .. import transport
from ..transport.choice import timed_s
from ..transport.emulation import hold_sync
from ..plan.profile import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile

DECODE_BATCHES = (1, 4, 16)
PREFILL_LENGTHS = (16, 64, 256)
CONTEXT = 128          # KV positions held while timing decode
PROBE_SMALL = 64       # payload bytes of an RTT probe
PROBE_TARGET_S = 0.05  # grow bandwidth probes until one transfer takes this long …
PROBE_MAX_BYTES = 16 << 20  # … or reaches this size


def measure_worker(path: str, num_threads: int = 1, repeats: int = 7) -> dict:
    """Runs *on a worker* (a plain Dask task): layer-0 times, memory budgets, slow-tier read speed."""
    from ..model.span import SpanRunner

    torch.set_num_threads(num_threads)
    runner = SpanRunner(path, 0, 1)
    d, dtype = runner.hidden_size, runner.dtype
    decode, prefill = {}, {}
    for b in DECODE_BATCHES:
        runner.open("p", b, CONTEXT + 1)
        pos = torch.arange(CONTEXT).expand(b, CONTEXT)
        runner.forward("p", torch.randn(b, CONTEXT, d, dtype=dtype), pos, torch.ones(b, CONTEXT, dtype=torch.long))

        def step(b=b):
            runner.forward("p", torch.randn(b, 1, d, dtype=dtype), torch.full((b, 1), CONTEXT), torch.ones(b, 1, dtype=torch.long))
            runner.rollback("p", CONTEXT)

        decode[b] = timed_s(step, repeats, min_batch_s=0)
        runner.close("p")
    for n in PREFILL_LENGTHS:
        def run(n=n):
            runner.open("p", 1, n)
            runner.forward("p", torch.randn(1, n, d, dtype=dtype), torch.arange(n)[None], torch.ones(1, n, dtype=torch.long))
            runner.close("p")

        prefill[n] = timed_s(run, repeats, min_batch_s=0)
    return {"decode_layer_s": decode, "prefill_layer_s": prefill, "layer_weight_bytes": runner.weight_bytes,
            "kv_bytes_per_token_per_layer": runner.kv_bytes_per_token, "hidden_bytes_per_token": d * dtype.itemsize,
            "hidden_size": d, "dtype": str(dtype).removeprefix("torch."),
            **_memory(), "disk_read_bytes_per_s": _disk_read_speed()}


def _memory() -> dict:
    import psutil

    accel = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0
    try:
        from distributed import get_worker

        ram = get_worker().memory_manager.memory_limit or psutil.virtual_memory().available
    except ValueError:  # not inside a worker
        ram = psutil.virtual_memory().available
    disk = shutil.disk_usage(tempfile.gettempdir()).free // 2  # leave half the free disk alone
    return {"accel_bytes": int(accel), "ram_bytes": int(min(ram, psutil.virtual_memory().available)), "disk_bytes": int(disk)}


def _disk_read_speed(nbytes: int = 64 << 20) -> float:
    """Read a fresh file after asking the kernel to drop it from the page cache."""
    with tempfile.NamedTemporaryFile(dir=tempfile.gettempdir()) as f:
        f.write(os.urandom(1 << 20) * (nbytes >> 20))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        with open(f.name, "rb", buffering=0) as r:
            while r.read(8 << 20):
                pass
        return nbytes / (time.perf_counter() - t0)


class ProbeActor:
    """One per worker while profiling: receives and sends frames, and probes its peers."""

    def sink(self, frame: bytes) -> int:
        n = transport.frame.read_header(frame).raw_nbytes  # validated like a hidden state
        hold_sync()  # emulated link latency of the (tiny) reply (benchmarks only)
        return n

    def source(self, nbytes: int) -> bytes:
        frame = transport.encode(torch.zeros(nbytes, dtype=torch.uint8))
        hold_sync(len(frame))
        return frame

    def probe(self, peer, repeats: int = 7) -> tuple[float, float]:
        def send(frame):
            hold_sync(len(frame))  # this worker's emulated link, as a stage sending on would see it
            return peer.sink(frame).result(timeout=60)

        return measure_link(send, repeats)


def _client_send(call, upload: bool = True):
    """A client-side probe, held in the send path like the client's hidden states (benchmarks only).

    ``upload=False``: the client sends only a small request and the frame comes back.
    """
    def send(frame):
        hold_sync(len(frame) if upload else 0)
        return call(frame)

    return send


def measure_link(send: Callable[[bytes], object], repeats: int = 7) -> tuple[float, float]:
    """(rtt_s, bandwidth_bytes_per_s) of ``send``: small frames for RTT, growing frames for bandwidth."""
    small = transport.encode(torch.zeros(PROBE_SMALL, dtype=torch.uint8))
    rtt = timed_s(lambda: send(small), repeats, min_batch_s=0)
    n = 256 << 10
    while True:
        frame = transport.encode(torch.zeros(n, dtype=torch.uint8))
        # the fastest transfer: load on a shared machine only ever adds time, so the median of a few
        # measures the load as much as the link
        t = timed_s(lambda: send(frame), max(1, repeats // 2), min_batch_s=0, best=True)
        if t >= PROBE_TARGET_S or n >= PROBE_MAX_BYTES:
            return rtt, n / max(t - rtt, 1e-9)
        n *= 4


def measure_step_overhead(client, address: str, path: str, rtt_s: float, hidden_size: int, dtype: str,
                          num_threads: int = 1, repeats: int = 15) -> float:
    """Seconds a real stage step costs beyond its compute and its link's RTT.

    A one-layer :class:`StageActor` is placed on the worker and driven with decode-sized steps
    from the client; what the call takes beyond the stage's own compute and the probed round
    trip is the runtime's fixed cost per stage (dispatch, frames, thread hand-offs).
    """
    from .stage import StageActor

    actor = client.submit(StageActor, path, 0, 1, num_threads=num_threads, actor=True, pure=False,
                          workers=[address], allow_other_workers=False).result()
    d, dtype = hidden_size, getattr(torch, dtype)
    actor.open_session("step-probe", 1, CONTEXT + repeats + 2).result()
    frame = lambda t: transport.encode(torch.zeros(1, t, d, dtype=dtype))  # noqa: E731
    pos = lambda a, t: transport.encode(torch.arange(a, a + t)[None])  # noqa: E731
    ones = lambda t: transport.encode(torch.ones(1, t, dtype=torch.long))  # noqa: E731
    actor.forward("step-probe", frame(CONTEXT), pos(0, CONTEXT), ones(CONTEXT)).result()
    extra = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        hold_sync()  # the client's emulated link, as in a real step (benchmarks only)
        _, ((compute_s, _),) = actor.forward("step-probe", frame(1), pos(CONTEXT + i, 1), ones(1)).result()
        if i:  # the first step warms up
            extra.append(time.perf_counter() - t0 - compute_s - rtt_s)
    return max(0.0, statistics.median(extra))


def measure_links(client, addrs: list[str], names: dict[str, str], client_name: str = "client",
                  on_link: Callable[[], object] = lambda: None,
                  pairs: list[tuple[str, str]] | None = None) -> tuple[LinkProfile, ...]:
    """Bandwidth and RTT of ordered links by real frames through actor calls, the hidden states' path.

    ``pairs`` (addresses, ``client_name`` for the client) limits it to those links; default:
    every ordered pair of workers and client.
    """
    if pairs is None:
        nodes = [client_name, *addrs]
        pairs = [(a, b) for a in nodes for b in nodes if a != b]
    used = sorted({x for p in pairs for x in p if x != client_name})
    probes = dict(zip(used, client.gather([client.submit(ProbeActor, actor=True, workers=[a], pure=False)
                                           for a in used])))
    names = {**names, client_name: client_name}
    links = []
    for src, dst in pairs:
        if src == client_name:
            rtt, bw = measure_link(_client_send(lambda f, d=dst: probes[d].sink(f).result(timeout=60)))
        elif dst == client_name:
            rtt, bw = measure_link(_client_send(lambda f, s=src: probes[s].source(len(f)).result(timeout=60),
                                                upload=False))
        else:
            rtt, bw = probes[src].probe(probes[dst]).result(timeout=300)
        links.append(LinkProfile(names[src], names[dst], bw, rtt))
        on_link()
    return tuple(links)


def measure_chain_overhead(client, addrs: list[str], path: str, one_way_s: float, hidden_size: int, dtype: str,
                           num_threads: int = 1, repeats: int = 15) -> float | None:
    """Seconds per stage a real chain step costs beyond its stages' compute and its links' one-way
    latencies (``one_way_s``: the sum of RTT/2 over client → addrs… → client), measured on a chain
    of one-layer stages over ``addrs`` in order, driven like a decode step.

    The star-measured ``step_overhead_s`` counts the client's dispatch once per stage; in a chain
    the client dispatches once and stages call each other from their event loops, so the fixed
    cost per stage differs and is measured here. ``None`` for fewer than two stages.
    """
    from .chain import RemoteChain
    from .placement import place

    if len(addrs) < 2:
        return None
    chain = RemoteChain.create(client, place(addrs, len(addrs), [(i, i + 1) for i in range(len(addrs))]), path,
                               num_threads=num_threads, relay="chain")
    try:
        hidden = lambda t: torch.zeros(1, t, hidden_size, dtype=getattr(torch, dtype))  # noqa: E731
        probe = chain.open_session("chain-probe", 1, CONTEXT + repeats + 2)
        chain.forward(probe, hidden(CONTEXT), torch.arange(CONTEXT)[None], torch.ones(1, CONTEXT, dtype=torch.long))
        extra = []
        for i in range(repeats + 1):
            _, trace = chain.forward(probe, hidden(1), torch.tensor([[CONTEXT + i]]),
                                     torch.ones(1, 1, dtype=torch.long))
            if i:  # the first step warms up
                extra.append(trace.wall_s - sum(trace.stage_compute_s) - one_way_s)
        return max(0.0, statistics.median(extra) / len(addrs))
    finally:
        chain.release()


def profile_cluster(cluster, path: str, workers: list[str] | None = None, client_name: str = "client",
                    num_threads: int = 1, progress: bool = True, formats=()) -> ClusterProfile:
    """Measure every worker and every ordered link (client included) with the model at ``path``;
    with ``formats`` (e.g. ``("int8", "nf4")``), also what each quantized format costs on every
    worker (``quantize.measure_formats``), so the planner may choose a format per stage."""
    # Long: one straight sequence of measurements feeding one profile; the steps depend on each
    # other's results (the step overheads need the links' RTTs, the chain overhead both).
    from tqdm.auto import tqdm

    from ..model.checkpoint import resolve_checkpoint
    from ..model.family import load_config

    n_layers = load_config(resolve_checkpoint(path), True).num_hidden_layers
    client = cluster.client
    info = cluster.workers()
    addrs = workers or list(info)
    names = {a: str(info[a].get("name", a)) for a in addrs}
    from ..model.quantize import canonical, measure_formats

    formats = tuple(dict.fromkeys(canonical(f) for f in formats or () if canonical(f)))
    steps = len(addrs) * (2 if formats else 1) + len(addrs) * (len(addrs) + 1)
    bar = tqdm(total=steps, desc="profiling", disable=not progress)
    futures = {a: client.submit(measure_worker, path, num_threads, workers=[a], pure=False, allow_other_workers=False)
               for a in addrs}
    format_futures = {a: client.submit(measure_formats, path, formats, num_threads, workers=[a], pure=False,
                                       allow_other_workers=False) for a in addrs} if formats else {}
    measured, format_costs = {}, {}
    for a, fut in futures.items():
        measured[a] = fut.result()
        bar.update()
    for a, fut in format_futures.items():
        format_costs[a] = fut.result()
        bar.update()
    links = measure_links(client, addrs, names, client_name, bar.update)
    rtt_in = {ln.dst: ln.rtt_s for ln in links if ln.src == client_name}
    overhead = {a: measure_step_overhead(client, a, path, rtt_in[names[a]], measured[a]["hidden_size"],
                                         measured[a]["dtype"], num_threads) for a in addrs}
    rtt = {(ln.src, ln.dst): ln.rtt_s for ln in links}
    stages = addrs[:n_layers]
    hops = list(zip([client_name, *(names[a] for a in stages)], [*(names[a] for a in stages), client_name]))
    chain_overhead = measure_chain_overhead(client, stages, path, sum(rtt[h] / 2 for h in hops),
                                            measured[addrs[0]]["hidden_size"], measured[addrs[0]]["dtype"], num_threads)
    bar.close()
    first = measured[addrs[0]]
    model = ModelProfile(name=str(path), n_layers=n_layers,
                         layer_weight_bytes=first["layer_weight_bytes"],
                         kv_bytes_per_token_per_layer=first["kv_bytes_per_token_per_layer"],
                         hidden_bytes_per_token=first["hidden_bytes_per_token"])
    worker_profiles = tuple(
        WorkerProfile(name=names[a], address=a, decode_layer_s=m["decode_layer_s"], prefill_layer_s=m["prefill_layer_s"],
                      accel_bytes=m["accel_bytes"], ram_bytes=m["ram_bytes"], disk_bytes=m["disk_bytes"],
                      disk_read_bytes_per_s=m["disk_read_bytes_per_s"], step_overhead_s=overhead[a],
                      chain_step_overhead_s=chain_overhead)
        for a, m in measured.items())
    profile = ClusterProfile(model=model, workers=worker_profiles, links=tuple(links), client=client_name)
    if format_costs:
        profile = profile.with_formats(format_costs[addrs[0]]["layer_weight_bytes"],
                                       {names[a]: c["format_decode_factor"] for a, c in format_costs.items()})
    return profile

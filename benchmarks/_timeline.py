"""Where the time between a decode step's call and its return goes, stamp by stamp (issue 18).

``install_client()`` in the client process and ``install_stage()`` on every worker (through
``client.run``) wrap the functions a step passes through with a stamp on entry and exit
(``time.perf_counter``: CLOCK_MONOTONIC, one clock for every process of the machine). A step's
stamps, sorted by time, cut it into segments: the caller's thread handing the step to the client's
event loop, Dask's message to the first stage, the stage's layers, the message to the next stage,
the delivery back, and the hand-off back to the caller. ``segments()`` gives each segment's median
over the steps. Benchmarks only: nothing here is imported by the package. Each stamp costs ~1 µs.
"""

from __future__ import annotations

import functools
import inspect
import statistics
import time

STAMPS: list[tuple[str, float]] = []


def stamp(tag: str) -> None:
    STAMPS.append((tag, time.perf_counter()))


def _wrap(owner, name: str, enter: str, leave: str | None = None, record=stamp) -> None:
    fn = inspect.getattr_static(owner, name)
    kind = type(fn) if isinstance(fn, (classmethod, staticmethod)) else None
    fn = fn.__func__ if kind else fn
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            record(enter)
            try:
                return await fn(*args, **kwargs)
            finally:
                if leave:
                    record(leave)
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            record(enter)
            try:
                return fn(*args, **kwargs)
            finally:
                if leave:
                    record(leave)
    setattr(owner, name, kind(wrapped) if kind else wrapped)


def install_client() -> None:
    from bloombee_nb.cluster import chain, relay
    from bloombee_nb.cluster.protocol import Delivery

    _wrap(chain, "on_loop", "client: caller hands the step over", "client: caller has the output")
    _wrap(relay.Relay, "send", "client loop: step starts", "client loop: step done")
    _wrap(Delivery, "from_msg", "client loop: delivery read")


def install_stage(dask_worker) -> str:
    """Wrap the stage's side, stamping into a list kept on the worker (``client.run(install_stage)``;
    read back with ``client.run(stage_stamps)``)."""
    from bloombee_nb.cluster.stage import StageActor
    from bloombee_nb.cluster.wire import StageWire

    kept = dask_worker.__dict__.setdefault("bloombee_timeline", [])

    def record(tag):
        kept.append((tag, time.perf_counter()))

    at = dask_worker.address
    _wrap(StageWire, "dispatch", f"{at}|step read", record=record)
    _wrap(StageActor, "_compute", f"{at}|layers start", f"{at}|layers done", record=record)
    _wrap(StageWire, "send", f"{at}|send to next stage", f"{at}|sent", record=record)
    _wrap(StageWire, "deliver", f"{at}|deliver to client", f"{at}|delivered", record=record)
    return at


def stage_stamps(dask_worker, clear: bool = False) -> list[tuple[str, float]]:
    kept = dask_worker.__dict__.setdefault("bloombee_timeline", [])
    out = list(kept)
    if clear:
        kept.clear()
    return out


def collected() -> list[tuple[str, float]]:
    return list(STAMPS)


def clear() -> None:
    STAMPS.clear()


def segments(stamps: list[tuple[str, float]], workers: list[str], last: int = 200) -> list[tuple[str, float, int]]:
    """(segment, median ms, steps seen) over the last ``last`` steps, in the order of a typical step;
    a stage's stamps are named by its place in ``workers`` (stage 0, 1, …)."""
    names = {w: f"stage {i}" for i, w in enumerate(workers)}

    def named(tag: str) -> str:  # "<worker address>|what" -> "stage i: what"; the client's tags as they are
        at, _, what = tag.partition("|")
        return f"{names[at]}: {what}" if at in names else tag

    events = sorted((t, named(tag)) for tag, t in stamps)
    steps, current = [], None
    for t, tag in events:
        if tag == "client: caller hands the step over":
            current = [(t, tag)]
            steps.append(current)
        elif current is not None:
            current.append((t, tag))
    by: dict[str, list[float]] = {}
    order: dict[str, float] = {}
    for step in steps[-last:]:
        for k, ((t1, a), (t2, b)) in enumerate(zip(step, step[1:])):
            key = f"{a} → {b}"
            by.setdefault(key, []).append(t2 - t1)
            order[key] = order.get(key, 0.0) + k
    return sorted(((k, 1e3 * statistics.median(v), len(v)) for k, v in by.items()),
                  key=lambda kv: order[kv[0]] / len(by[kv[0]]))

"""The same decoder layers in a plain process and inside a Dask worker, with and without the
settings stage workers get (``bloombee_nb.cluster.connect.STAGE_WORKER_CONFIG``).

    python benchmarks/bench_worker_config.py        # ~2 minutes on 2 cores

The 58M Llama's 8 layers in a :class:`SpanRunner`, 1 torch thread, a 32-token prompt then 64
decode steps, 3 times; median ms per decode step. Measured in this process, then in a one-worker
``LocalCluster`` (``client.run``: on the worker's event loop, as a stage's inline decode runs) for
each of: Dask's defaults, the profiler off, glibc's trim threshold raised, and both (what
``bb.connect()`` now starts). Writes benchmarks/results/worker_config.json and .md.
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import RESULTS, SYNTHETIC_58M, random_checkpoint, scratch, stamp, write_json  # noqa: E402

PROFILER = "distributed.worker.profile.enabled"
TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


def decode_ms(path: str) -> float:
    import torch

    from bloombee_nb.model.span import SpanRunner

    torch.set_num_threads(1)
    runner = SpanRunner(path, 0, 8)
    hidden = runner.hidden_size
    times = []
    for _ in range(3):
        runner.open("s", 1, 128)
        runner.forward("s", torch.randn(1, 32, hidden), torch.arange(32)[None], torch.ones(1, 32, dtype=torch.long))
        for i in range(64):
            t0 = time.perf_counter()
            runner.forward("s", torch.randn(1, 1, hidden), torch.tensor([[32 + i]]), torch.ones(1, 1, dtype=torch.long))
            times.append(time.perf_counter() - t0)
        runner.close("s")
    runner.release()
    return 1e3 * statistics.median(times)


def in_worker(path: str, settings: dict) -> float:
    import bloombee_nb as bb

    connect_module = importlib.import_module("bloombee_nb.cluster.connect")  # the module, not bb.connect

    saved = connect_module.STAGE_WORKER_CONFIG
    connect_module.STAGE_WORKER_CONFIG = settings  # what bb.connect() gives its nannies, for this run only
    try:
        with bb.connect(n_workers=1) as cluster:
            (ms,) = cluster.client.run(decode_ms, path).values()
    finally:
        connect_module.STAGE_WORKER_CONFIG = saved
    return ms


def main() -> None:
    path = random_checkpoint(scratch("synthetic_58m"), **SYNTHETIC_58M)
    variants = {
        "Dask's defaults": {PROFILER: True, TRIM: 65536},
        "profiler off": {PROFILER: False, TRIM: 65536},
        "trim threshold 16 MiB": {PROFILER: True, TRIM: 16 << 20},
        "both (stage workers now)": {PROFILER: False, TRIM: 16 << 20},
    }
    rows = {"plain process": decode_ms(path)}
    for name, settings in variants.items():
        rows[f"worker, {name}"] = in_worker(path, settings)
    rows["plain process, again"] = decode_ms(path)
    out = stamp(dict(model="synthetic_58m, 8 layers", decode_ms_median=rows,
                     settings={k: {"profiler": v[PROFILER], "MALLOC_TRIM_THRESHOLD_": v[TRIM]} for k, v in variants.items()}))
    write_json("worker_config", out)
    lines = ["# 8 decoder layers (58M Llama), one decode step: a plain process vs a Dask worker", "",
             f"`{out['command']}` · load average {out['machine']['load_average'][0]} at start", "",
             "| where | ms per decode step (median of 192) |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in rows.items()]
    (RESULTS / "worker_config.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Plausible made-up clusters, for benchmarks, demos and "what if" planning without machines.

    cluster = random_cluster(32, LLAMA_70B, seed=0)   # a few GPUs, many CPUs, uneven links

Numbers are rough orders of magnitude for bf16 serving of a 70B-class layer (~1.7 GiB):
a data-centre GPU streams it in ~1 ms, a consumer GPU in ~3 ms, a CPU box in ~80–250 ms;
links are drawn log-uniformly between 10 Mbit/s and 1 Gbit/s with RTTs of 1–100 ms.
"""

from __future__ import annotations

import numpy as np

from .profile import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile

GIB = 2 ** 30

LLAMA_70B = ModelProfile.for_decoder("llama-70b-like", n_layers=80, hidden_size=8192, intermediate_size=28672,
                                     n_heads=64, n_kv_heads=8, dtype_bytes=2)

# kind → (base decode s/layer at batch 1, accel GiB, RAM GiB range, disk GiB)
_KINDS = {
    "gpu-80g": (1.0e-3, 80, (128, 512), 1000),
    "gpu-24g": (3.0e-3, 24, (32, 128), 500),
    "cpu": (0.12, 0, (32, 256), 500),
}


def _decode_curve(base_s: float, kind: str) -> dict[int, float]:
    """Batch → s/layer: memory-bound at small batch, compute grows past a knee (later on GPUs)."""
    knee = 32 if kind.startswith("gpu") else 4
    return {b: base_s * max(1.0, b / knee) ** 0.9 for b in (1, 4, 16, 64)}


def random_worker(name: str, kind: str, rng: np.random.Generator) -> WorkerProfile:
    base, accel, (ram_lo, ram_hi), disk = _KINDS[kind]
    base *= rng.uniform(0.7, 1.5)
    return WorkerProfile(
        name=name, address=f"tcp://10.0.0.{name.split('-')[-1]}:8788", decode_layer_s=_decode_curve(base, kind),
        prefill_layer_s={t: base * max(1.0, t / (32 if accel else 4)) ** 0.95 for t in (16, 128, 512)},
        accel_bytes=int(accel * GIB), ram_bytes=int(rng.integers(ram_lo, ram_hi + 1) * GIB),
        disk_bytes=int(disk * GIB), ram_read_bytes_per_s=float(rng.uniform(8e9, 16e9)),
        disk_read_bytes_per_s=float(rng.uniform(0.5e9, 3e9)))


def random_cluster(n_workers: int, model: ModelProfile = LLAMA_70B, seed: int = 0,
                   gpu_fraction: float = 0.2, client: str = "client") -> ClusterProfile:
    """``n_workers`` workers (about ``gpu_fraction`` of them GPUs, at least one) and a symmetric link
    for every pair, the client included."""
    rng = np.random.default_rng(seed)
    n_gpu = max(1, round(gpu_fraction * n_workers))
    kinds = ["gpu-80g" if i % 3 == 0 else "gpu-24g" for i in range(n_gpu)] + ["cpu"] * (n_workers - n_gpu)
    workers = tuple(random_worker(f"w-{i}", kind, rng) for i, kind in enumerate(rng.permutation(kinds)))
    names = [client] + [w.name for w in workers]
    links = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            bw = 10 ** rng.uniform(np.log10(10e6 / 8), np.log10(1e9 / 8))   # 10 Mbit/s … 1 Gbit/s
            links += LinkProfile.both_ways(a, b, float(bw), float(10 ** rng.uniform(-3, -1)))
    return ClusterProfile(model=model, workers=workers, links=tuple(links), client=client)

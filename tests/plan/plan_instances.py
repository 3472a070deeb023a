"""Small random planning instances, and a brute-force planner to check the DP against.

The brute force shares only the cost model (``cost.stage_cost``, ``cost.transfer_s``) with the
planner: it enumerates every ordered subset of workers, every split of the layers, every
micro-batch and every offload choice of every stage, and prices each combination directly.
"""

from __future__ import annotations

import itertools
import math
from functools import reduce

import numpy as np

from bloombee_nb.plan import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile, Workload, cost

MIB = 2 ** 20


def random_instance(seed: int, n_workers: int, n_layers: int, batch: int = 1, objective: str = "latency",
                    memory_scale: float = 1.0, p_missing_link: float = 0.1) -> tuple[ClusterProfile, Workload]:
    """Workers with 0–3 layers' worth of each tier, speeds over two decades, links 1 MB/s–1 GB/s."""
    rng = np.random.default_rng(seed)
    workload = Workload(batch=batch, prompt_len=int(rng.integers(1, 16)), new_tokens=int(rng.integers(1, 16)),
                        objective=objective)
    model = ModelProfile("tiny", n_layers, layer_weight_bytes=100 * MIB,
                         kv_bytes_per_token_per_layer=int(rng.choice([0, 64 * 1024, 1024 * 1024])),
                         hidden_bytes_per_token=int(rng.choice([1024, 8192, 65536])))
    per_layer = cost.min_bytes_for(model, workload, 1)
    budget = lambda hi: int(rng.uniform(0, hi) * per_layer * memory_scale)
    workers = []
    for i in range(n_workers):
        base = 10 ** rng.uniform(-3, -1)
        has_gpu = rng.random() < 0.5
        workers.append(WorkerProfile(
            name=f"w{i}", address=f"tcp://127.0.0.1:{9000 + i}",
            decode_layer_s={1: base, 4: base * rng.uniform(1, 4), 16: base * rng.uniform(4, 16)},
            prefill_layer_s={8: base * rng.uniform(1, 8)},
            accel_bytes=budget(3) if has_gpu else 0, ram_bytes=budget(3), disk_bytes=budget(3),
            ram_read_bytes_per_s=10 ** rng.uniform(9, 11), disk_read_bytes_per_s=10 ** rng.uniform(8, 10),
            compute_speed_factor=float(rng.choice([1.0, 2.0]))))
    names = ["client"] + [w.name for w in workers]
    links = [LinkProfile(a, b, 10 ** rng.uniform(6, 9), rng.uniform(0, 0.05))
             for a, b in itertools.permutations(names, 2) if rng.random() >= p_missing_link]
    return ClusterProfile(model=model, workers=tuple(workers), links=tuple(links)), workload


def brute_force(cluster: ClusterProfile, workload: Workload, micro_batches, offloads) -> float:
    """The least objective (latency_s, or period_s for throughput) over every plan; ∞ if none."""
    model, L, B = cluster.model, cluster.model.n_layers, workload.batch
    combos = [(w, k) for w in offloads for k in offloads]
    best = math.inf
    for m in sorted({x for x in micro_batches if x <= B} | {B}):
        n_micro = math.ceil(B / m)
        stage_vec = {}  # (worker, n) → stage time for every offload combo (∞ where it does not fit)
        for k in range(1, min(len(cluster.included), L) + 1):
            for order in itertools.permutations(cluster.included, k):
                hops = _hops(cluster, order, m * model.hidden_bytes_per_token)
                if hops is None:
                    continue
                link_sum, link_busy = hops
                for cuts in itertools.combinations(range(1, L), k - 1):
                    bounds = (0, *cuts, L)
                    vecs = []
                    for w, a, b in zip(order, bounds[:-1], bounds[1:]):
                        key = (w.name, b - a)
                        if key not in stage_vec:
                            stage_vec[key] = np.array([float(cost.stage_cost(w, model, workload, b - a, m, wo, ko)
                                                             .total_s) for wo, ko in combos])
                        vecs.append(stage_vec[key])
                    R = link_sum + reduce(np.add.outer, vecs)                # every offload combination
                    bott = np.maximum(link_busy, reduce(np.maximum.outer, vecs))
                    value = R if workload.objective == "latency" else np.maximum(R, n_micro * bott)
                    best = min(best, float(value.min()))
    return best


def _hops(cluster: ClusterProfile, order, nbytes: float):
    """(Σ one-way link times, max link busy time) along client → order → client, None if a link is missing."""
    names = [cluster.client] + [w.name for w in order] + [cluster.client]
    total, busy = 0.0, 0.0
    for a, b in zip(names[:-1], names[1:]):
        link = cluster.link(a, b)
        if link is None:
            return None
        total += cost.transfer_s(nbytes, link.bandwidth_bytes_per_s, link.rtt_s)
        busy = max(busy, cost.link_busy_s(nbytes, link.bandwidth_bytes_per_s))
    return total, busy

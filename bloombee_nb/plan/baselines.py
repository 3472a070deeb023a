"""Two baselines the DP must beat, priced by the same cost model (``evaluate_chain``).

- :func:`even_split`: every included worker, in cluster order, takes an equal share of the
  layers (sizes differ by at most one); each stage takes its fastest offload choice that fits.
- :func:`petals_greedy`: Petals-style block selection. Each worker in turn hosts as many layers
  as fit in its fast memory (no offloading, like a Petals server), at the contiguous window whose
  currently served throughput is lowest — windows compared by their sorted per-layer throughputs,
  lexicographically, the first best window winning. A worker's throughput is 1 / (one layer's
  decode time at batch 1). The client then routes through the hosted spans by least latency
  (any sub-span of a hosted span may be used, like Petals' client routing).

Both pick the micro-batch size that is best for the workload's objective.
"""

from __future__ import annotations

import math

import numpy as np

from . import cost
from .dp import DEFAULT_MICRO_BATCHES, DEFAULT_OFFLOADS, chain_dp, micro_batch_choices, trace_chain
from .errors import InfeasiblePlanError
from .evaluate import ChainStage, Plan, evaluate_chain
from .profile import ClusterProfile, WorkerProfile, Workload


def _best(plans: list[Plan]) -> Plan:
    return min(plans, key=lambda p: p.objective_s)


# ---- even split --------------------------------------------------------------------------------

def _fastest_offload(w: WorkerProfile, cluster: ClusterProfile, workload: Workload, n: int, m: int,
                     offloads) -> tuple[float, float] | None:
    fr = np.asarray(sorted(set(offloads)), dtype=float)
    total = cost.stage_cost(w, cluster.model, workload, n, m, fr[:, None], fr[None, :]).total_s
    if not np.isfinite(total).any():
        return None
    i, j = np.unravel_index(int(np.argmin(total)), total.shape)
    return float(fr[i]), float(fr[j])


def even_split(cluster: ClusterProfile, workload: Workload, *, micro_batches=DEFAULT_MICRO_BATCHES,
               offloads=DEFAULT_OFFLOADS) -> Plan:
    """Equal spans over all included workers (the first ``n_layers`` of them if there are more)."""
    L = cluster.model.n_layers
    workers = cluster.included[:L]
    if not workers:
        raise InfeasiblePlanError("no included workers; include some (ClusterProfile.with_worker(name, include=True))")
    q, r = divmod(L, len(workers))
    bounds = np.cumsum([0] + [q + (i < r) for i in range(len(workers))])
    plans = []
    for m in micro_batch_choices(workload.batch, micro_batches):
        chain = []
        for w, a, b in zip(workers, bounds[:-1], bounds[1:]):
            choice = _fastest_offload(w, cluster, workload, int(b - a), m, offloads)
            if choice is None:
                raise InfeasiblePlanError(f"even split: worker {w.name!r} cannot hold its {b - a} layers with any "
                                          f"offload choice; use solve(), which sizes spans to fit")
            chain.append(ChainStage(w.name, int(a), int(b), *choice))
        plans.append(evaluate_chain(cluster, workload, chain, m, method="even split", offloads=tuple(offloads)))
    return _best(plans)


# ---- Petals-style greedy -----------------------------------------------------------------------

def _layers_in_fast_memory(w: WorkerProfile, cluster: ClusterProfile, workload: Workload) -> int:
    per_layer = cost.min_bytes_for(cluster.model, workload, 1)
    return min(cluster.model.n_layers, int(w.fast_bytes // per_layer))


def choose_window(served: np.ndarray, n: int) -> int:
    """Start of the n-layer window whose sorted served throughputs are lexicographically least."""
    return min(range(len(served) - n + 1), key=lambda s: tuple(np.sort(served[s:s + n])))


def petals_spans(cluster: ClusterProfile, workload: Workload) -> dict[str, tuple[int, int]]:
    """Worker name → hosted (start, end), workers choosing one after another in cluster order."""
    served = np.zeros(cluster.model.n_layers)
    hosted = {}
    for w in cluster.included:
        n = _layers_in_fast_memory(w, cluster, workload)
        if n == 0:
            continue
        s = choose_window(served, n)
        served[s:s + n] += 1.0 / w.decode_s(1)   # this worker's throughput (tokens/s per layer)
        hosted[w.name] = (s, s + n)
    if not hosted or served.min() == 0:
        missing = int((served == 0).sum())
        raise InfeasiblePlanError(f"Petals-style greedy leaves {missing} layers unhosted: its servers keep every "
                                  f"layer in fast memory; use solve(), which can offload")
    return hosted


def petals_greedy(cluster: ClusterProfile, workload: Workload, *, micro_batches=DEFAULT_MICRO_BATCHES) -> Plan:
    """Greedy block selection, then the least-latency route through the hosted spans."""
    hosted = petals_spans(cluster, workload)
    names = list(hosted)
    L = cluster.model.n_layers
    allowed = np.zeros((len(names), L + 1, L + 1), dtype=bool)   # [w, a, b]: [a, b) ⊆ hosted span
    for i, name in enumerate(names):
        s, e = hosted[name]
        allowed[i, s:e + 1, s:e + 1] = np.triu(np.ones((e - s + 1, e - s + 1), dtype=bool), 1)
    plans = []
    for m in micro_batch_choices(workload.batch, micro_batches):
        chain = _route(cluster, workload, names, allowed, m)
        plans.append(evaluate_chain(cluster, workload, chain, m, method="Petals-style greedy",
                                    unused_reason="hosts no layer on the least-latency route"))
    return _best(plans)


def _route(cluster: ClusterProfile, workload: Workload, names: list[str], allowed: np.ndarray,
           m: int) -> list[ChainStage]:
    L = cluster.model.n_layers
    n = np.arange(L + 1)
    stage = np.array([np.where(n > 0, cost.decode_compute_s(cluster.worker(x), n, m), math.inf) for x in names])
    nodes = names + [cluster.client]
    link = np.full((len(nodes), len(nodes)), math.inf)
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            ln = cluster.link(a, b)
            if ln is not None:
                link[i, j] = cost.transfer_s(cost.hop_bytes(cluster.model, m), ln.bandwidth_bytes_per_s, ln.rtt_s)
    args = (stage, link[-1, :-1], link[:-1, :-1], link[:-1, -1])
    f, g = chain_dp(*(x[None] for x in args), allowed=allowed)
    if not np.isfinite(g[0]):
        raise InfeasiblePlanError("Petals-style greedy: no route of measured links passes through the hosted spans")
    return _stay_on_revisited([ChainStage(names[w], a, b) for w, a, b in trace_chain(f[0], *args, allowed=allowed)])


def _stay_on_revisited(route: list[ChainStage]) -> list[ChainStage]:
    """A route that leaves a server and comes back (w → x → w) stays on w instead: w hosts the
    whole stretch anyway (its hosted span is contiguous), and a worker serves one stage."""
    for i, s in enumerate(route):
        j = max(k for k, r in enumerate(route) if r.worker == s.worker)
        if j > i:
            merged = ChainStage(s.worker, s.start, route[j].end)
            return _stay_on_revisited(route[:i] + [merged] + route[j + 1:])
    return route

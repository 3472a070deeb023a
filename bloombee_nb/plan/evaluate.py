"""The ``Plan`` value, and the one function that prices an explicit chain with the cost model.

Every planner (the dynamic program, the even split, the Petals-style greedy) ends by calling
:func:`evaluate_chain`, so their plans carry predictions made by the same formulas and can be
compared number for number — and checked later against measured stage times.

Timing model of a decode step (one new token per sequence). A micro-batch of ``m`` sequences
travels client → stage 1 → … → stage k → client. With stage times ``t_i`` (compute + offload)
and link times ``ℓ_j`` (one way, ``bytes/bw + rtt/2``):

    latency_s    R = Σ_i t_i + Σ_j ℓ_j              one micro-batch's round trip
    bottleneck_s b = max(max_i t_i, max_j busy_j)   busy_j = bytes/bw: how long link j is occupied
    period_s     T = max(R, n · b),  n = ⌈B/m⌉      time between two tokens of one sequence
    tokens_per_s   = B / T

``T`` is the steady state of a pipeline where each micro-batch starts its next step as soon as
its previous token is back (a closed cyclic pipeline with n jobs): either one trip (R) or the
busiest resource serving all n micro-batches (n·b) limits it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import cost
from ._format import fmt_s, html_table
from .errors import InfeasiblePlanError
from .profile import ClusterProfile, WorkerProfile, Workload


@dataclass(frozen=True)
class StagePlan:
    """One stage of a plan: who hosts which layers, where its bytes live, and its predicted times."""

    worker: str
    address: str
    start: int                                   # first layer (inclusive)
    end: int                                     # last layer (exclusive)
    weight_offload: float                        # fraction of weights outside the fast tier
    kv_offload: float                            # fraction of KV outside the fast tier
    weight_fractions: tuple[float, float, float]  # (accelerator, RAM, disk)
    kv_fractions: tuple[float, float, float]      # (accelerator, RAM, disk)
    compute_s: float                             # decode compute per micro-batch step
    offload_s: float                             # extra time of offloaded reads not hidden by compute
    transfer_in_s: float                         # link into this stage (from the client or previous stage)
    busy_in_s: float                             # how long that link is occupied (bytes / bandwidth)
    prefill_s: float                             # prefill of the whole batch through this stage
    quantize: str | None = None                  # the stage's weight format ("int8", "nf4"; None: float)

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    @property
    def stage_s(self) -> float:
        return self.compute_s + self.offload_s


@dataclass(frozen=True)
class Plan:
    """A chain of stages with its micro-batch and its predicted times (see the module docstring)."""

    objective: str
    workload: Workload
    micro_batch: int
    stages: tuple[StagePlan, ...]
    return_transfer_s: float       # last stage → client
    return_busy_s: float
    latency_s: float               # R: one micro-batch's round trip (Σ stage + Σ link)
    bottleneck_s: float            # b: busiest stage or link per micro-batch
    period_s: float                # T = max(R, n·b): between two tokens of one sequence
    tokens_per_s: float            # B / T
    prefill_s: float               # whole batch through the chain once (not optimised)
    reasons: tuple[tuple[str, str], ...]  # (worker name, why it is or is not used), every worker
    method: str                    # which planner, and how exactly it searched
    exact: bool                    # True: proven optimal for the cost model and the given choices
    lower_bound_s: float = 0.0     # a proven lower bound on the objective (equal to it when exact)
    cost_table_s: np.ndarray | None = field(default=None, compare=False, repr=False)  # [layer, worker]
    planning_s: float = field(default=0.0, compare=False)

    @property
    def n_micro(self) -> int:
        return math.ceil(self.workload.batch / self.micro_batch)

    @property
    def objective_s(self) -> float:
        """The minimised quantity: latency_s, or period_s for throughput (= B / tokens_per_s)."""
        return self.latency_s if self.objective == "latency" else self.period_s

    @property
    def spans(self) -> list[tuple[str, int, int]]:
        """``[(worker_address, start, end), …]`` in chain order."""
        return [(s.address, s.start, s.end) for s in self.stages]

    @property
    def workers(self) -> list[str]:
        """Worker addresses in chain order (``from_pretrained(workers=…, spans=…)``)."""
        return [s.address for s in self.stages]

    @property
    def layer_spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.stages]

    @property
    def reason_by_worker(self) -> dict[str, str]:
        return dict(self.reasons)

    def _repr_html_(self) -> str:
        head = (f"Plan ({self.objective}, {self.method}): micro-batch {self.micro_batch} × {self.n_micro}, "
                f"latency {fmt_s(self.latency_s)}, period {fmt_s(self.period_s)}, "
                f"{self.tokens_per_s:.3g} tokens/s, prefill {fmt_s(self.prefill_s)}")
        rows = [[i, s.worker, f"{s.start}–{s.end - 1}", s.n_layers, _fractions(s.weight_fractions),
                 _fractions(s.kv_fractions), fmt_s(s.transfer_in_s), fmt_s(s.compute_s), fmt_s(s.offload_s)]
                for i, s in enumerate(self.stages)]
        rows.append(["→", "client", "", "", "", "", fmt_s(self.return_transfer_s), "", ""])
        stages = html_table(head, ["stage", "worker", "layers", "#", "weights acc/RAM/disk", "KV acc/RAM/disk",
                                   "link in", "compute", "offload"], rows)
        return stages + html_table("workers", ["worker", "why"], [list(r) for r in self.reasons])


def _fractions(f: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.0%}" for x in f)


# ---- pricing one explicit chain ---------------------------------------------------------------

@dataclass(frozen=True)
class ChainStage:
    """Input to :func:`evaluate_chain`: a worker name, its span, and its offloaded fractions."""

    worker: str
    start: int
    end: int
    weight_offload: float = 0.0
    kv_offload: float = 0.0
    quantize: str | None = None  # weight format (None: the serving dtype)


def _tier_fractions(worker: WorkerProfile, fast: float, mid: float, disk: float) -> tuple[float, float, float]:
    """(fast, mid, disk) bytes → (accelerator, RAM, disk) fractions."""
    total = fast + mid + disk
    if total <= 0:
        return (0.0, 0.0, 0.0)
    fast, mid, disk = fast / total, mid / total, disk / total
    return (fast, mid, disk) if worker.has_accel else (0.0, fast + mid, disk)


def _link_times(cluster: ClusterProfile, src: str, dst: str, nbytes: float) -> tuple[float, float]:
    link = cluster.link(src, dst)
    if link is None:
        raise InfeasiblePlanError(f"there is no link {src} → {dst}; measure it or add it with "
                                  f"ClusterProfile.with_link({src!r}, {dst!r}, bandwidth_bytes_per_s=…, rtt_s=…)")
    return (float(cost.transfer_s(nbytes, link.bandwidth_bytes_per_s, link.rtt_s)),
            float(cost.link_busy_s(nbytes, link.bandwidth_bytes_per_s)))


def _stage_plan(cluster: ClusterProfile, workload: Workload, c: ChainStage, micro_batch: int,
                prev: str) -> StagePlan:
    w, model = cluster.worker(c.worker), cluster.model
    sc = cost.stage_cost(w, model, workload, c.end - c.start, micro_batch, c.weight_offload, c.kv_offload, c.quantize)
    if not bool(sc.fits):
        need = cost.min_bytes_for(model, workload, c.end - c.start, c.quantize)
        raise InfeasiblePlanError(
            f"worker {c.worker!r} cannot hold layers {c.start}–{c.end - 1} with {c.weight_offload:.0%} of weights "
            f"and {c.kv_offload:.0%} of KV offloaded (they need {need / 2**30:.2f} GiB in all); "
            f"give it fewer layers, offload more, or lower the batch/max_length")
    t = sc.tiers
    transfer, busy = _link_times(cluster, prev, c.worker, cost.hop_bytes(model, micro_batch))
    return StagePlan(
        c.worker, w.address, c.start, c.end, c.weight_offload, c.kv_offload,
        _tier_fractions(w, float(t.weights_fast), float(t.weights_mid), float(t.weights_disk)),
        _tier_fractions(w, float(t.kv_fast), float(t.kv_mid), float(t.kv_disk)),
        float(sc.compute_s), float(sc.offload_s), transfer, busy,
        cost.prefill_stage_s(w, model, workload, c.end - c.start, c.weight_offload, c.kv_offload, c.quantize),
        c.quantize)


def evaluate_chain(cluster: ClusterProfile, workload: Workload, chain: list[ChainStage], micro_batch: int, *,
                   method: str, exact: bool = False, lower_bound_s: float = 0.0,
                   unused_reason: str = "not needed: the chain is faster without it",
                   offloads: tuple[float, ...] = (0.0, 1.0), cost_table_s: np.ndarray | None = None) -> Plan:
    """Price ``chain`` for ``workload`` at ``micro_batch`` and wrap it in a :class:`Plan`.

    ``unused_reason`` is what an included worker that fits but is not in the chain is told;
    ``offloads`` are the choices the planner had (to tell who cannot fit even one layer).
    """
    model = cluster.model
    _check_cover(chain, model.n_layers)
    stages, prev = [], cluster.client
    for c in chain:
        stages.append(_stage_plan(cluster, workload, c, micro_batch, prev))
        prev = c.worker
    ret, ret_busy = _link_times(cluster, prev, cluster.client, cost.hop_bytes(model, micro_batch))
    # R = Σ (link in + compute + offload) + link back;  b = max over stages and links;  T = max(R, n·b)
    latency = sum(s.transfer_in_s + s.stage_s for s in stages) + ret
    bottleneck = max([ret_busy] + [max(s.stage_s, s.busy_in_s) for s in stages])
    period = max(latency, math.ceil(workload.batch / micro_batch) * bottleneck)
    prefill_link = sum(_link_times(cluster, a, b, cost.hop_bytes(model, workload.batch * workload.prompt_len))[0]
                       for a, b in zip([cluster.client] + [c.worker for c in chain],
                                       [c.worker for c in chain] + [cluster.client]))
    return Plan(objective=workload.objective, workload=workload, micro_batch=micro_batch, stages=tuple(stages),
                return_transfer_s=ret, return_busy_s=ret_busy, latency_s=latency, bottleneck_s=bottleneck,
                period_s=period, tokens_per_s=workload.batch / period,
                prefill_s=sum(s.prefill_s for s in stages) + prefill_link,
                reasons=worker_reasons(cluster, workload, stages, unused_reason, offloads), method=method,
                exact=exact, lower_bound_s=lower_bound_s, cost_table_s=cost_table_s)


def _check_cover(chain: list[ChainStage], n_layers: int) -> None:
    expect = 0
    for c in chain:
        if c.start != expect or c.end <= c.start:
            break
        expect = c.end
    if expect != n_layers or not chain:
        spans = [(c.start, c.end) for c in chain]
        raise InfeasiblePlanError(f"spans {spans} do not cover layers 0–{n_layers - 1} contiguously")


def fits_one_layer(cluster: ClusterProfile, workload: Workload, worker: WorkerProfile,
                   offloads: tuple[float, ...] = (0.0, 1.0)) -> bool:
    """Whether ``worker`` can hold a single layer (with its KV) for some offload choice."""
    fr = np.asarray(offloads, dtype=float)
    sc = cost.stage_cost(worker, cluster.model, workload, 1, 1, fr[:, None], fr[None, :])
    return bool(np.any(sc.fits))


def worker_reasons(cluster: ClusterProfile, workload: Workload, stages, unused_reason: str,
                   offloads: tuple[float, ...] = (0.0, 1.0)) -> tuple[tuple[str, str], ...]:
    """Why each worker is (or is not) in the chain, in the cluster's order."""
    used = {}
    for s in stages:
        used.setdefault(s.worker, []).append(f"{s.start}–{s.end - 1}")
    out = []
    for w in cluster.workers:
        if w.name in used:
            why = "hosts layers " + ", ".join(used[w.name])
        elif not w.include:
            why = "excluded by user"
        elif not fits_one_layer(cluster, workload, w, offloads):
            need = cost.min_bytes_for(cluster.model, workload, 1)
            why = f"does not fit any layer (one layer with its KV needs {need / 2**20:.0f} MiB)"
        elif not _has_links(cluster, w.name):
            why = "no link joins it to the client or the other workers"
        else:
            why = unused_reason
        out.append((w.name, why))
    return tuple(out)


def _has_links(cluster: ClusterProfile, name: str) -> bool:
    ins = any(ln.dst == name for ln in cluster.links)
    outs = any(ln.src == name for ln in cluster.links)
    return ins and outs

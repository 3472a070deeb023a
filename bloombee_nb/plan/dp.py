"""The planner: a dynamic program over chains of workers, spans, micro-batches and offloading.

Over 400 lines because ~60 of them are the derivation below (recurrence, objectives, search modes)
and the rest implement it step by step on the same ``Tables``: the cost tables, the relaxed and
set DPs, the search over the throughput cap τ, and the bounds that decide when a plan is EXACT.

    plan = solve(cluster, Workload(batch=8, prompt_len=512, new_tokens=128, objective="throughput"))
    plan.spans          # [(worker_address, start, end), …]

What is chosen, jointly: the ordered chain of workers (any subset of the included ones), the
contiguous span of layers each hosts, the micro-batch size ``m`` (from ``micro_batches``), and for
each stage the fraction of weights and of KV moved out of the fast tier (from ``offloads``, both
independently; ``cost.tier_bytes`` then fills RAM before disk) and the weight format from the
user's allowed ``formats`` (None = float; quantized ones priced by the profile). Costs and the timing model are
those of ``cost.py`` and ``evaluate.py``: stage time ``s_w(n, m)`` for n layers on worker w,
link time ``ℓ(u→v, m)`` one way and ``busy(u→v, m)`` the link's occupancy; client = ``c``.

Offloading is local: a worker hosts one stage, its memory constrains only that stage, and the
cheapest offload choice minimises both a sum and a max — so the tables keep, per
(m, w, n), the best choice:  s_w(n, m) = min over feasible (weight, KV) fractions (∞ if none fits).
All layers are alike, so a stage's cost depends on its length n = b − a, not on where it starts.

Recurrence (exact, over ordered subsets). f(A, w, b) = least Σ time of a chain that uses exactly
the worker set A, ends with worker w whose span ends at layer b, and covers layers [0, b):

    f({w}, w, b)     = ℓ(c→w) + s_w(b)
    f(A ∪ {v}, v, b) = min over w ∈ A, a < b of  f(A, w, a) + ℓ(w→v) + s_v(b − a)      (v ∉ A)
    R*(m)            = min over A, w of  f(A, w, L) + ℓ(w→c)

Objectives (n = ⌈B/m⌉ micro-batches):

- ``latency``:    minimise R = Σ stage + Σ link over the chain and m:  min_m R*(m).
- ``throughput``: minimise the period T = max(R, n·b), b = the busiest stage or link (then
  tokens/s = B/T). With a cap τ, let g(τ) = R* computed with every stage and link busier than τ
  removed. For the optimal plan p, g(b_p) ≤ R_p, and the plan found at any τ has a period of at
  most max(g(τ), n·τ); so  T* = min over τ of max(g(τ), n·τ),  τ ranging over the finitely many
  stage/link times. g is non-increasing and n·τ increasing, so the minimum sits where they cross:
  a binary search over the sorted candidates finds it with ~log₂(#candidates) DP runs per m.

Search modes, and when the result is EXACT (optimal for the cost model and the given choices):

1. Relaxation, always run: the same recurrence without the set A (state (w, b) only, so a worker
   may come back later in the chain). O(M·(L·W² + L²·W)) per run, numpy-vectorised over m and w.
   Its optimum is a lower bound; if its optimal chain uses every worker at most once, that chain
   is feasible, hence optimal: EXACT.
2. Otherwise, with W ≤ ``exact_max_workers`` included workers, the set-DP above: EXACT.
   ``"auto"`` allows the largest W with W·2^(W−1)·(L+1)² ≤ EXACT_BUDGET: 8 workers at 80 layers,
   12 at ≤ 15 layers. Workers that cannot hold any span under the cap and sets unreachable from
   the client are skipped; spans longer than any worker can hold are never tried.
3. Otherwise (more workers): NOT exact. The better of (a) the set-DP over a shortlist — the
   workers of the relaxed chain, then the cheapest per layer hosted, (s_w(n) + a typical hop)/n,
   up to a size set by SHORTLIST_BUDGET (7 at 80 layers) — and (b) the relaxation's recurrence
   restricted to chains that follow one order of all workers (the same ranking), which cannot
   repeat a worker, may use any number of them, and always finds a chain when every pair of
   workers is linked and their memory suffices. The plan's ``lower_bound_s`` is the best of
   the relaxation, a knapsack floor on Σ stage times over distinct workers, and (throughput) n ×
   a floor on the bottleneck, so its gap to optimal is known.

For throughput in modes 2–3 the micro-batch rows are tried best bound first and skipped once they
cannot beat the best period found.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache, partial

import numpy as np

from . import cost
from .errors import InfeasiblePlanError
from .evaluate import ChainStage, Plan, evaluate_chain
from .profile import ClusterProfile, Workload

DEFAULT_MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_OFFLOADS = (0.0, 0.25, 0.5, 0.75, 1.0)
# W · 2^(W−1) · (L+1)² per set-DP run: the "auto" limits for the exact search (8 workers at 80
# layers, 12 at ≤ 15 layers) and for the restricted search's shortlist (7 at 80 layers).
EXACT_BUDGET = 7e6
SHORTLIST_BUDGET = 3e6
INF = np.inf


# ---- tables: every stage and link cost the DP may use ----------------------------------------

@dataclass(frozen=True)
class Tables:
    """Costs indexed [micro-batch choice, worker, …]; node W (last) of the link tables is the client."""

    names: tuple[str, ...]          # included workers, in cluster order
    micro_batches: np.ndarray       # (M,)
    n_micro: np.ndarray             # (M,)  ⌈B/m⌉
    combos: np.ndarray              # (C, 3) (weight, KV) offload fractions, index into ``formats``
    stage_s: np.ndarray             # (M, W, L+1) best stage time by span length (n=0: ∞)
    combo: np.ndarray               # (M, W, L+1) index into combos of that best choice
    link_s: np.ndarray              # (M, W+1, W+1) one-way time; ∞: no link
    busy_s: np.ndarray              # (M, W+1, W+1) occupancy
    formats: tuple = (None,)        # weight formats the DP may choose per stage

    def candidates(self, mi: int) -> np.ndarray:
        """Every value a plan's bottleneck can take at micro-batch choice ``mi``, sorted."""
        vals = np.concatenate([self.stage_s[mi].ravel(), self.busy_s[mi].ravel()])
        return np.unique(vals[np.isfinite(vals)])

    def capped(self, tau: np.ndarray, mis: np.ndarray, ix: np.ndarray):
        """(stage, ℓ(c→w), ℓ(u→w), ℓ(w→c)) for micro-batch rows ``mis`` and workers ``ix``,
        with every stage or link busier than ``tau[i]`` removed (∞)."""
        cap = np.asarray(tau, dtype=float)[:, None, None]
        stage = self.stage_s[mis][:, ix]
        stage = np.where(stage <= cap, stage, INF)
        nodes = np.append(ix, len(self.names))
        link = self.link_s[mis][:, nodes][:, :, nodes]
        link = np.where(self.busy_s[mis][:, nodes][:, :, nodes] <= cap, link, INF)
        return stage, link[:, -1, :-1], link[:, :-1, :-1], link[:, :-1, -1]


def micro_batch_choices(batch: int, choices=DEFAULT_MICRO_BATCHES) -> tuple[int, ...]:
    """The choices that do not exceed the batch, plus the whole batch itself."""
    return tuple(sorted({m for m in choices if m <= batch} | {batch}))


def build_tables(cluster: ClusterProfile, workload: Workload, micro_batches=DEFAULT_MICRO_BATCHES,
                 offloads=DEFAULT_OFFLOADS, formats=(None,)) -> Tables:
    """Price every (micro-batch, worker, span length, offload choice, weight format) and every link."""
    workers, model = cluster.included, cluster.model
    ms = np.array(micro_batch_choices(workload.batch, micro_batches))
    fr = np.asarray(sorted(set(offloads)), dtype=float)
    formats = tuple(dict.fromkeys(formats))
    pairs = np.stack(np.meshgrid(fr, fr, indexing="ij"), -1).reshape(-1, 2)
    combos = np.concatenate([np.column_stack([pairs, np.full(len(pairs), fi)]) for fi in range(len(formats))])
    n = np.arange(1, model.n_layers + 1)[:, None]                       # (L, 1) span lengths
    stage = np.full((len(ms), len(workers), model.n_layers + 1), INF)
    best = np.zeros(stage.shape, dtype=int)
    for wi, w in enumerate(workers):
        for mi, m in enumerate(ms):
            total = np.concatenate([  # (L, C): each format's offload pairs, in combos' order; ∞ where not profiled
                cost.stage_cost(w, model, workload, n, int(m), pairs[None, :, 0], pairs[None, :, 1], fmt).total_s
                if _profiled(w, model, fmt) else np.full((len(n), len(pairs)), INF) for fmt in formats], axis=1)
            best[mi, wi, 1:] = total.argmin(1)                             # (L, C) → best choice per length
            stage[mi, wi, 1:] = total.min(1)
    link_s, busy_s = _link_tables(cluster, [w.name for w in workers], cost.hop_bytes(model, ms))
    return Tables(tuple(w.name for w in workers), ms, -(-workload.batch // ms), combos, stage, best, link_s, busy_s,
                  formats)


def _profiled(worker, model, fmt: str | None) -> bool:
    """Whether the profile priced ``fmt`` on ``worker`` (bytes and speed); float always is."""
    return fmt is None or (fmt in model.format_weight_bytes and fmt in worker.format_decode_factor)


def _link_tables(cluster: ClusterProfile, names: list[str], hop_bytes: np.ndarray):
    nodes = names + [cluster.client]
    bw = np.full((len(nodes), len(nodes)), np.nan)
    rtt = np.zeros_like(bw)
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            link = cluster.link(a, b)
            if link is not None:
                bw[i, j], rtt[i, j] = link.bandwidth_bytes_per_s, link.rtt_s
    x = np.asarray(hop_bytes, dtype=float)[:, None, None]
    with np.errstate(invalid="ignore"):
        link_s = np.nan_to_num(cost.transfer_s(x, bw, rtt), nan=INF)
        busy_s = np.nan_to_num(cost.link_busy_s(x, bw), nan=INF)
    return link_s, busy_s


# ---- the two DP engines ------------------------------------------------------------------------

def chain_dp(stage, lin, lmid, lout, allowed=None, may_follow=None):
    """f[m, w, b] = least Σ of a chain covering [0, b) whose last stage is w. Returns (f, R*[m]).

    As is, a worker may come back later in the chain (the relaxation). ``may_follow[u, w]``
    (optional) says which worker may follow which — an order, so none comes back; ``allowed[w, a,
    b]`` (optional) which spans [a, b) each worker may take.
    """
    M, W, L1 = stage.shape
    lmid = np.where(_follows(W, may_follow), lmid, INF)
    f = np.full((M, W, L1), INF)
    for a in range(L1 - 1):
        # entry[m, w]: cost of starting a stage on w at layer a = ℓ(c→w) or min_u f[u, a] + ℓ(u→w)
        entry = lin if a == 0 else np.min(f[:, :, a, None] + lmid, axis=1)
        # f[w, b] ← min(f[w, b], entry[w] + s_w(b − a)) for every b > a
        cand = entry[:, :, None] + stage[:, :, 1:L1 - a]
        if allowed is not None:
            cand = np.where(allowed[None, :, a, a + 1:], cand, INF)
        np.minimum(f[:, :, a + 1:], cand, out=f[:, :, a + 1:])
    return f, np.min(f[:, :, -1] + lout, axis=1)


@lru_cache(maxsize=16)
def _set_pairs(W: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per set size k ≥ 2: arrays (A, v, A without v) for every set A of k workers and v ∈ A."""
    out = []
    for k in range(2, W + 1):
        sets, vs = [], []
        for a in range(1 << W):
            if a.bit_count() == k:
                for v in range(W):
                    if a >> v & 1:
                        sets.append(a)
                        vs.append(v)
        sets, vs = np.array(sets), np.array(vs)
        out.append((sets, vs, sets ^ (1 << vs)))
    return out


def set_dp(stage, lin, lmid, lout, chunk_elems: int = 1_000_000):
    """Exact: f[A, m, w, b] over every set A of workers (the recurrence in the module docstring).

    Sets holding a worker with no usable stage, or extending an unreachable set, are skipped; the
    inner min over a only spans lengths b − a ≤ K, the longest span any worker can take.
    """
    M, W, L1 = stage.shape
    f = np.full((1 << W, M, W, L1), INF)
    usable = np.isfinite(stage).any(axis=(0, 2))                   # [w]
    if not usable.any():
        return f, np.full(M, INF)
    K = int(np.nonzero(np.isfinite(stage).any(axis=(0, 1)))[0].max())
    alive = np.zeros(1 << W, dtype=bool)
    for v in np.nonzero(usable)[0]:
        f[1 << v, :, v, :] = lin[:, v, None] + stage[:, v, :]       # first stage starts at layer 0
        alive[1 << v] = True
    dead = sum(1 << int(v) for v in np.nonzero(~usable)[0])
    s_rev = stage[:, :, K:0:-1]                                    # [m, w, j] = s_w(K − j)
    step = max(1, chunk_elems // (M * L1 * K))
    for sets, vs, prev in _set_pairs(W):
        keep = alive[prev] & ((sets & dead) == 0)
        sets, vs, prev = sets[keep], vs[keep], prev[keep]
        for i in range(0, len(sets), step):
            A, v, p = sets[i:i + step], vs[i:i + step], prev[i:i + step]
            # entry[p, m, a] = min_u f(A∖v, u, a) + ℓ(u→v)
            entry = np.min(f[p] + lmid[:, :, v].transpose(2, 0, 1)[..., None], axis=2)
            # f(A, v, b) = min over d = b − a ∈ [1, K] of entry[b − d] + s_v(d)
            pad = np.concatenate([np.full(entry.shape[:2] + (K,), INF), entry], axis=-1)
            win = np.lib.stride_tricks.sliding_window_view(pad, K, axis=-1)[:, :, :L1]   # [p, m, b, j]
            f[A, :, v, :] = np.min(win + s_rev[:, v].transpose(1, 0, 2)[:, :, None, :], axis=-1)
        done = np.unique(sets)
        alive[done] = np.isfinite(f[done]).any(axis=(1, 2, 3))
    return f, np.min(f[..., -1] + lout[None], axis=(0, 2))


def _follows(W: int, may_follow) -> np.ndarray:
    """[u, w]: w may be the next stage after u (never u itself)."""
    ok = ~np.eye(W, dtype=bool)
    return ok if may_follow is None else ok & may_follow


def trace_chain(f, stage, lin, lmid, lout, allowed=None, may_follow=None) -> list[tuple[int, int, int]]:
    """The (worker, start, end) stages of ``chain_dp``'s optimum (one micro-batch row, 2-D inputs)."""
    W, L1 = stage.shape
    lmid = np.where(_follows(W, may_follow), lmid, INF)
    w, b, out = int(np.argmin(f[:, -1] + lout)), L1 - 1, []
    while True:
        entry = np.min(f[:, :b] + lmid[:, w, None], axis=0)
        entry[0] = lin[w]
        cand = entry + stage[w, b - np.arange(b)]
        if allowed is not None:
            cand = np.where(allowed[w, :b, b], cand, INF)
        a = int(np.argmin(cand))
        out.append((w, a, b))
        if a == 0:
            return out[::-1]
        w, b = int(np.argmin(f[:, a] + lmid[:, w])), a


def trace_set(f, stage, lin, lmid, lout) -> list[tuple[int, int, int]]:
    """The (worker, start, end) stages of the set-DP's optimum (one micro-batch row: f is [A, w, b])."""
    L = stage.shape[-1] - 1
    A, w = np.unravel_index(int(np.argmin(f[:, :, -1] + lout[None])), f.shape[:2])
    A, w, b, out = int(A), int(w), L, []
    while True:
        prev = A & ~(1 << w)
        if prev == 0:
            out.append((w, 0, b))
            return out[::-1]
        entry = np.min(f[prev][:, :b] + lmid[:, w, None], axis=0)
        a = int(np.argmin(entry + stage[w, b - np.arange(b)]))
        out.append((w, a, b))
        A, w, b = prev, int(np.argmin(f[prev][:, a] + lmid[:, w])), a


# ---- objectives: R*(m), or min over caps of max(g(τ), n·τ) --------------------------------------

def _best_latency(t: Tables, engine, mis, ix):
    """(R* per micro-batch row, cap ∞)."""
    tau = np.full(len(mis), INF)
    return engine(*t.capped(tau, mis, ix))[1], tau


def _best_period(t: Tables, engine, mis, ix, tau_lo=None, tau_hi=None):
    """(T* = min_τ max(g(τ), n·τ) per micro-batch row, the τ attaining it), by binary search.

    Optional brackets per row: the crossing cap is ≥ R*/n (as g ≥ R*), so caps below ``tau_lo``
    but the last one are skipped; a plan with a period under a known T has b ≤ T/n, so caps above
    ``tau_hi`` = T/n are skipped (a row that cannot beat T then returns a value ≥ T, or ∞).
    """
    n = t.n_micro[mis].astype(float)
    cands = [t.candidates(mi) for mi in mis]
    tau_lo = [0.0] * len(mis) if tau_lo is None else tau_lo
    tau_hi = [INF] * len(mis) if tau_hi is None else tau_hi
    start = np.array([max(0, np.searchsorted(c, x) - 1) for c, x in zip(cands, tau_lo)])
    stop = np.array([np.searchsorted(c, x, side="right") - 1 for c, x in zip(cands, tau_hi)])
    empty = stop < start                                   # also rows without any candidate
    if empty.all():
        return np.full(len(mis), INF), np.full(len(mis), INF)
    cands = [c if len(c) else np.array([INF]) for c in cands]
    start, stop = np.where(empty, 0, start), np.where(empty, 0, stop)
    caps = lambda idx: np.array([c[i] for c, i in zip(cands, idx)])
    g = lambda idx: engine(*t.capped(caps(idx), mis, ix))[1]
    lo, hi = start.copy(), stop.copy()
    while np.any(lo < hi):  # first cap in [start, stop] with g(τ) ≤ n·τ (g falls, n·τ rises), else stop
        mid = (lo + hi) // 2
        ok, active = g(mid) <= n * caps(mid), lo < hi
        hi, lo = np.where(active & ok, mid, hi), np.where(active & ~ok, mid + 1, lo)
    prev = np.maximum(lo - 1, start)
    h_lo, h_prev = np.maximum(g(lo), n * caps(lo)), np.maximum(g(prev), n * caps(prev))
    take_prev = h_prev < h_lo
    value = np.where(empty, INF, np.where(take_prev, h_prev, h_lo))
    return value, np.where(take_prev, caps(prev), caps(lo))


# ---- the three searches -----------------------------------------------------------------------

@dataclass(frozen=True)
class Found:
    """One search's answer: objective value, micro-batch row, cap, stages and its DP table."""

    value: float
    mi: int
    tau: float
    stages: tuple[tuple[int, int, int], ...]  # (included-worker index, start, end)
    table: np.ndarray                         # [w, b]: least Σ covering [0, b) ending on w (at mi, tau)
    method: str
    exact: bool


def _found(t: Tables, value: float, mi: int, tau: float, ix, engine, tracer, method: str, exact: bool) -> Found:
    """Re-run ``engine`` for one row and cap, keeping its table, and trace the optimal chain."""
    if not np.isfinite(value):
        return Found(INF, mi, tau, (), np.empty(0), method, exact)
    stage, lin, lmid, lout = t.capped(np.array([tau]), np.array([mi]), ix)
    f, _ = engine(stage, lin, lmid, lout)
    f = f[0] if f.ndim == 3 else f[:, 0]                      # set-DP: [A, w, b] for this row
    stages = tracer(f, stage[0], lin[0], lmid[0], lout[0])
    table = np.full((len(t.names), stage.shape[-1]), INF)
    table[ix] = f if f.ndim == 2 else f.min(axis=0)
    return Found(value, mi, tau, tuple((int(ix[w]), a, b) for w, a, b in stages), table, method, exact)


def _relaxed(t: Tables, best_of):
    """Mode 1: (per-row lower bounds, the relaxation's plan; exact when no worker repeats)."""
    all_w, all_m = np.arange(len(t.names)), np.arange(len(t.micro_batches))
    lower, taus = best_of(t, chain_dp, all_m, all_w)
    mi = int(np.argmin(lower))
    found = _found(t, lower[mi], mi, taus[mi], all_w, chain_dp, trace_chain, "relaxed DP", True)
    repeats = len({w for w, _, _ in found.stages}) < len(found.stages)
    return lower, replace(found, exact=not repeats, method="relaxed DP (no worker repeats: exact)")


def _sets(t: Tables, objective: str, lower: np.ndarray, ix, method: str, exact: bool) -> Found:
    """Modes 2–3: the set-DP over workers ``ix``. For throughput, rows are tried best lower bound
    first — max(relaxation, R*(m), n·bottleneck floor) — and skipped once they cannot beat the
    best period found; each row's cap search is bracketed by [R*/n, best/n]."""
    R = np.array([_best_latency(t, set_dp, np.array([mi]), ix)[0][0] for mi in range(len(t.micro_batches))])
    best, best_mi, best_tau = INF, int(np.argmin(R)), INF
    if objective == "latency":
        best = float(R[best_mi])
    else:
        n = t.n_micro.astype(float)
        floor = _bottleneck_floor(t, ix)
        bound = np.maximum.reduce([lower, R, n * floor])
        for mi in np.argsort(bound, kind="stable"):
            if bound[mi] >= best:
                break
            v, tau = _best_period(t, set_dp, np.array([mi]), ix, [max(R[mi] / n[mi], floor[mi])], [best / n[mi]])
            if v[0] < best:
                best, best_mi, best_tau = float(v[0]), int(mi), float(tau[0])
    return _found(t, best, best_mi, best_tau, ix, set_dp, trace_set, method, exact)


def _ordered(t: Tables, best_of, order: list[int]) -> Found:
    """Mode 3: every worker, but a chain must follow ``order`` (it may skip workers)."""
    pos = np.empty(len(order), int)
    pos[order] = np.arange(len(order))
    follows = pos[:, None] < pos[None, :]
    engine, tracer = partial(chain_dp, may_follow=follows), partial(trace_chain, may_follow=follows)
    all_w = np.arange(len(t.names))
    values, taus = best_of(t, engine, np.arange(len(t.micro_batches)), all_w)
    mi = int(np.argmin(values))
    return _found(t, values[mi], mi, taus[mi], all_w, engine, tracer,
                  f"order-restricted DP over all {len(order)} workers (restricted)", False)


def _rank(t: Tables, mi: int) -> np.ndarray:
    """Workers by cost per layer hosted: min over n of (s_w(n) + a typical hop to or from w) / n —
    big, fast, well-connected workers first."""
    W = len(t.names)
    link = np.where(np.eye(W + 1, dtype=bool) | ~np.isfinite(t.link_s[mi]), np.nan, t.link_s[mi])
    with warnings.catch_warnings(), np.errstate(all="ignore"):     # a worker without links: ∞
        warnings.simplefilter("ignore", RuntimeWarning)
        hop = np.nan_to_num((np.nanmedian(link[:, :W], axis=0) + np.nanmedian(link[:W, :], axis=1)) / 2, nan=INF)
    per_layer = np.min((t.stage_s[mi, :, 1:] + hop[:, None]) / np.arange(1, t.stage_s.shape[-1]), axis=1)
    return np.argsort(per_layer, kind="stable")


def _restricted(t: Tables, objective: str, best_of, lower: np.ndarray, relaxed: Found, size: int) -> Found:
    """Mode 3: the better of the set-DP over a shortlist (the relaxation's workers, then by rank)
    and the order-restricted DP over all workers (same order; reversed if neither finds a chain)."""
    order = list(dict.fromkeys([w for w, _, _ in relaxed.stages] + [int(w) for w in _rank(t, relaxed.mi)]))
    ix = np.array(sorted(order[:size]))
    shortlisted = _sets(t, objective, lower, ix, f"set-DP over a shortlist of {len(ix)} of {len(order)} workers "
                                                 f"(restricted)", False)
    found = min(shortlisted, _ordered(t, best_of, order), key=lambda f: f.value)
    return found if np.isfinite(found.value) else _ordered(t, best_of, order[::-1])


def _bottleneck_floor(t: Tables, ix) -> np.ndarray:
    """A lower bound on any chain's bottleneck b, per micro-batch row. With b, worker w can hold at
    most #{n ≥ 1 : s_w(n) ≤ b} layers (s_w grows with n) and hosts one stage, so the counts must
    reach L: b ≥ the L-th smallest s_w(n) over all (w, n). Some link also leaves the client and
    some link reaches it."""
    L = t.stage_s.shape[-1] - 1
    stage = np.sort(t.stage_s[:, ix, 1:].reshape(len(t.micro_batches), -1), axis=1)[:, L - 1]
    nodes = np.append(ix, len(t.names))
    busy = t.busy_s[:, nodes][:, :, nodes]
    return np.maximum(stage, np.maximum(busy[:, -1, :-1].min(1), busy[:, :-1, -1].min(1)))


def _sum_floor(t: Tables, ix) -> np.ndarray:
    """A lower bound on any chain's R per micro-batch row: the least Σ s_w(n_w) over distinct
    workers with Σ n_w = L (a knapsack over workers, links ignored) plus the cheapest link out of
    and back into the client."""
    M, _, L1 = t.stage_s.shape
    back = np.arange(L1)[:, None] - np.arange(L1)[None, :]           # [l, d] = l − d
    h = np.full((M, L1), INF)
    h[:, 0] = 0.0                                                    # h[m, l]: least Σ covering l layers
    for w in ix:
        prev = np.where(back >= 0, h[:, np.clip(back, 0, None)], INF)  # [m, l, d] = h[l − d]
        h = np.minimum(h, np.min(prev + t.stage_s[:, w, None, :], axis=2))
    nodes = np.append(ix, len(t.names))
    link = t.link_s[:, nodes][:, :, nodes]
    return h[:, -1] + link[:, -1, :-1].min(1) + link[:, :-1, -1].min(1)


def _lower_bound(t: Tables, objective: str, lower: np.ndarray) -> float:
    """The best proven bound on the objective: per row the largest of the relaxation, the knapsack
    floor on R, and (throughput) n × the bottleneck floor; then the least over rows."""
    ix = np.arange(len(t.names))
    bound = np.maximum(lower, _sum_floor(t, ix))
    if objective == "throughput":
        bound = np.maximum(bound, t.n_micro * _bottleneck_floor(t, ix))
    return float(bound.min())


# ---- the planner -------------------------------------------------------------------------------

def solve(cluster: ClusterProfile, workload: Workload, *, micro_batches=DEFAULT_MICRO_BATCHES,
          offloads=DEFAULT_OFFLOADS, exact_max_workers: int | str = "auto", shortlist: int | str = "auto",
          formats=(None,)) -> Plan:
    """The best plan for ``workload`` on ``cluster`` (see the module docstring for what "best" means).

    ``exact_max_workers``: up to this many included workers the set-DP is exact ("auto": by
    EXACT_BUDGET); ``shortlist``: how many workers the restricted search's set-DP tries.
    ``formats``: the weight formats a stage may use (None = float, "int8", "nf4"), priced by the
    profile's ``format_weight_bytes`` and each worker's ``format_decode_factor``.
    Raises :class:`InfeasiblePlanError` when no chain of the included workers can hold the model.
    """
    t0 = time.perf_counter()
    t = build_tables(cluster, workload, micro_batches, offloads, formats)
    _check_memory(cluster, workload, t, offloads)
    best_of = _best_latency if workload.objective == "latency" else _best_period
    W, L = len(t.names), cluster.model.n_layers
    lower, found = _relaxed(t, best_of)
    _check_links(lower=lower)
    if not found.exact:
        limit = _set_dp_limit(L, EXACT_BUDGET) if exact_max_workers == "auto" else int(exact_max_workers)
        size = _set_dp_limit(L, SHORTLIST_BUDGET) if shortlist == "auto" else int(shortlist)
        found = (_sets(t, workload.objective, lower, np.arange(W), f"set-DP over all {W} workers (exact)", True)
                 if W <= limit else _restricted(t, workload.objective, best_of, lower, found, size))
        _check_links(found)
    chain = [_chain_stage(t, t.names[w], a, b, t.combos[t.combo[found.mi, w, b - a]]) for w, a, b in found.stages]
    plan = evaluate_chain(cluster, workload, chain, int(t.micro_batches[found.mi]), method=found.method,
                          exact=found.exact,
                          lower_bound_s=found.value if found.exact else _lower_bound(t, workload.objective, lower),
                          offloads=tuple(offloads), unused_reason=_unused_reason(found),
                          cost_table_s=_cost_table(cluster, t, found.table))
    return replace(plan, planning_s=time.perf_counter() - t0)


def _chain_stage(t: Tables, worker: str, a: int, b: int, combo) -> ChainStage:
    """The stage a DP choice stands for: (weight offload, KV offload, format index) → a ChainStage."""
    return ChainStage(worker, a, b, float(combo[0]), float(combo[1]), t.formats[int(combo[2])])


def _set_dp_limit(n_layers: int, budget: float) -> int:
    """Largest W (at most 12) whose set-DP run costs at most ``budget``: W · 2^(W−1) · (L+1)²."""
    W = 1
    while W < 12 and (W + 1) * 2 ** W * (n_layers + 1) ** 2 <= budget:
        W += 1
    return W


def _unused_reason(found: Found) -> str:
    if found.exact:
        return "not needed: the chain is faster without it"
    return "not used by the restricted search (not exact; see the plan's method and lower_bound_s)"


def _cost_table(cluster: ClusterProfile, t: Tables, table: np.ndarray) -> np.ndarray:
    """[b − 1, worker] in cluster order: the DP's least Σ time (s) to cover layers [0, b) with a
    chain ending on that worker, at the plan's micro-batch (and cap); ∞: impossible or not searched."""
    out = np.full((cluster.model.n_layers, len(cluster.workers)), INF)
    col = {w.name: j for j, w in enumerate(cluster.workers)}
    for wi, name in enumerate(t.names):
        out[:, col[name]] = table[wi, 1:]
    out.setflags(write=False)
    return out


# ---- infeasibility -----------------------------------------------------------------------------

def _check_memory(cluster: ClusterProfile, workload: Workload, t: Tables, offloads) -> None:
    """Raise when the included workers cannot hold every layer (whole layers, given offload choices)."""
    model, L = cluster.model, cluster.model.n_layers
    fits = np.isfinite(t.stage_s[0])                                     # [w, n] (memory does not depend on m)
    most = np.where(fits.any(1), fits.shape[1] - 1 - np.argmax(fits[:, ::-1], axis=1), 0)
    held = int(min(L, most.sum()))
    if held >= L:
        return
    per_layer = cost.min_bytes_for(model, workload, 1)
    missing = (L - held) * per_layer
    excluded = [w.name for w in cluster.workers if not w.include]
    raise InfeasiblePlanError(
        f"the model does not fit: {L} layers need {_gib(L * per_layer)} (weights {_gib(model.layer_weight_bytes)} "
        f"+ KV {_gib(per_layer - model.layer_weight_bytes)} per layer at batch {workload.batch}, "
        f"max_length {workload.max_length}), but the {len(t.names)} included workers hold only {held} whole layers "
        f"with offload choices {tuple(offloads)}: {_gib(missing)} missing. Add workers or memory "
        f"(a disk budget counts once offloading is allowed), lower batch or max_length"
        + (f", or include {excluded}" if excluded else "") + ".")


def _check_links(found: Found | None = None, lower: np.ndarray | None = None) -> None:
    """Raise when memory sufficed but no chain of links does (for the restricted search: none it tried)."""
    if (lower is not None and np.isfinite(lower).any()) or (found is not None and np.isfinite(found.value)):
        return
    chain = "no chain of measured links" if found is None else (
        "no chain of distinct workers" if found.exact else "the restricted search found no chain of distinct workers")
    raise InfeasiblePlanError(f"the workers have room for the model, but {chain} joins the client to them and "
                              "back; measure the missing links or add them with ClusterProfile.with_link(…)"
                              + ("" if found is None or found.exact else ", or raise exact_max_workers"))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

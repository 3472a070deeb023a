"""The DP against brute force, its infeasibility errors, and the consistency of the Plan it returns."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from plan_instances import MIB, brute_force, random_instance

from bloombee_nb.plan import (ClusterProfile, InfeasiblePlanError, LinkProfile, ModelProfile, WorkerProfile,
                              Workload, even_split, petals_greedy, solve)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
OBJECTIVES = st.sampled_from(["latency", "throughput"])


def close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-9)


@settings(max_examples=120, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n_workers=st.integers(2, 4), n_layers=st.integers(2, 6),
       batch=st.sampled_from([1, 2, 3, 4, 8]), objective=OBJECTIVES, memory_scale=st.sampled_from([0.5, 1.0, 3.0]))
def test_dp_equals_brute_force(seed, n_workers, n_layers, batch, objective, memory_scale):
    cluster, workload = random_instance(seed, n_workers, n_layers, batch, objective, memory_scale)
    micro, offloads = (1, 2, 4), (0.0, 0.5, 1.0)
    best = brute_force(cluster, workload, micro, offloads)
    if math.isinf(best):
        event("infeasible")
        with pytest.raises(InfeasiblePlanError):
            solve(cluster, workload, micro_batches=micro, offloads=offloads)
        return
    plan = solve(cluster, workload, micro_batches=micro, offloads=offloads)
    event(plan.method)
    event(f"{len(plan.stages)} stage(s)")
    event("offloads" if any(s.weight_offload or s.kv_offload for s in plan.stages) else "no offload")
    assert plan.exact
    assert close(plan.objective_s, best), (plan.objective_s, best, plan.method)
    assert close(plan.lower_bound_s, best)


@pytest.mark.slow  # a brute-force sweep (2 s)
@settings(max_examples=8, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), objective=OBJECTIVES)
def test_dp_equals_brute_force_five_workers_eight_layers(seed, objective):
    cluster, workload = random_instance(seed, 5, 8, batch=4, objective=objective, memory_scale=2.0)
    micro, offloads = (1, 4), (0.0, 1.0)
    best = brute_force(cluster, workload, micro, offloads)
    if math.isinf(best):
        return
    plan = solve(cluster, workload, micro_batches=micro, offloads=offloads)
    assert close(plan.objective_s, best), (plan.objective_s, best, plan.method)


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n_workers=st.integers(3, 5), n_layers=st.integers(2, 6),
       batch=st.sampled_from([1, 4]), objective=OBJECTIVES)
def test_restricted_search_brackets_the_optimum(seed, n_workers, n_layers, batch, objective):
    """Forced into the restricted search: lower_bound_s ≤ optimum ≤ its objective."""
    cluster, workload = random_instance(seed, n_workers, n_layers, batch, objective, memory_scale=1.0,
                                        p_missing_link=0.0)  # with every link, (b) always finds a chain
    micro, offloads = (1, 4), (0.0, 1.0)
    best = brute_force(cluster, workload, micro, offloads)
    if math.isinf(best):
        return
    plan = solve(cluster, workload, micro_batches=micro, offloads=offloads, exact_max_workers=1, shortlist=2)
    assert plan.lower_bound_s <= best * (1 + 1e-9) and best <= plan.objective_s * (1 + 1e-9)


@settings(max_examples=150, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n_workers=st.integers(2, 8), n_layers=st.integers(2, 12),
       batch=st.sampled_from([1, 4, 16]), objective=OBJECTIVES)
def test_dp_never_worse_than_baselines(seed, n_workers, n_layers, batch, objective):
    cluster, workload = random_instance(seed, n_workers, n_layers, batch, objective, memory_scale=3.0,
                                        p_missing_link=0.0)
    try:
        plan = solve(cluster, workload)
    except InfeasiblePlanError:
        return
    for baseline in (even_split, petals_greedy):
        try:
            other = baseline(cluster, workload)
        except InfeasiblePlanError:
            continue
        event(f"compared with {baseline.__name__}")
        assert plan.objective_s <= other.objective_s * (1 + 1e-9), (baseline.__name__, plan, other)


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2**32 - 1), n_workers=st.integers(1, 9), n_layers=st.integers(1, 12),
       batch=st.sampled_from([1, 3, 16]), objective=OBJECTIVES)
def test_stage_times_add_up(seed, n_workers, n_layers, batch, objective):
    cluster, workload = random_instance(seed, n_workers, n_layers, batch, objective, memory_scale=3.0)
    try:
        plan = solve(cluster, workload, exact_max_workers=4, shortlist=3)
    except InfeasiblePlanError:
        return
    parts = sum(s.transfer_in_s + s.compute_s + s.offload_s for s in plan.stages) + plan.return_transfer_s
    assert math.isclose(parts, plan.latency_s, rel_tol=1e-12)
    busiest = max([plan.return_busy_s] + [max(s.stage_s, s.busy_in_s) for s in plan.stages])
    assert plan.bottleneck_s == busiest
    assert plan.period_s == max(plan.latency_s, plan.n_micro * plan.bottleneck_s)
    assert math.isclose(plan.tokens_per_s * plan.period_s, workload.batch)
    assert plan.lower_bound_s <= plan.objective_s * (1 + 1e-9)
    # the spans cover every layer once, in order; every worker has a reason
    assert [a for _, a, _ in plan.spans] == [0] + [b for _, _, b in plan.spans][:-1]
    assert plan.spans[-1][2] == n_layers
    assert [name for name, _ in plan.reasons] == [w.name for w in cluster.workers]
    has_kv = cluster.model.kv_bytes_per_token_per_layer > 0
    for s in plan.stages:
        assert math.isclose(sum(s.weight_fractions), 1)
        assert math.isclose(sum(s.kv_fractions), 1 if has_kv else 0)
    assert plan.cost_table_s.shape == (n_layers, n_workers)


# ---- hand-made instances -----------------------------------------------------------------------

def _cluster(workers, model=None, bandwidth=1e8, rtt=0.01):
    model = model or ModelProfile("m", 6, layer_weight_bytes=100 * MIB, kv_bytes_per_token_per_layer=0,
                                  hidden_bytes_per_token=1024)
    names = ["client"] + [w.name for w in workers]
    links = [LinkProfile(a, b, bandwidth, rtt) for a in names for b in names if a != b]
    return ClusterProfile(model=model, workers=tuple(workers), links=tuple(links))


def _worker(name, ram_layers, decode_s=0.01, **kw):
    return WorkerProfile(name, f"tcp://{name}:1", {1: decode_s}, ram_bytes=ram_layers * 100 * MIB, **kw)


def test_infeasible_names_missing_memory():
    cluster = _cluster([_worker("a", 2), _worker("b", 2)])
    with pytest.raises(InfeasiblePlanError, match=r"200\.0 MiB missing") as e:
        solve(cluster, Workload())
    assert "Add workers or memory" in str(e.value)


def test_infeasible_counts_kv_and_suggests_excluded_workers():
    model = ModelProfile("m", 4, layer_weight_bytes=2**30, kv_bytes_per_token_per_layer=2**20,
                         hidden_bytes_per_token=1024)
    big = 2**30 + 8 * 256 * 2**20          # one layer + its KV at batch 8, max_length 256
    cluster = _cluster([WorkerProfile("a", "tcp://a:1", {1: 0.01}, ram_bytes=3 * big),
                        WorkerProfile("b", "tcp://b:1", {1: 0.01}, ram_bytes=big, include=False)], model=model)
    with pytest.raises(InfeasiblePlanError, match=r"3\.00 GiB missing.*include \['b'\]"):
        solve(cluster, Workload(batch=8, prompt_len=128, new_tokens=128))
    plan = solve(cluster.with_worker("b", include=True), Workload(batch=8, prompt_len=128, new_tokens=128))
    assert sorted(s.n_layers for s in plan.stages) == [1, 3]


def test_offloading_to_disk_makes_it_fit():
    cluster = _cluster([_worker("a", 2, disk_bytes=10 * 100 * MIB)])
    with pytest.raises(InfeasiblePlanError):
        solve(cluster, Workload(), offloads=(0.0,))
    plan = solve(cluster, Workload())
    (stage,) = plan.stages
    assert stage.weight_offload > 0 and stage.weight_fractions[2] > 0   # some weights on disk
    assert stage.offload_s > 0


def test_missing_links_are_infeasible_with_a_hint():
    cluster = _cluster([_worker("a", 6)])
    cut = ClusterProfile(cluster.model, cluster.workers, tuple(ln for ln in cluster.links if ln.dst != "client"))
    with pytest.raises(InfeasiblePlanError, match="with_link"):
        solve(cut, Workload())


def test_reasons_and_spans():
    fast, slow = _worker("fast", 6, decode_s=0.001), _worker("slow", 6, decode_s=0.1)
    cluster = _cluster([fast, slow, _worker("tiny", 0), _worker("off", 6, include=False)])
    plan = solve(cluster, Workload())
    assert plan.spans == [("tcp://fast:1", 0, 6)]
    assert plan.workers == ["tcp://fast:1"] and plan.layer_spans == [(0, 6)]
    why = plan.reason_by_worker
    assert why["fast"] == "hosts layers 0–5"
    assert why["slow"].startswith("not needed")
    assert why["tiny"].startswith("does not fit any layer")
    assert why["off"] == "excluded by user"
    html = plan._repr_html_()
    assert "fast" in html and "excluded by user" in html


def test_throughput_uses_micro_batches_and_pipelines():
    """Two equal workers, each holding half the model: throughput wants micro-batches in flight."""
    ws = [WorkerProfile(n, f"tcp://{n}:1", {1: 0.01, 64: 0.64}, ram_bytes=3 * 100 * MIB) for n in "ab"]
    cluster = _cluster(ws, rtt=0.0, bandwidth=1e12)
    plan = solve(cluster, Workload(batch=64, objective="throughput"))
    assert [s.n_layers for s in plan.stages] == [3, 3]
    assert plan.micro_batch < 64
    assert math.isclose(plan.period_s, plan.n_micro * plan.bottleneck_s, rel_tol=1e-6)
    latency = solve(cluster, Workload(batch=64, objective="latency"))
    assert latency.latency_s <= plan.latency_s * (1 + 1e-9)
    assert plan.tokens_per_s >= latency.tokens_per_s * (1 - 1e-9)


def test_restricted_search_reports_a_lower_bound():
    cluster = _cluster([_worker(f"w{i}", 2, decode_s=0.01 * (i + 1)) for i in range(6)])
    plan = solve(cluster, Workload(), exact_max_workers=2, shortlist=4)
    assert not plan.exact and "shortlist of 4" in plan.method
    assert plan.lower_bound_s <= plan.objective_s
    exact = solve(cluster, Workload())
    assert exact.exact and exact.objective_s <= plan.objective_s


def test_planning_is_fast_for_64_workers():
    """Not a timing assert (benchmarks time it): 64 workers × 80 layers must at least plan."""
    from bloombee_nb.plan.synthetic import random_cluster
    plan = solve(random_cluster(64, seed=0), Workload(batch=16, objective="throughput"))
    assert plan.spans[-1][2] == 80 and np.isfinite(plan.period_s)


def test_plan_imports_neither_torch_nor_dask():
    import subprocess
    import sys
    code = ("import sys, bloombee_nb.plan, bloombee_nb.plan.synthetic; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dask', 'distributed')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"

"""The planner chooses a weight format per stage (issue 19) from the user's allowed formats."""

import itertools
import math

import pytest

from bloombee_nb.notebook.plan_widget import stage_rows
from bloombee_nb.plan import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile, Workload, cost, solve
from bloombee_nb.plan.errors import InfeasiblePlanError
from tests.plan.plan_instances import random_instance

MIB = 2 ** 20
FORMATS = (None, "int8", "nf4")


def quantized(cluster: ClusterProfile, int8=0.9, nf4=1.3) -> ClusterProfile:
    """The same cluster with int8 (¼ of the bytes) and nf4 (⅛ + scales) priced: measured-like factors."""
    lw = cluster.model.layer_weight_bytes
    out = cluster.with_formats({"int8": lw // 4, "nf4": lw // 7},
                               {w.name: {"int8": int8, "nf4": nf4} for w in cluster.workers})
    assert ClusterProfile.from_json(out.to_json()) == out  # the formats survive a profile's JSON
    return out


def brute_latency(cluster: ClusterProfile, workload: Workload, offloads) -> float:
    """Least latency over every ordered subset, split, offload pair and format per stage (batch 1)."""
    model, L, best = cluster.model, cluster.model.n_layers, math.inf
    for k in range(1, min(len(cluster.included), L) + 1):
        for order in itertools.permutations(cluster.included, k):
            names = [cluster.client, *[w.name for w in order], cluster.client]
            links = [cluster.link(a, b) for a, b in zip(names[:-1], names[1:])]
            if None in links:
                continue
            hops = sum(cost.transfer_s(model.hidden_bytes_per_token, x.bandwidth_bytes_per_s, x.rtt_s) for x in links)
            for cuts in itertools.combinations(range(1, L), k - 1):
                bounds = (0, *cuts, L)
                best = min(best, hops + sum(min(float(cost.stage_cost(w, model, workload, b - a, 1, wo, ko, f).total_s)
                                                for wo in offloads for ko in offloads for f in FORMATS)
                                            for w, a, b in zip(order, bounds[:-1], bounds[1:])))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_dp_with_formats_matches_brute_force(seed):
    cluster, workload = random_instance(seed, n_workers=3, n_layers=4, memory_scale=0.4)
    cluster = quantized(cluster)
    want = brute_latency(cluster, workload, (0.0, 1.0))
    try:
        plan = solve(cluster, workload, offloads=(0.0, 1.0), formats=FORMATS, micro_batches=(1,))
    except InfeasiblePlanError:
        assert math.isinf(want)
        return
    assert plan.latency_s == pytest.approx(want, rel=1e-9)


def two_workers(ram_layers: float) -> tuple[ClusterProfile, Workload]:
    """8 layers of 100 MiB; two CPU workers with room for ``ram_layers`` float layers each."""
    model = ModelProfile("m", 8, layer_weight_bytes=100 * MIB, kv_bytes_per_token_per_layer=1024,
                         hidden_bytes_per_token=2048)
    workers = tuple(WorkerProfile(f"w{i}", f"tcp://127.0.0.1:{9100 + i}", {1: 0.01},
                                  ram_bytes=int(ram_layers * 101 * MIB)) for i in range(2))
    links = tuple(LinkProfile(a, b, 1e8, 0.001) for a, b in itertools.permutations(["client", "w0", "w1"], 2))
    return quantized(ClusterProfile(model=model, workers=workers, links=links)), Workload(prompt_len=8, new_tokens=8)


def test_a_model_too_big_at_float_is_served_quantized_and_the_widget_says_so():
    cluster, workload = two_workers(ram_layers=2.5)  # 5 float layers fit in all, the model has 8
    with pytest.raises(InfeasiblePlanError, match="does not fit"):
        solve(cluster, workload, offloads=(0.0,))
    plan = solve(cluster, workload, offloads=(0.0,), formats=FORMATS)
    assert sum(s.n_layers for s in plan.stages) == 8 and any(s.quantize for s in plan.stages)
    assert all(s.quantize in FORMATS for s in plan.stages)
    assert any(("int8" in row[2] or "nf4" in row[2]) for row in stage_rows(plan))


def test_formats_are_chosen_by_cost_and_never_when_not_allowed_or_not_profiled():
    cluster, workload = two_workers(ram_layers=100)  # everything fits at float
    assert {s.quantize for s in solve(cluster, workload, formats=FORMATS).stages} == {"int8"}  # 0.9x: faster
    assert {s.quantize for s in solve(quantized(cluster, int8=1.5), workload, formats=FORMATS).stages} == {None}
    assert {s.quantize for s in solve(cluster, workload).stages} == {None}                    # not allowed
    bare = ClusterProfile(model=ModelProfile("m", 8, 100 * MIB, 1024, 2048), workers=cluster.workers,
                          links=cluster.links)
    assert {s.quantize for s in solve(bare, workload, formats=FORMATS).stages} == {None}      # not profiled

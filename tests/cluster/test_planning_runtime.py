"""runtime_plan: the DP with its own micro-batch and offload choices, priced as the runtime relays."""

import pytest

from bloombee_nb.cluster.planning import runtime_plan
from bloombee_nb.plan import (DEFAULT_MICRO_BATCHES, DEFAULT_OFFLOADS, ClusterProfile, InfeasiblePlanError, LinkProfile,
                              ModelProfile, WorkerProfile, Workload, solve)

MIB = 2 ** 20


def tight(chain_overhead_s: float | None = None) -> ClusterProfile:
    """Two accelerator workers, 30 MiB each, for 80 MiB of layers; decode time grows with the rows."""
    model = ModelProfile("toy", n_layers=8, layer_weight_bytes=10 * MIB, kv_bytes_per_token_per_layer=1024,
                         hidden_bytes_per_token=2048)
    workers = [WorkerProfile(n, f"tcp://{n}:1", {1: 1e-3, 8: 8e-3}, accel_bytes=30 * MIB, ram_bytes=2 ** 30,
                             disk_bytes=2 ** 30, ram_read_bytes_per_s=50e9, step_overhead_s=2e-3,
                             chain_step_overhead_s=chain_overhead_s) for n in ("g1", "g2")]
    names = ["client", "g1", "g2"]
    links = [ln for i, x in enumerate(names) for y in names[i + 1:] for ln in LinkProfile.both_ways(x, y, 125e6, 1e-3)]
    return ClusterProfile(model, tuple(workers), tuple(links))


def test_the_runtime_plans_offloading_and_micro_batches():
    wl = Workload(batch=8, objective="throughput")
    with pytest.raises(InfeasiblePlanError):                  # what the runtime planner was limited to before
        solve(tight(), wl, offloads=(0.0,), micro_batches=(8,))
    plan = runtime_plan(tight(), wl)
    assert all(s.weight_offload > 0 for s in plan.stages) and sum(s.n_layers for s in plan.stages) == 8
    assert plan.micro_batch < 8 and plan.n_micro > 1          # pipelined: a shorter period than one pass
    assert plan == solve(tight().priced_for_chain(), wl, offloads=DEFAULT_OFFLOADS, micro_batches=DEFAULT_MICRO_BATCHES)


def test_choices_can_still_be_narrowed_and_relay_prices_the_profile():
    wl = Workload(batch=8, objective="throughput")
    whole = runtime_plan(tight(), wl, micro_batches=(8,))
    assert whole.micro_batch == 8 and whole.n_micro == 1
    assert runtime_plan(tight(), wl).period_s < whole.period_s
    measured = tight(chain_overhead_s=0.0)                    # forwarding stage to stage skips the client's cost
    assert runtime_plan(measured, wl).latency_s < runtime_plan(measured, wl, relay="star").latency_s

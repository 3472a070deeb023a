"""The two baselines: even split and Petals-style greedy block selection."""

import numpy as np
import pytest

from bloombee_nb.plan import (ChainStage, ClusterProfile, InfeasiblePlanError, LinkProfile, ModelProfile,
                              WorkerProfile, Workload, even_split, petals_greedy)
from bloombee_nb.plan.baselines import _stay_on_revisited, choose_window, petals_spans

MIB = 2**20
MODEL = ModelProfile("m", 8, layer_weight_bytes=100 * MIB, kv_bytes_per_token_per_layer=0, hidden_bytes_per_token=1024)


def cluster_of(*workers):
    names = ["client"] + [w.name for w in workers]
    links = [LinkProfile(a, b, 1e8, 0.01) for a in names for b in names if a != b]
    return ClusterProfile(MODEL, tuple(workers), tuple(links))


def worker(name, layers, decode_s=0.01, **kw):
    return WorkerProfile(name, f"tcp://{name}:1", {1: decode_s}, ram_bytes=layers * 100 * MIB, **kw)


def test_choose_window_takes_the_least_served_layers():
    served = np.array([3.0, 3.0, 1.0, 0.0, 0.0, 2.0])
    assert choose_window(served, 2) == 3           # (0, 0) is least
    assert choose_window(served, 3) == 2           # (0, 0, 1) beats (0, 0, 2)
    assert choose_window(np.zeros(5), 2) == 0      # ties: the first window


def test_petals_spans_fill_the_gaps_in_turn():
    spans = petals_spans(cluster_of(worker("a", 5), worker("b", 5), worker("c", 2)), Workload())
    assert spans == {"a": (0, 5), "b": (3, 8), "c": (0, 2)}   # layers 3–4 are served twice
    with pytest.raises(InfeasiblePlanError, match="2 layers unhosted"):
        petals_spans(cluster_of(worker("a", 3), worker("b", 3)), Workload())


def test_petals_route_uses_sub_spans_and_never_revisits():
    plan = petals_greedy(cluster_of(worker("a", 5), worker("b", 5, decode_s=0.001)), Workload())
    assert plan.spans == [("tcp://a:1", 0, 3), ("tcp://b:1", 3, 8)]   # b is faster: it takes all it hosts
    route = [ChainStage("a", 0, 2), ChainStage("b", 2, 4), ChainStage("a", 4, 6), ChainStage("c", 6, 8)]
    assert _stay_on_revisited(route) == [ChainStage("a", 0, 6), ChainStage("c", 6, 8)]


def test_even_split():
    plan = even_split(cluster_of(worker("a", 8), worker("b", 8), worker("c", 8), worker("x", 8, include=False)),
                      Workload())
    assert plan.layer_spans == [(0, 3), (3, 6), (6, 8)] and plan.method == "even split"
    assert plan.reason_by_worker["x"] == "excluded by user"
    with pytest.raises(InfeasiblePlanError, match="cannot hold its 4 layers"):
        even_split(cluster_of(worker("a", 8), worker("b", 2)), Workload())

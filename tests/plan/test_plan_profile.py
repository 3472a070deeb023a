"""Profiles: JSON round trips, hand edits, interpolation, validation, HTML."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from plan_instances import random_instance

from bloombee_nb.plan import ClusterProfile, LinkProfile, ModelProfile, ProfileError, WorkerProfile, Workload
from bloombee_nb.plan.profile import interp_s
from bloombee_nb.plan.synthetic import random_cluster


@settings(max_examples=25, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1), n_workers=st.integers(1, 6), n_layers=st.integers(1, 20))
def test_cluster_json_round_trip(seed, n_workers, n_layers):
    cluster, workload = random_instance(seed, n_workers, n_layers)
    assert ClusterProfile.from_json(cluster.to_json()) == cluster
    assert Workload.from_json(workload.to_json()) == workload
    assert ModelProfile.from_json(cluster.model.to_json()) == cluster.model


def test_save_load_and_hand_edit(tmp_path):
    cluster = random_cluster(4, seed=3)
    path = cluster.save(tmp_path / "lab.json")
    assert ClusterProfile.load(path) == cluster
    d = json.loads(path.read_text())            # edit by hand: plain names, units in the names
    d["workers"][0]["decode_layer_s"] = {"1": 0.5, "8": 1.0}
    d["workers"][0]["include"] = False
    d["links"][0]["bandwidth_bytes_per_s"] = 1.25e6
    path.write_text(json.dumps(d))
    edited = ClusterProfile.load(path)
    assert edited.workers[0].decode_layer_s == {1: 0.5, 8: 1.0} and not edited.workers[0].include
    assert edited.links[0].bandwidth_bytes_per_s == 1.25e6


def test_edited_copies():
    cluster = random_cluster(3, seed=1)
    name = cluster.workers[1].name
    slower = cluster.with_worker(name, compute_speed_factor=0.5)
    assert slower.worker(name).decode_s(1) == 2 * cluster.worker(name).decode_s(1)
    assert cluster.worker(name).compute_speed_factor == 1.0                       # the original is unchanged
    faster = cluster.with_link("client", name, bandwidth_bytes_per_s=1e9)
    assert faster.link("client", name).bandwidth_bytes_per_s == 1e9
    assert faster.link(name, "client") == cluster.link(name, "client")
    cut = ClusterProfile(cluster.model, cluster.workers, tuple(ln for ln in cluster.links if ln.src != "client"))
    with pytest.raises(ProfileError, match="give bandwidth_bytes_per_s and rtt_s"):
        cut.with_link("client", name, rtt_s=0.01)
    added = cut.with_link("client", name, bandwidth_bytes_per_s=1e6, rtt_s=0.01)
    assert added.link("client", name) == LinkProfile("client", name, 1e6, 0.01)
    with pytest.raises(ProfileError, match="no worker named"):
        cluster.with_worker("nope", include=False)


def test_interpolation():
    pts = {1: 1.0, 4: 2.0, 16: 8.0}
    assert interp_s(pts, 1) == 1.0 and interp_s(pts, 0.5) == 1.0        # clamp below
    assert interp_s(pts, 2) == pytest.approx(1 + 1 / 3)                     # linear between
    assert interp_s(pts, 32) == pytest.approx(8 + 16 * 0.5)                 # last slope beyond
    assert interp_s({4: 2.0}, 8) == 4.0 and interp_s({4: 2.0}, 2) == 2.0    # one point: proportional above
    assert interp_s({1: 2.0, 8: 1.0}, 16) == 1.0                            # a falling slope is not extended
    w = WorkerProfile("w", "tcp://w:1", {1: 0.01, 16: 0.04})
    assert w.prefill_s(16) == w.decode_s(16)                                # no prefill measured: decode-as-batch


@pytest.mark.parametrize("bad, match", [
    (dict(decode_layer_s={}), "measure at least one batch size"),
    (dict(decode_layer_s={1: -1.0}), "must be > 0"),
    (dict(ram_bytes=-1), "must be >= 0"),
    (dict(decode_layer_s={"x": 1.0}), "must map integers"),
])
def test_worker_validation(bad, match):
    with pytest.raises(ProfileError, match=match):
        WorkerProfile(**{"name": "w", "address": "a", "decode_layer_s": {1: 0.1}, **bad})


def test_cluster_and_workload_validation():
    model = ModelProfile("m", 2, 10, 1, 1)
    w = WorkerProfile("w", "a", {1: 0.1})
    with pytest.raises(ProfileError, match="unknown participant"):
        ClusterProfile(model, (w,), (LinkProfile("client", "x", 1, 0),))
    with pytest.raises(ProfileError, match="unique"):
        ClusterProfile(model, (w, w), ())
    with pytest.raises(ProfileError, match="no field"):
        ModelProfile.from_dict({**model.to_dict(), "typo_bytes": 1})
    assert Workload(prompt_len=10, new_tokens=5).max_length == 15
    with pytest.raises(ProfileError, match="raise max_length"):
        Workload(prompt_len=10, new_tokens=5, max_length=12)
    with pytest.raises(ProfileError, match="objective"):
        Workload(objective="speed")


def test_model_sizes_from_a_config():
    # Llama-2-7B: 32 layers of 4096 hidden, 11008 MLP, 32 heads: 202.4M parameters per layer
    m = ModelProfile.for_decoder("llama-2-7b", 32, 4096, 11008, 32, 32, dtype_bytes=2)
    assert m.layer_weight_bytes == 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096)
    assert m.kv_bytes_per_token_per_layer == 2 * 4096 * 2 and m.hidden_bytes_per_token == 8192


def test_html():
    cluster = random_cluster(3, seed=0)
    html = cluster._repr_html_()
    assert "ClusterProfile" in html and cluster.workers[0].name in html and "Mbit/s" in html or "Gbit/s" in html
    assert "<table>" in cluster.workers[0]._repr_html_() and "<table>" in Workload()._repr_html_()

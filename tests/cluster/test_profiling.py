"""Profiles are measured on the real path: real layers on the workers, real frames on every link."""

import pytest

from bloombee_nb.cluster.profiling import DECODE_BATCHES, PREFILL_LENGTHS, profile_cluster
from bloombee_nb.plan.profile import ClusterProfile


@pytest.fixture(scope="module")
def profile(cluster, checkpoints):
    return profile_cluster(cluster, checkpoints["llama"], progress=False)


def test_every_worker_and_every_ordered_link_is_measured(profile, cluster):
    names = [str(w["name"]) for w in cluster.workers().values()]
    assert sorted(w.name for w in profile.workers) == sorted(names)
    pairs = {(link.src, link.dst) for link in profile.links}
    everyone = ["client", *names]
    assert pairs == {(a, b) for a in everyone for b in everyone if a != b}
    for link in profile.links:
        assert 1e-5 < link.rtt_s < 1.0 and link.bandwidth_bytes_per_s > 1e6  # loopback: ms and >1 MB/s
    for w in profile.workers:
        assert set(w.decode_layer_s) == set(DECODE_BATCHES) and set(w.prefill_layer_s) == set(PREFILL_LENGTHS)
        assert all(0 < t < 1 for t in [*w.decode_layer_s.values(), *w.prefill_layer_s.values()])
        assert w.ram_bytes > 0 and w.disk_bytes > 0 and w.disk_read_bytes_per_s > 1e6
    m = profile.model
    assert m.n_layers == 5 and m.hidden_bytes_per_token == 64 * 4
    assert m.kv_bytes_per_token_per_layer == 2 * 2 * 16 * 4 and m.layer_weight_bytes > 0


def test_profile_round_trips_and_can_be_edited(profile, tmp_path):
    path = profile.save(tmp_path / "profile.json")
    again = ClusterProfile.load(path)
    assert again == profile
    slow = again.with_link("client", profile.workers[0].name, bandwidth_bytes_per_s=1e6)
    assert slow.link("client", profile.workers[0].name).bandwidth_bytes_per_s == 1e6
    assert "<table" in profile._repr_html_()


def test_step_overhead_counts_what_a_step_costs_beyond_compute_and_rtt(cluster, checkpoints, monkeypatch):
    """The probe's timed region holds a client-side send delay (the link emulator's, 20 ms each way
    it sends) that is neither compute nor the RTT it is told: the overhead it measures must contain
    it. A lower bound on one clock: a loaded machine only adds to it. (The profile's own values are
    timings, clamped at 0; benchmarks/bench_plan_applied.py checks their predictions.)"""
    from bloombee_nb.cluster.profiling import measure_step_overhead
    from bloombee_nb.transport.emulation import ENV

    address = cluster.worker_addresses()[0]
    monkeypatch.setenv(ENV, "40")  # this process only: the client's sends are held 20 ms
    assert measure_step_overhead(cluster.client, address, checkpoints["llama"], 0.0, 64, "float32", repeats=5) >= 0.020


def test_chain_overhead_is_measured_on_a_real_chain_and_priced_for_the_chain_relay(profile):
    assert all(w.chain_step_overhead_s is not None for w in profile.workers)  # measured (a timing: not bounded here)
    chained = profile.priced_for_chain()
    assert [w.step_overhead_s for w in chained.workers] == [w.chain_step_overhead_s for w in profile.workers]
    assert chained.links == profile.links

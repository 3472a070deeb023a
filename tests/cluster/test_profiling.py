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


def test_step_overhead_is_measured(profile):
    # a real stage call costs something beyond compute and the probed RTT, but not absurdly much
    assert all(0 <= w.step_overhead_s < 0.05 for w in profile.workers)


def test_chain_overhead_is_measured_on_a_real_chain_and_priced_for_the_chain_relay(profile):
    assert all(w.chain_step_overhead_s is not None and 0 <= w.chain_step_overhead_s < 0.05 for w in profile.workers)
    chained = profile.priced_for_chain()
    assert [w.step_overhead_s for w in chained.workers] == [w.chain_step_overhead_s for w in profile.workers]
    assert chained.links == profile.links

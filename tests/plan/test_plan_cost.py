"""The cost model's formulas, on numbers small enough to check by hand."""

import numpy as np
import pytest

from bloombee_nb.plan import ModelProfile, WorkerProfile, Workload, cost

MIB = 2**20
MODEL = ModelProfile("m", 8, layer_weight_bytes=100 * MIB, kv_bytes_per_token_per_layer=MIB,
                     hidden_bytes_per_token=4096)


def gpu(**kw):
    return WorkerProfile("g", "tcp://g:1", {1: 0.01, 8: 0.02}, accel_bytes=300 * MIB, ram_bytes=200 * MIB,
                         disk_bytes=10_000 * MIB, ram_read_bytes_per_s=1e9, disk_read_bytes_per_s=1e8, **kw)


def test_transfer_convention():
    # one way: bytes / bandwidth + rtt / 2; the link is busy for bytes / bandwidth only
    assert cost.transfer_s(1e6, 1e7, 0.02) == pytest.approx(0.1 + 0.01)
    assert cost.link_busy_s(1e6, 1e7) == pytest.approx(0.1)
    assert cost.hop_bytes(MODEL, 3) == 3 * 4096


def test_compute_scales_with_layers_batch_and_speed():
    w = gpu()
    assert cost.decode_compute_s(w, 4, 1) == pytest.approx(0.04)
    assert cost.decode_compute_s(w, 4, 8) == pytest.approx(0.08)
    assert cost.decode_compute_s(gpu(compute_speed_factor=2.0), 4, 8) == pytest.approx(0.04)
    assert cost.prefill_compute_s(w, 2, prompt_len=8, micro_batch=3) == pytest.approx(2 * 3 * 0.02)


def test_memory_and_tiers():
    wl = Workload(batch=2, prompt_len=10, new_tokens=10)           # max_length 20
    assert cost.kv_bytes(MODEL, 3, 2, 20) == 3 * 2 * 20 * MIB
    t = cost.tier_bytes(gpu(), 400 * MIB, 100 * MIB, weight_offload=0.75, kv_offload=1.0)
    # 300 MiB of weights leave the GPU: 200 fill RAM first, 100 go to disk; all 100 of KV go to disk
    assert (t.weights_fast, t.weights_mid, t.weights_disk) == (100 * MIB, 200 * MIB, 100 * MIB)
    assert (t.kv_fast, t.kv_mid, t.kv_disk) == (0, 0, 100 * MIB)
    assert cost.fits(gpu(), t)
    assert not cost.fits(gpu(), cost.tier_bytes(gpu(), 400 * MIB, 0, 0.0, 0.0))   # 400 MiB > 300 MiB GPU
    cpu = WorkerProfile("c", "a", {1: 0.1}, ram_bytes=100 * MIB, disk_bytes=MIB)
    t = cost.tier_bytes(cpu, 100 * MIB, 0, 0.5, 0.0)                  # no accelerator: RAM is fast, spill to disk
    assert (t.weights_fast, t.weights_mid, t.weights_disk) == (50 * MIB, 0, 50 * MIB)
    assert not cost.fits(cpu, t)                                       # disk budget 1 MiB
    assert cost.min_bytes_for(MODEL, wl, 2) == 2 * (100 * MIB + 2 * 20 * MIB)


def test_offload_overlaps_compute():
    wl = Workload(batch=4, prompt_len=12, new_tokens=8)                # mean context 16, max_length 20
    assert cost.kv_read_fraction(wl, 2) == pytest.approx(0.5 * 16 / 20)
    w = gpu()
    sc = cost.stage_cost(w, MODEL, wl, 2, 1, weight_offload=0.5, kv_offload=0.0)
    # 100 MiB of weights read from RAM at 1 GB/s per step = 0.105 s, compute 2 × 0.01 s
    read = 100 * MIB / 1e9
    assert sc.compute_s == pytest.approx(0.02)
    assert sc.offload_s == pytest.approx(read - 0.02)                  # only what compute does not hide
    assert sc.total_s == pytest.approx(read)
    assert cost.offload_extra_s(0.01, 0.02) == 0.0


def test_array_friendly():
    w, wl = gpu(), Workload(batch=4)
    n, fr = np.arange(1, 9)[:, None], np.array([0.0, 0.5, 1.0])[None, :]
    table = cost.stage_cost(w, MODEL, wl, n, 4, fr, fr).total_s
    for i in range(8):
        for j in range(3):
            one = cost.stage_cost(w, MODEL, wl, i + 1, 4, float(fr[0, j]), float(fr[0, j])).total_s
            assert table[i, j] == one

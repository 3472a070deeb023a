"""Per-link codec choice: a pure function of measured numbers, and the calibration that feeds it."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloombee_nb import transport
from bloombee_nb.transport import RAW, Codec, CodecStats, break_even_bandwidth_Bps, calibrate, choose_codec

ZSTD = Codec("zstd", 1, "shuffle")
LZ4 = Codec("lz4", 5, "bitshuffle")

# A 1 MB frame: raw costs 0.1 ms of copies; zstd halves it for 3 ms, lz4 saves 20% for 0.5 ms.
RAW_S = CodecStats(RAW, 1_000_000, 1_000_048, 50e-6, 50e-6)
ZSTD_S = CodecStats(ZSTD, 1_000_000, 500_060, 2e-3, 1e-3)
LZ4_S = CodecStats(LZ4, 1_000_000, 800_060, 0.3e-3, 0.3e-3)


def test_break_even_is_saved_bytes_over_extra_time():
    be = break_even_bandwidth_Bps(ZSTD_S, RAW_S)
    assert be == pytest.approx((1_000_048 - 500_060) / (3e-3 - 100e-6))
    assert ZSTD_S.time_s(be) == pytest.approx(RAW_S.time_s(be))  # the two lines cross there


@pytest.mark.parametrize("cand", [ZSTD_S, LZ4_S])
def test_decision_flips_at_the_break_even(cand):
    be = break_even_bandwidth_Bps(cand, RAW_S)
    assert choose_codec([RAW_S, cand], be * 0.99) == cand.codec
    assert choose_codec([RAW_S, cand], be * 1.01) == RAW


def test_raw_on_fast_links_compression_on_slow_ones():
    stats = [RAW_S, ZSTD_S, LZ4_S]
    assert choose_codec(stats, 2 * 2**30) == RAW  # loopback, ~2 GiB/s
    assert choose_codec(stats, 12.5e6 / 8) == ZSTD  # 12.5 Mbit/s: the best ratio wins
    # in between, the cheap codec wins where zstd's extra time is not yet worth its extra bytes
    lz4_vs_zstd = (LZ4_S.wire_nbytes - ZSTD_S.wire_nbytes) / (3e-3 - 0.6e-3)
    assert choose_codec(stats, lz4_vs_zstd * 1.05) == LZ4
    assert choose_codec(stats, lz4_vs_zstd * 0.95) == ZSTD


def test_edge_cases():
    bigger = CodecStats(LZ4, 1_000_000, 1_000_100, 1e-3, 1e-3)
    free = CodecStats(ZSTD, 1_000_000, 900_000, 10e-6, 10e-6)
    assert break_even_bandwidth_Bps(bigger, RAW_S) == 0.0  # never pays
    assert break_even_bandwidth_Bps(free, RAW_S) == math.inf  # always pays
    assert choose_codec([RAW_S, bigger], 1.0) == RAW
    assert choose_codec([RAW_S, free], 1e15) == ZSTD
    with pytest.raises(ValueError, match="raw"):
        choose_codec([ZSTD_S], 1e6)
    with pytest.raises(ValueError, match="positive"):
        choose_codec([RAW_S], 0)


def test_margin_keeps_raw_when_the_gain_is_marginal():
    be = break_even_bandwidth_Bps(ZSTD_S, RAW_S)
    assert choose_codec([RAW_S, ZSTD_S], be * 0.97) == ZSTD
    assert choose_codec([RAW_S, ZSTD_S], be * 0.97, margin=0.05) == RAW


stat = st.builds(
    lambda c, w, e, d: CodecStats(c, 10**6, w, e, d),
    st.sampled_from([ZSTD, LZ4, Codec("zstd", 1, "none", "high")]),
    st.integers(10**5, 2 * 10**6), st.floats(1e-6, 1e-1), st.floats(1e-6, 1e-1))


@settings(max_examples=200, deadline=None)
@given(st.lists(stat, min_size=1, max_size=4), st.floats(1e3, 1e11))
def test_choice_is_the_argmin_of_total_time(cands, bw):
    stats = [RAW_S, *cands]
    chosen = choose_codec(stats, bw)
    best = min(s.time_s(bw) for s in stats)
    assert min(s.time_s(bw) for s in stats if s.codec == chosen) == best


def test_calibrate_on_a_bf16_activation():
    g = torch.Generator().manual_seed(0)
    sample = (torch.randn(4, 64, 256, generator=g) * 3).to(torch.bfloat16)  # exponents compress
    stats = calibrate(sample, [LZ4, ZSTD, ZSTD], repeats=3)
    assert [s.codec for s in stats] == [RAW, LZ4, ZSTD]  # raw always measured, duplicates dropped
    by = {s.codec: s for s in stats}
    assert by[ZSTD].ratio > 1.3 and by[RAW].ratio < 1.0
    assert all(s.encode_s > 0 and s.decode_s > 0 for s in stats)
    assert choose_codec(stats, 1e11) == RAW  # far faster than any codec: never compress
    assert choose_codec(stats, 1e5) == ZSTD  # 100 kB/s: the best ratio wins
    frame = transport.encode(sample, choose_codec(stats, 1e5))
    assert len(frame) == by[ZSTD].wire_nbytes


# A 10 KB (decode-sized) frame: fixed per-call costs eat the gain; the same link still compresses 1 MB.
SMALL = (CodecStats(RAW, 10_000, 10_048, 2e-6, 2e-6), CodecStats(ZSTD, 10_000, 8_060, 60e-6, 40e-6))
LARGE = (RAW_S, ZSTD_S, LZ4_S)


def test_policy_chooses_per_frame_size_for_the_link():
    link = 20e6  # 20 MB/s: zstd on 1 MB saves 25 ms for 3 ms; on 10 KB saves 0.1 ms for 0.1 ms (margin: raw)
    policy = transport.CodecPolicy.choose([LARGE, SMALL], link)  # order of sizes does not matter
    assert policy.codec_for(10_000) == RAW and policy.codec_for(1_000_000) == ZSTD
    assert policy.codec_for(100_001) == ZSTD and policy.codec_for(100_000) == RAW  # switch at sqrt(1e4 * 1e6)
    assert policy.codec_for(10 ** 12) == ZSTD and policy.bandwidth_Bps == link
    fast = transport.CodecPolicy.choose([SMALL, LARGE], 10e9)
    assert fast.classes == ((math.inf, RAW),) and str(fast) == "raw"


def test_policy_round_trips_as_a_dict_and_fixed_keeps_small_frames_raw():
    policy = transport.CodecPolicy.fixed(ZSTD, 64 << 10)
    assert policy.codec_for((64 << 10) - 1) == RAW and policy.codec_for(64 << 10) == ZSTD
    assert transport.CodecPolicy.from_dict(policy.to_dict()) == policy
    assert "zstd-1+shuffle ≥64 KiB" in str(policy)
    chosen = transport.CodecPolicy.choose([SMALL, LARGE], 20e6)
    assert transport.CodecPolicy.from_dict(chosen.to_dict()) == chosen


def test_calibrate_sizes_measures_growing_frames_of_a_real_sample():
    sample = torch.randn(8, 64, dtype=torch.bfloat16)
    stats = transport.calibrate_sizes(sample, rows=(1, 8, 64), repeats=1)
    assert [st[0].raw_nbytes for st in stats] == [128, 1024, 8192]  # rows repeated past the sample's 8
    assert all(s.codec in (RAW, *transport.DEFAULT_CANDIDATES) for st in stats for s in st)


def test_policy_keeps_the_smaller_sizes_codec_on_near_ties():
    small = (CodecStats(RAW, 100_000, 100_048, 5e-6, 5e-6), CodecStats(LZ4, 100_000, 50_060, 30e-6, 30e-6),
             CodecStats(ZSTD, 100_000, 60_060, 200e-6, 100e-6))          # lz4 best on 100 KB frames
    close = (RAW_S, ZSTD_S, CodecStats(LZ4, 1_000_000, 520_060, 2.0e-3, 0.9e-3))  # zstd best by 4% on 1 MB
    policy = transport.CodecPolicy.choose([small, close], 1e6)
    assert policy.classes == ((math.inf, LZ4),), policy                      # no flip on a near tie
    clear = (RAW_S, ZSTD_S, CodecStats(LZ4, 1_000_000, 800_060, 0.3e-3, 0.3e-3))   # zstd best by 37%
    assert transport.CodecPolicy.choose([small, clear], 1e6).codec_for(1_000_000) == ZSTD

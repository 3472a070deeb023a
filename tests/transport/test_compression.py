"""Compressed frames: bit-exact for every codec choice, and a decoder that trusts nothing."""

import itertools
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bloombee_nb import transport
from bloombee_nb.errors import FrameError
from bloombee_nb.transport.codec import COMPRESSORS, FILTERS, PLANES, Codec
from bloombee_nb.transport.frame import read_header

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def valid_codecs(level=1):
    for name, filt, planes in itertools.product(COMPRESSORS, FILTERS, PLANES):
        if planes != "none" and filt in ("shuffle", "bytedelta"):
            continue
        yield Codec(name, level, filt, planes)


ALL_CODECS = list(valid_codecs())


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def hidden_like(shape, dtype, seed=0):
    """Activation-like values (a few binades, outlier channels) plus NaN/Inf/-0.0/subnormals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-1, 1, shape[-1] if shape else 1)
    flat = x.reshape(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -6e-8, 65504.0])
    flat[: min(len(specials), flat.numel())] = specials[: flat.numel()]
    x = x.to(dtype)
    if dtype == torch.float32 and x.numel():
        x.view(torch.int32).reshape(-1)[-1] = 0x7FC00123  # a NaN carrying a payload
    return x


def reseal(frame: bytes | bytearray) -> bytes:
    """Recompute a compressed frame's CRC (header length from its ndim byte), so a tampered
    frame gets past the checksum and reaches the size checks and blosc2 itself."""
    n = 8 + 8 * frame[6] + 16 + 12 if len(frame) > 6 else len(frame) + 1
    if n > len(frame):
        return bytes(frame)
    crc = zlib.crc32(bytes(frame[n:]), zlib.crc32(bytes(frame[: n - 4])))
    return bytes(frame[: n - 4]) + struct.pack("<I", crc) + bytes(frame[n:])


@pytest.mark.parametrize("codec", ALL_CODECS, ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_every_codec_roundtrips_bit_exactly(codec, dtype):
    for shape in [(2, 5, 33), (1, 1, 7), (3,), (), (0, 4), (2, 0, 3)]:
        t = hidden_like(shape, dtype)
        frame = transport.encode(t, codec)
        out = transport.decode(frame)
        assert out.dtype == dtype and out.shape == t.shape, (codec, shape)
        assert torch.equal(bits(out), bits(t)), (codec, shape)
        assert read_header(frame).compression == codec


@pytest.mark.parametrize("level", [1, 5, 9])
@pytest.mark.parametrize("name", list(COMPRESSORS))
def test_levels_roundtrip_and_are_recorded(name, level):
    t = hidden_like((4, 3, 64), torch.bfloat16)
    codec = Codec(name, level, "shuffle")
    frame = transport.encode(t, codec)
    assert read_header(frame).compression == codec
    assert torch.equal(bits(transport.decode(frame)), bits(t))


def test_compression_actually_shrinks_activations():
    t = hidden_like((4, 64, 256), torch.bfloat16)
    raw = len(transport.encode(t))
    assert len(transport.encode(t, "zstd-1+shuffle")) < 0.8 * raw
    assert len(transport.encode(t, "zstd-1+hiplane")) < 0.8 * raw


def test_non_contiguous_and_integer_dtypes():
    t = hidden_like((8, 16, 33), torch.float16).transpose(0, 2)
    for dt in (torch.int64, torch.int32, torch.bool, torch.uint8, torch.int8, torch.float64):
        x = (torch.randn(5, 7) * 50).to(dt)
        assert torch.equal(transport.decode(transport.encode(x, "lz4-5+bitshuffle+hiplane")), x)
    assert torch.equal(bits(transport.decode(transport.encode(t, "zstd-1+planes"))), bits(t))


@pytest.mark.parametrize("codec", ["zstd-1+shuffle", "lz4-1+bitshuffle+hiplane", "zstd-1+planes"])
def test_large_tensor_spans_several_chunks(codec):
    t = hidden_like((6, 1024, 1024), torch.float32)  # 24 MiB: two 16 MiB chunks
    frame = transport.encode(t, codec)
    assert torch.equal(bits(transport.decode(frame)), bits(t))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(list(valid_codecs(1)) + list(valid_codecs(9))),
    dtype=st.sampled_from(FLOATS),
    shape=st.lists(st.integers(0, 9), max_size=4),
    seed=st.integers(0, 2**31 - 1),
    chunk_elems=st.integers(1, 64),
)
def test_random_bit_patterns_roundtrip(codec, dtype, shape, seed, chunk_elems):
    # Arbitrary bit patterns: every NaN payload, subnormal and signed zero the dtype can hold.
    n = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(seed)
    raw = torch.from_numpy(rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8))
    t = raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    out = transport.decode(transport.encode(t, codec, chunk_nbytes=chunk_elems * 8))  # many tiny chunks
    assert torch.equal(bits(out), bits(t))


# --- a decoder that trusts nothing -------------------------------------------------------------

def small_frame(codec="zstd-1+shuffle", dtype=torch.bfloat16, shape=(2, 3, 40), **kw):
    return transport.encode(hidden_like(shape, dtype), codec, **kw)


@pytest.mark.parametrize("codec", ["zstd-1+shuffle", "lz4-5+bitshuffle+hiplane", "zstd-1+planes"])
def test_every_truncation_raises(codec):
    frame = small_frame(codec)
    for n in range(len(frame)):
        with pytest.raises(FrameError):
            transport.decode(frame[:n])
    with pytest.raises(FrameError, match="padded"):
        transport.decode(frame + b"\0")


@pytest.mark.parametrize("codec", ["zstd-1+shuffle", "lz4-5+bitshuffle+hiplane"])
def test_every_single_byte_corruption_raises(codec):
    frame = small_frame(codec, shape=(2, 20))
    for pos in range(len(frame)):
        for delta in (1, 0x80):
            bad = bytearray(frame)
            bad[pos] ^= delta
            with pytest.raises(FrameError):
                transport.decode(bytes(bad))


def test_corrupted_payload_names_the_crc():
    frame = bytearray(small_frame())
    frame[-3] ^= 0xFF
    with pytest.raises(FrameError, match="CRC32"):
        transport.decode(bytes(frame))


def block_offset(frame):
    f = read_header(frame)
    return f.header_nbytes - 12, f.header_nbytes  # codec block, first chunk


@pytest.mark.parametrize("field, value, match", [
    (0, 3, "unknown blosc2 compressor"),  # compressor id 3 does not exist
    (1, 0, "invalid codec"),  # level 0
    (1, 10, "invalid codec"),
    (2, 9, "unknown filter"),
    (3, 7, "planes code"),
])
def test_lying_codec_block_raises(field, value, match):
    frame = bytearray(small_frame())
    blk, _ = block_offset(bytes(frame))
    frame[blk + field] = value
    with pytest.raises(FrameError, match=match):
        transport.decode(reseal(frame))


def test_lying_chunk_size_raises():
    frame = bytearray(small_frame())
    blk, _ = block_offset(bytes(frame))
    for chunk, match in [(0, "chunk size"), (2**31, "chunk size"), (8, "cannot hold|claims")]:
        frame[blk + 4: blk + 8] = struct.pack("<I", chunk)
        with pytest.raises(FrameError, match=match):
            transport.decode(reseal(frame))


def test_planes_field_flip_is_caught_by_sizes():
    frame = bytearray(small_frame("zstd-1+hiplane"))
    blk, _ = block_offset(bytes(frame))
    frame[blk + 3] = 0  # claim the whole tensor went through blosc2
    with pytest.raises(FrameError, match="claims|stray|cannot hold"):
        transport.decode(reseal(frame))


@pytest.mark.parametrize("offset, value, match", [
    (4, 10**9, "claims 1000000000 bytes"),  # chunk nbytes (decompressed size) lies: would overflow
    (4, 1, "claims 1 bytes"),
    (12, 10**6, "compressed bytes"),  # cbytes beyond the payload
    (12, 5, "compressed bytes"),
])
def test_lying_chunk_header_raises_before_blosc2_runs(offset, value, match):
    frame = bytearray(small_frame())
    _, c0 = block_offset(bytes(frame))
    frame[c0 + offset: c0 + offset + 4] = struct.pack("<i", value)
    with pytest.raises(FrameError, match=match):
        transport.decode(reseal(frame))


def test_lazy_chunk_flag_is_refused():
    frame = bytearray(small_frame())
    _, c0 = block_offset(bytes(frame))
    frame[c0 + 31] |= 0x08
    with pytest.raises(FrameError, match="lazy"):
        transport.decode(reseal(frame))


def test_absurd_compressed_frame_is_refused_before_allocating():
    frame = bytearray(small_frame(shape=(2, 3)))
    struct.pack_into("<QQQ", frame, 8, 10**6, 10**6, 2 * 10**12)  # shape and raw_nbytes agree: 2 TB
    with pytest.raises(FrameError, match="limit"):
        transport.decode(reseal(frame))


def test_zero_size_frames_must_have_empty_payload():
    frame = transport.encode(torch.empty(0, 3, dtype=torch.bfloat16), "zstd-1+shuffle")
    assert read_header(frame).payload_nbytes == 0
    assert transport.decode(frame).shape == (0, 3)
    with pytest.raises(FrameError, match="padded"):
        transport.decode(frame + b"x")
    stuffed = bytearray(frame + b"12345")
    struct.pack_into("<Q", stuffed, 8 + 16 + 8, 5)  # payload_nbytes after a 2-d shape and raw_nbytes
    with pytest.raises(FrameError, match="empty tensor"):
        transport.decode(reseal(stuffed))


def test_encode_rejects_bad_codecs():
    t = torch.zeros(3)
    for bad in [1, 9, "zstd", "zstd-0", "snappy-1", "zstd-1+shuffle+planes", "zstd-1+sparkle", True]:
        with pytest.raises(FrameError):
            transport.encode(t, bad)
    with pytest.raises(ValueError):
        Codec("raw", 1)


def test_labels_parse_back():
    for c in [*ALL_CODECS, *valid_codecs(7), Codec()]:
        assert Codec.parse(str(c)) == c


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    codec=st.sampled_from(["zstd-1+shuffle", "lz4-5+bitshuffle", "zstd-1+hiplane", "lz4-1+planes",
                           "zlib-1+bytedelta", "blosclz-5+shuffle", "lz4hc-1+bitshuffle+planes"]),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 10**6),
    do_cut=st.booleans(),
    do_reseal=st.booleans(),
)
def test_fuzz_compressed_frames_never_crash(codec, edits, cut, do_cut, do_reseal):
    frame = bytearray(small_frame(codec, shape=(3, 50), chunk_nbytes=64))
    for pos, val in edits:
        frame[pos % len(frame)] = val
    if do_cut:
        del frame[cut % len(frame):]
    buf = bytes(frame)
    if do_reseal:  # make the CRC agree so the damage reaches blosc2 itself
        buf = reseal(buf)
    try:
        out = transport.decode(buf)
    except FrameError:
        return
    f = read_header(buf)
    assert out.shape == f.shape and out.numel() * out.element_size() == f.raw_nbytes

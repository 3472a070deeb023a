import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloombee_nb import transport
from bloombee_nb.errors import FrameError
from bloombee_nb.transport.frame import read_header


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 7, 5), (2, 0, 4), (), (1, 1, 1, 1, 1, 1, 1, 1)])
def test_roundtrip_is_bit_exact(dtype, shape):
    t = (torch.randn(shape) * 100).to(dtype)
    out = transport.decode(transport.encode(t))
    assert out.dtype == dtype and out.shape == t.shape
    assert torch.equal(bits(out), bits(t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nan_inf_and_signed_zero_survive(dtype):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45], dtype=torch.float32).to(dtype)
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # a NaN with a payload
    if dtype == torch.float32:
        t = torch.cat([t, nan_payload])
    assert torch.equal(bits(transport.decode(transport.encode(t))), bits(t))


def test_non_contiguous_and_large_tensor():
    t = torch.randn(64, 1024, 33).transpose(0, 2)  # 8.6 MB, strided
    assert torch.equal(transport.decode(transport.encode(t)), t)


def header(codec=0, dtype=0, shape=(2, 3), raw=None, payload=None):
    raw = 4 * 2 * 3 if raw is None else raw
    payload = raw if payload is None else payload
    return struct.pack("<4sBBBB", b"BBF1", codec, dtype, len(shape), 0) + b"".join(
        struct.pack("<Q", s) for s in shape) + struct.pack("<QQ", raw, payload)


@pytest.mark.parametrize("buf, match", [
    (b"", "shorter than"),
    (b"XXXX" + bytes(40), "not a bloombee frame"),
    (header(codec=9) + bytes(24), "unknown codec"),
    (header(dtype=200) + bytes(24), "unknown dtype"),
    (header(shape=(1,) * 9), "dimensions"),
    (header(raw=25) + bytes(25), "header lies"),
    (header() + bytes(10), "truncated"),
    (header() + bytes(30), "padded"),
    (header(shape=(10**6, 10**6), raw=4 * 10**12), "limit"),
    (header()[:20], "truncated inside its header"),
])
def test_lying_frames_raise_typed_errors(buf, match):
    with pytest.raises(FrameError, match=match):
        transport.decode(buf)


def test_absurd_shape_is_refused_before_allocating():
    # 10^12 elements: the check must happen on the header alone
    with pytest.raises(FrameError, match="limit"):
        read_header(header(shape=(10**12,), raw=4 * 10**12))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_never_crash(buf):
    try:
        out = transport.decode(buf)
    except FrameError:
        return
    assert isinstance(out, torch.Tensor)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(0, 255))
def test_fuzz_single_byte_corruption(pos, value):
    frame = bytearray(transport.encode(torch.arange(6, dtype=torch.float32).reshape(2, 3)))
    frame[pos % len(frame)] = value
    try:
        out = transport.decode(bytes(frame))
    except FrameError:
        return
    assert out.numel() * out.element_size() == 24  # a payload flip decodes; a header flip is caught

"""Frames: how a tensor crosses a process boundary.

Layout (little endian)::

    magic  b"BBF1"            4 bytes
    codec  u8                 0 = raw; the compression issue adds blosc2 codecs here
    dtype  u8                 index into DTYPES
    ndim   u8                 0..MAX_NDIM
    pad    u8
    shape  ndim * u64
    raw_nbytes      u64       bytes of the decoded tensor = prod(shape) * itemsize
    payload_nbytes  u64       bytes that follow the header (== raw_nbytes for codec 0)
    payload

The decoder trusts nothing: every size is checked against the others and against a ceiling
*before* any allocation, so a header that lies cannot make a stage allocate 10^12 elements.
bf16 travels as its raw 2-byte pattern (no numpy round trip), so every dtype is bit-exact.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from ..errors import FrameError

MAGIC = b"BBF1"
MAX_NDIM = 8
#: Largest decoded tensor a frame may describe (bytes). Raise it per call for huge tensors.
DEFAULT_MAX_BYTES = 4 << 30

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.float64,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
#: codec id -> name. Only "raw" exists yet; the codec slot is part of every header.
CODECS: dict[int, str] = {0: "raw"}

_HEAD = struct.Struct("<4sBBBB")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Frame:
    """A decoded header: what a frame claims to hold."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: int
    raw_nbytes: int
    payload_nbytes: int
    header_nbytes: int


def encode(tensor: torch.Tensor, codec: int = 0) -> bytes:
    """Tensor -> frame bytes. The tensor's memory is copied once into the frame."""
    if codec not in CODECS:
        raise FrameError(f"unknown codec {codec}; known: {CODECS}")
    if tensor.dtype not in _DTYPE_CODE:
        raise FrameError(f"dtype {tensor.dtype} cannot be framed; supported: {list(_DTYPE_CODE)}")
    if tensor.dim() > MAX_NDIM:
        raise FrameError(f"{tensor.dim()}-d tensor: frames hold at most {MAX_NDIM} dimensions")
    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    header = _HEAD.pack(MAGIC, codec, _DTYPE_CODE[t.dtype], t.dim(), 0)
    header += b"".join(_U64.pack(s) for s in t.shape)
    header += _U64.pack(len(raw)) + _U64.pack(len(raw))
    return header + raw


def read_header(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Frame:
    """Parse and validate a frame header without touching (or allocating for) the payload."""
    mv = memoryview(buf)
    if len(mv) < _HEAD.size:
        raise FrameError(f"frame of {len(mv)} bytes is shorter than the {_HEAD.size}-byte header")
    magic, codec, dtype_code, ndim, _ = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC:
        raise FrameError(f"not a bloombee frame (magic {bytes(magic)!r}); was it sent by another program?")
    if codec not in CODECS:
        raise FrameError(f"frame uses unknown codec {codec}; this build knows {CODECS} — upgrade the receiver")
    if dtype_code >= len(DTYPES):
        raise FrameError(f"frame has unknown dtype code {dtype_code}")
    if ndim > MAX_NDIM:
        raise FrameError(f"frame claims {ndim} dimensions; at most {MAX_NDIM} are allowed")
    need = _HEAD.size + 8 * ndim + 16
    if len(mv) < need:
        raise FrameError(f"frame truncated inside its header ({len(mv)} < {need} bytes)")
    shape = tuple(_U64.unpack_from(mv, _HEAD.size + 8 * i)[0] for i in range(ndim))
    raw_nbytes = _U64.unpack_from(mv, need - 16)[0]
    payload_nbytes = _U64.unpack_from(mv, need - 8)[0]
    dtype = DTYPES[dtype_code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if expected != raw_nbytes:
        raise FrameError(f"frame header lies: shape {shape} of {dtype} is {expected} bytes, header says {raw_nbytes}")
    if raw_nbytes > max_bytes:
        raise FrameError(
            f"frame describes {raw_nbytes} bytes, above the {max_bytes}-byte limit; "
            "split the batch or raise max_bytes if this is intended")
    if len(mv) - need != payload_nbytes:
        raise FrameError(f"frame payload is {len(mv) - need} bytes, header says {payload_nbytes} (truncated or padded)")
    if codec == 0 and payload_nbytes != raw_nbytes:
        raise FrameError(f"raw frame payload {payload_nbytes} bytes != tensor size {raw_nbytes}")
    return Frame(dtype, shape, codec, raw_nbytes, payload_nbytes, need)


def decode(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> torch.Tensor:
    """Frame bytes -> a new tensor that owns its memory (bit-identical to the encoded one)."""
    f = read_header(buf, max_bytes)
    if f.raw_nbytes == 0:
        return torch.empty(f.shape, dtype=f.dtype)
    payload = bytearray(memoryview(buf)[f.header_nbytes:])  # writable copy the tensor can own
    return torch.frombuffer(payload, dtype=torch.uint8).view(f.dtype).reshape(f.shape)

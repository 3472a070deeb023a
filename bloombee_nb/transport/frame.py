"""Frames: how a tensor crosses a process boundary.

Layout (little endian)::

    magic  b"BBF1"            4 bytes
    codec  u8                 0 = raw, 1 = blosc2 (parameters in the codec block below)
    dtype  u8                 index into DTYPES
    ndim   u8                 0..MAX_NDIM
    pad    u8
    shape  ndim * u64
    raw_nbytes      u64       bytes of the decoded tensor = prod(shape) * itemsize
    payload_nbytes  u64       bytes that follow the header (== raw_nbytes for codec 0)
    -- codec 1 only: the codec block, 12 bytes (see codec.py) --
    compressor      u8        blosc2 codec id: 0 blosclz, 1 lz4, 2 lz4hc, 4 zlib, 5 zstd
    level           u8        blosc2 clevel 1..9
    filter          u8        0 none, 1 shuffle, 2 bitshuffle, 3 shuffle+bytedelta
    planes          u8        0 none, 1 all byte planes, 2 high plane only (low planes raw)
    chunk_nbytes    u32       raw bytes of the compressed stream per blosc2 chunk (last one shorter)
    crc32           u32       zlib.crc32 of every header byte before this field, then the payload
    payload                   codec 0: the tensor bytes. codec 1: ceil(stream/chunk_nbytes) blosc2
                              chunks back to back, then (planes=high) the low planes uncompressed,
                              where stream = raw_nbytes, or raw_nbytes/itemsize for planes=high
                              (an empty tensor has no chunks and an empty payload)

The decoder trusts nothing: every size is checked against the others and against a ceiling
*before* any allocation, so a header that lies cannot make a stage allocate 10^12 elements.
bf16 travels as its raw 2-byte pattern (no numpy round trip), so every dtype is bit-exact.

A compressed frame is checked in this order, all before blosc2 sees a byte: header sizes and codec
fields, payload length against the chunk count, the CRC, then each chunk header's promised size
against the size the frame header implies. The decoded size is therefore always raw_nbytes, which
max_bytes bounds; a truncated, corrupted or lying frame raises FrameError. Choosing a codec per
link is ``choice.py``'s job; the codecs themselves are in ``codec.py``.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FrameError
from . import codec as _codec
from .codec import BLOSC_HEADER_NBYTES, CODEC_BLOCK, DEFAULT_CHUNK_NBYTES, RAW, Codec, as_codec

MAGIC = b"BBF1"
MAX_NDIM = 8
#: Largest decoded tensor a frame may describe (bytes). Raise it per call for huge tensors.
DEFAULT_MAX_BYTES = 4 << 30

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool,
    torch.uint8, torch.int8, torch.int16, torch.float64,
)
_DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}
#: codec id -> name. blosc2's own parameters follow in the header's codec block.
CODECS: dict[int, str] = {0: "raw", 1: "blosc2"}

_HEAD = struct.Struct("<4sBBBB")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class Frame:
    """A decoded header: what a frame claims to hold."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    codec: int  # 0 raw, 1 blosc2
    raw_nbytes: int
    payload_nbytes: int
    header_nbytes: int
    compression: Codec = RAW  # the full codec choice (RAW for codec 0)
    chunk_nbytes: int = 0  # blosc2 chunk size of the compressed stream (0 for raw)
    crc32: int = 0  # checksum of header prefix + payload (compressed frames only)


def _prefix(codec_id: int, t: torch.Tensor, raw_nbytes: int, payload_nbytes: int) -> bytes:
    return (_HEAD.pack(MAGIC, codec_id, _DTYPE_CODE[t.dtype], t.dim(), 0)
            + b"".join(_U64.pack(s) for s in t.shape) + _U64.pack(raw_nbytes) + _U64.pack(payload_nbytes))


def encode(tensor: torch.Tensor, codec: Codec | str | int = 0, *, chunk_nbytes: int = DEFAULT_CHUNK_NBYTES,
           nthreads: int = 1, min_compress_bytes: int = 0) -> bytes:
    """Tensor -> frame bytes, raw (``codec=0``, the default) or compressed losslessly.

    ``codec`` is 0, a :class:`~bloombee_nb.transport.codec.Codec` or its label
    (``"zstd-1+shuffle"``); see ``choice.py`` for picking one per link. ``nthreads`` is blosc2's.
    Tensors smaller than ``min_compress_bytes`` go raw (headers outweigh the gain on tiny frames).
    """
    c = as_codec(0 if tensor.numel() * tensor.element_size() < min_compress_bytes else codec)
    if tensor.dtype not in _DTYPE_CODE:
        raise FrameError(f"dtype {tensor.dtype} cannot be framed; supported: {list(_DTYPE_CODE)}")
    if tensor.dim() > MAX_NDIM:
        raise FrameError(f"{tensor.dim()}-d tensor: frames hold at most {MAX_NDIM} dimensions")
    if not 1 <= chunk_nbytes <= _codec.MAX_CHUNK_NBYTES:
        raise FrameError(f"chunk_nbytes must be in 1..{_codec.MAX_CHUNK_NBYTES}, got {chunk_nbytes}")
    t = tensor.detach().to("cpu").contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)  # no copy
    if c.is_raw:
        return b"".join((_prefix(0, t, raw.size, raw.size), raw))  # the one copy
    parts = _codec.compress(raw, t.element_size(), c, chunk_nbytes, nthreads) if raw.size else []
    head = _prefix(1, t, raw.size, sum(len(p) for p in parts)) + _codec.pack_codec_block(c, chunk_nbytes)[:-4]
    return b"".join((head, _U32.pack(_codec.crc32(head, *parts)), *parts))


def read_header(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES) -> Frame:
    """Parse and validate a frame header without touching (or allocating for) the payload."""
    # Long: one linear pass over untrusted bytes, each check in the order the header is read, so
    # every read is visibly preceded by the check that keeps it in bounds.
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
    sizes_end = _HEAD.size + 8 * ndim + 16
    need = sizes_end + (CODEC_BLOCK.size if codec == 1 else 0)
    if len(mv) < need:
        raise FrameError(f"frame truncated inside its header ({len(mv)} < {need} bytes)")
    shape = tuple(_U64.unpack_from(mv, _HEAD.size + 8 * i)[0] for i in range(ndim))
    raw_nbytes = _U64.unpack_from(mv, sizes_end - 16)[0]
    payload_nbytes = _U64.unpack_from(mv, sizes_end - 8)[0]
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
    if codec == 0:
        if payload_nbytes != raw_nbytes:
            raise FrameError(f"raw frame payload {payload_nbytes} bytes != tensor size {raw_nbytes}")
        return Frame(dtype, shape, codec, raw_nbytes, payload_nbytes, need)
    c, chunk_nbytes, crc = _codec.unpack_codec_block(mv, sizes_end)
    if raw_nbytes == 0 and payload_nbytes:
        raise FrameError(f"compressed frame of an empty tensor carries {payload_nbytes} payload bytes")
    stream = _codec.stream_nbytes(raw_nbytes, dtype.itemsize, c.planes)
    floor = _codec.n_chunks(stream, chunk_nbytes) * BLOSC_HEADER_NBYTES + (raw_nbytes - stream)
    if payload_nbytes < floor:
        raise FrameError(f"compressed frame payload of {payload_nbytes} bytes cannot hold its "
                         f"{_codec.n_chunks(stream, chunk_nbytes)} chunks (at least {floor} bytes): truncated or lying")
    return Frame(dtype, shape, codec, raw_nbytes, payload_nbytes, need, c, chunk_nbytes, crc)


def decode(buf: bytes | memoryview, max_bytes: int = DEFAULT_MAX_BYTES, *, nthreads: int = 1) -> torch.Tensor:
    """Frame bytes -> a new tensor that owns its memory (bit-identical to the encoded one)."""
    f = read_header(buf, max_bytes)
    mv = memoryview(buf)
    if f.codec == 1:
        got = _codec.crc32(mv[:f.header_nbytes - 4], mv[f.header_nbytes:])
        if got != f.crc32:
            raise FrameError(f"compressed frame failed its CRC32 check (0x{got:08x} != 0x{f.crc32:08x}): "
                             "corrupted or truncated in transit; resend it")
    if f.raw_nbytes == 0:
        return torch.empty(f.shape, dtype=f.dtype)
    if f.codec == 0:
        payload = bytearray(mv[f.header_nbytes:])  # writable copy the tensor can own
    else:
        payload = _codec.decompress(mv[f.header_nbytes:], f.raw_nbytes, f.dtype.itemsize, f.compression,
                                    f.chunk_nbytes, nthreads)
    return torch.frombuffer(payload, dtype=torch.uint8).view(f.dtype).reshape(f.shape)

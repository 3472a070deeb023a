"""Where an offloaded tensor's bytes are in a safetensors file, and reading them off the disk.

The weight streamer (``offload_weights.py``) reads each offloaded layer every step with one
``preadv`` per run of adjacent tensors, straight into its buffers, so it needs each tensor's byte
offset in its file. The ``safetensors`` library gives names in file order (``offset_keys``),
dtypes and shapes (``get_slice``), but never the offsets: its maintainers declined to expose them
(github.com/safetensors/safetensors issues #569 and #576: "the raw offsets are never given to
users"). What it does guarantee is enough: :func:`stored_tensors` opens every file with
``safe_open``, which rejects a header whose tensors do not tile the data buffer in offset order,
without holes, up to the end of the file ("invalid offset", "file not fully covered"). So a
tensor starts at ``file size - all tensors' bytes + the bytes of the tensors before it`` — no
header parsing of our own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointNotFoundError, UnsupportedArchitectureError
from .checkpoint import ensure_files

#: The largest page-cache folio (a PMD on x86-64): page-cache drops are aligned to it.
FOLIO_BYTES = 2 << 20


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes are in a safetensors file."""

    file: str
    offset: int          # from the start of the file
    nbytes: int
    dtype: torch.dtype   # as stored
    shape: tuple[int, ...]


#: safetensors dtype names the streamer can load into a layer (float weights only)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: bits per element of every dtype the safetensors format names (packed F4/F6 count their logical elements)
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
            "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
            "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def file_layout(file: Path) -> dict[str, tuple[int, int, str, tuple[int, ...]]]:
    """name -> (offset from the file's start, bytes, safetensors dtype, shape) of every tensor in ``file``,
    from ``safe_open`` (see the module docstring for why the offsets follow from its checks)."""
    try:
        with safe_open(file, framework="pt") as f:
            specs = [(name, f.get_slice(name)) for name in f.offset_keys()]
            specs = [(name, s.get_dtype(), tuple(s.get_shape())) for name, s in specs]
    except SafetensorError as exc:
        raise CheckpointNotFoundError(f"{file} is not a readable safetensors file ({exc}); re-download or "
                                      "re-save the checkpoint") from None
    unknown = sorted({dt for _, dt, _ in specs if dt not in _ST_BITS})
    if unknown:
        raise UnsupportedArchitectureError(f"{file} stores tensors as {unknown}, a dtype whose size this version does "
                                           "not know; load this checkpoint without weight offloading")
    sizes = [math.prod(shape) * _ST_BITS[dt] // 8 for _, dt, shape in specs]
    offset, out = os.path.getsize(file) - sum(sizes), {}
    for (name, dt, shape), n in zip(specs, sizes):
        out[name], offset = (offset, n, dt, shape), offset + n
    return out


def stored_tensors(path: Path, names: list[str], wmap: dict[str, str]) -> dict[str, Stored]:
    """File, byte offset, dtype and shape of each of ``names`` (float tensors of a sharded or single checkpoint)."""
    gguf = sorted({wmap[n] for n in names if wmap[n].endswith(".gguf")})
    if gguf:  # a GGUF checkpoint (gguf.py): quantized blocks, dequantized on load
        raise UnsupportedArchitectureError(
            f"{gguf[0]} is a GGUF file: its quantized blocks cannot be streamed as a span's float tensors; run "
            "this span with weight_offload=0 (kv_offload still works)")
    ensure_files(path, [wmap[n] for n in names])
    layouts = {f: file_layout(path / f) for f in {wmap[n] for n in names}}
    out = {}
    for name in names:
        offset, nbytes, dt, shape = layouts[wmap[name]][name]
        if dt not in _ST_DTYPES:
            raise UnsupportedArchitectureError(f"{name} is stored as {dt}; only float tensors can be offloaded")
        out[name] = Stored(wmap[name], offset, nbytes, _ST_DTYPES[dt], shape)
    return out


def read_run(f, mvs: list[memoryview], offset: int) -> None:
    """Fill the buffers ``mvs`` with the consecutive bytes of ``f`` from ``offset`` (one ``preadv``)."""
    n = os.preadv(f.fileno(), mvs, offset) if hasattr(os, "preadv") else 0
    for mv in mvs:  # whatever came back short, one buffer at a time
        if n < len(mv):
            _read_at(f, mv[n:], offset + n)
        offset, n = offset + len(mv), max(0, n - len(mv))


def _read_at(f, mv: memoryview, offset: int) -> None:
    """Fill ``mv`` from ``offset`` of the unbuffered file ``f`` (reads may come back short)."""
    got = 0
    while got < len(mv):
        if hasattr(os, "preadv"):
            n = os.preadv(f.fileno(), [mv[got:]], offset + got)
        else:
            f.seek(offset + got)
            n = f.readinto(mv[got:])
        if not n:
            raise OSError(f"{f.name} ends before the tensor at byte {offset} does (a truncated checkpoint?)")
        got += n


def drop_pages(f, start: int, length: int) -> None:
    """Ask the kernel to evict ``f``'s cached pages in ``[start, start + length)`` (``length`` 0: to the
    end of the file). Linux only; elsewhere the page cache keeps what was read."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), start, length, os.POSIX_FADV_DONTNEED)


def page_cache_fraction(file: Path, start: int, end: int) -> float:
    """Share of the pages of ``file[start:end]`` that are in the page cache (``mincore``; Linux only).

    Looking does not read: the file is mapped but never touched.
    """
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    first, last = start // page * page, -(-end // page) * page
    with open(file, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        last = min(last, -(-size // page) * page)
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    base = ctypes.c_char.from_buffer(m)
    try:
        n = (last - first) // page
        vec = (ctypes.c_ubyte * n)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(base) + first), ctypes.c_size_t(last - first), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return sum(v & 1 for v in vec) / max(n, 1)
    finally:
        del base  # no exported pointer may outlive the mapping
        m.close()

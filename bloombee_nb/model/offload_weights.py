"""Offloaded weights: the last layers of a span streamed from the checkpoint every step.

Weights (:class:`WeightStreamer`). Of a span's ``n`` layers the last ``n_off = round(f·n)``
stay *meta* shells (no memory). Each step, just before shell ``j`` runs, its tensors are read
from the memory-mapped checkpoint (:func:`~.checkpoint.load_tensors`), copied into one of two
resident layer buffers and assigned to the shell (``load_state_dict(assign=True)``, as
``family._materialise`` does); after the layer ran the shell is emptied again. A background
thread reads layer ``j+1`` into the other buffer while ``j`` computes (one-layer lookahead)::

    compute thread:  [resident layers ......][off 0][off 1][off 2]     (step ends)
    prefetch thread: [read off 0]  [read off 1]  [read off 2]            [read off 0 for the next step]

- Why the *last* layers: the read of the first offloaded layer overlaps the resident layers'
  compute of the same step, and when a step ends it is read again for the next step while the
  stage is idle (waiting on the network and the other stages). Offloading the first layers
  instead would leave that read in front of the step's compute with, in a back-to-back
  workload (a pipeline's bottleneck stage), nothing to hide it behind.
- Memory bound: resident layers + 2 layer buffers (the one computing and the one being read),
  whatever ``n_off`` is — plus one CPU staging layer when the checkpoint's dtype differs from the
  serving dtype or the buffers live on an accelerator (pinned there). The page cache of a read
  layer is dropped right after the read (below).
- Step time ≈ max(compute, reads) while reads keep up (the cost model's ``max(t_c, t_read)``,
  ``plan/cost.py``); with ``prefetch=False`` reads and compute add up.
- Reading: one ``preadv`` per tensor straight into the buffer (``reader="pread"``, the default);
  ``reader="mmap"`` goes through the memory-mapped :func:`~.checkpoint.load_tensors` and
  ``copy_``, whose page faults read the file a readahead window at a time (measured 2-4x
  slower here). Both read the same bytes, so both are exact.
- Page cache: a file read stays in the kernel's page cache, so without help the "disk" tier
  silently becomes RAM after the first step. On Linux an offloaded layer's pages are dropped with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` right after its read (``drop_page_cache=True``, the
  default; pages someone maps, such as the resident layers', are never dropped; between steps
  at most one kernel readahead window stays cached; see :meth:`WeightStreamer._drop`); the
  effect is measured in ``benchmarks/results/offload.md``.
- Device case: the reads land in a pinned CPU staging buffer and go on with
  ``buffer.copy_(staging, non_blocking=True)`` on a side stream; a buffer is only overwritten after
  the compute that used it has finished (an event recorded on the compute stream and waited on by
  the side stream). On a CPU all of that is a no-op and the reads land in the buffer itself (a
  staging buffer is used only to cast a checkpoint stored in another dtype). On an accelerator the
  layer buffers are the fast tier's; the pinned staging buffer is host memory and is counted
  apart (:attr:`WeightStreamer.staging_bytes`). The GPU checks are ``tests/model/test_device.py``
  and ``tests/model/test_offload.py`` (skipped without one); ``benchmarks/gpu_check.sh`` runs them
  on a GPU machine.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import CheckpointNotFoundError, SpanError, UnsupportedArchitectureError
from .checkpoint import load_tensors
from .offload_disk import FOLIO_BYTES, drop_pages, page_cache_fraction, read_run, stored_tensors

#: Buffer views start on this many bytes (SIMD-friendly, like a fresh allocation).
_ALIGN_BYTES = 64
#: ... and on an accelerator, where the BLAS picks kernels by pointer alignment (a fresh CUDA
#: allocation is 512-byte aligned): 256 keeps a view's kernels those of a resident weight.
_DEVICE_ALIGN_BYTES = 256


@dataclass
class StreamStats:
    """What the last step's offloaded layers cost: bytes read, seconds reading (in the reader; the
    first layer's read separately), seconds the compute thread waited for a read to finish."""

    layers: int = 0
    read_bytes: int = 0
    read_s: float = 0.0
    first_read_s: float = 0.0
    wait_s: float = 0.0


class _Sync:
    """Ordering between the copy stream and the compute stream; all no-ops on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def event(self, stream=None):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(stream if stream is not None else torch.cuda.current_stream(self.device))
        return ev

    def copy_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else _null()

    def flush(self) -> None:
        """Block until the copies queued on the copy stream are done (their sources may go)."""
        if self.cuda:
            self.event(self.stream).synchronize()

    def wait(self, event, stream=None) -> None:
        if event is not None:
            (stream if stream is not None else torch.cuda.current_stream(self.device)).wait_event(event)


def _slots(module: nn.Module) -> dict[str, tuple[nn.Module, str, str]]:
    """state-dict name -> (owning module, "_parameters" or "_buffers", attribute) for ``module``."""
    out = {}
    for prefix, m in module.named_modules():
        for kind, tensors in (("_parameters", m._parameters), ("_buffers", m._buffers)):
            for name, t in tensors.items():
                if t is not None and (kind == "_parameters" or name not in m._non_persistent_buffers_set):
                    out[f"{prefix}.{name}" if prefix else name] = (m, kind, name)
    if set(out) != set(module.state_dict()):
        raise UnsupportedArchitectureError(f"{type(module).__name__} has tensors outside its own modules' parameters "
                                           "and buffers (shared or tied weights); it cannot be offloaded")
    return out


@contextmanager
def _null():
    yield


class WeightStreamer:
    """Streams the offloaded layers of a span from the checkpoint through two resident buffers.

    ``shells``: the offloaded layers' modules on the meta device, in order, keyed by their names'
    prefix in the checkpoint (``"model.layers.7."``). ``dtype``/``device``: what the layers compute in.

    ``reader``: how a layer's bytes come off the disk. ``"pread"`` (default): one vectored
    ``preadv`` per run of adjacent tensors, in file order, straight into the buffer (or a staging
    buffer when the stored dtype or the device differ). ``"mmap"``: :func:`~.checkpoint.load_tensors`
    (memory-mapped) and ``copy_``, where page faults do the reading — slower here
    (``benchmarks/results/offload.md``). Used automatically when one layer's tensors are stored in
    several dtypes.
    """

    def __init__(self, path: Path, wmap: dict[str, str], shells: dict[str, nn.Module], dtype: torch.dtype,
                 device: torch.device | str = "cpu", prefetch: bool = True, drop_page_cache: bool = True,
                 reader: str = "pread"):
        if reader not in ("pread", "mmap"):
            raise SpanError(f"reader must be 'pread' or 'mmap', got {reader!r}")
        self.path, self.wmap, self.dtype, self.device = path, wmap, dtype, _indexed(torch.device(device))
        self.shells, self.prefixes = list(shells.values()), list(shells)
        self.prefetch, self.drop_page_cache, self.reader = prefetch, drop_page_cache, reader
        self._meta = [dict(s.state_dict()) for s in self.shells]  # name -> meta tensor (shapes, dtypes)
        self._slots = [_slots(s) for s in self.shells]             # name -> (module, "_parameters", attr)
        self._empty = [{k: getattr(m, kind)[a] for k, (m, kind, a) in sl.items()} for sl in self._slots]
        self._check_layout()
        self._stored = [stored_tensors(path, [p + k for k in m], wmap) for p, m in zip(self.prefixes, self._meta)]
        for prefix, meta, stored in zip(self.prefixes, self._meta, self._stored):
            bad = [k for k, t in meta.items() if tuple(t.shape) != stored[prefix + k].shape]
            if bad:
                k = bad[0]
                raise UnsupportedArchitectureError(f"{prefix}{k} is stored with shape {list(stored[prefix + k].shape)}, "
                                                   f"the model expects {list(meta[k].shape)}")
        self._extent = [{f: (min(st.offset for st in layer.values() if st.file == f),
                             max(st.offset + st.nbytes for st in layer.values() if st.file == f))
                         for f in {st.file for st in layer.values()}} for layer in self._stored]
        # one unbuffered handle per file for the runner's life: the kernel's readahead state carries
        # over from layer to layer, and a moved or deleted checkpoint keeps being readable
        self._files = {f: open(path / f, "rb", buffering=0) for layer in self._extent for f in layer}
        self.layer_bytes = [sum(t.numel() for t in m.values()) * dtype.itemsize for m in self._meta]
        self._buffers = [self._allocate(dtype, self.device) for _ in range(min(2, len(self.shells)))]
        # pread lands in a CPU buffer of the stored dtype: the layer buffer itself when that is one
        stored = {st.dtype for layer in self._stored for st in layer.values()}
        if len(stored) > 1:  # tensors of one layer stored in several dtypes: let load_tensors cast them
            self.reader = "mmap"
        direct = self.device.type == "cpu" and stored == {dtype}
        self._staging = None if direct or self.reader == "mmap" else self._allocate(
            stored.pop(), "cpu", pin=self.device.type == "cuda")
        self._sync = _Sync(self.device)
        self._done = [None] * len(self._buffers)  # event: compute that used buffer b has finished
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="bloombee-prefetch") if prefetch else None
        self._ahead: Future | None = None  # the next step's first layer, read while the stage is idle
        self.last = StreamStats()

    # -- setup --
    def _check_layout(self) -> None:
        for prefix, meta in zip(self.prefixes, self._meta):
            missing = [prefix + k for k in meta if prefix + k not in self.wmap]
            if missing:
                raise UnsupportedArchitectureError(f"checkpoint at {self.path} lacks {missing[:3]}; its tensor names "
                                                   "do not follow the family's layout")
            odd = [k for k, t in meta.items() if not t.is_floating_point()]
            if odd:
                raise UnsupportedArchitectureError(f"layer tensors {odd[:3]} are not floating point; such layers cannot "
                                                   "be offloaded (use weight_offload=0)")

    def _allocate(self, dtype: torch.dtype, device, pin: bool = False) -> dict[str, torch.Tensor]:
        """One layer buffer: a flat tensor with an aligned view per tensor name (sized for the largest layer)."""
        align_bytes = _ALIGN_BYTES if torch.device(device).type == "cpu" else _DEVICE_ALIGN_BYTES
        align = max(1, align_bytes // dtype.itemsize)
        shapes = max(self._meta, key=lambda m: sum(t.numel() for t in m.values()))
        offsets, n = {}, 0
        for name, t in shapes.items():
            offsets[name], n = n, n + -(-t.numel() // align) * align
        flat = torch.empty(n, dtype=dtype, device=device, pin_memory=pin)
        return {"_flat": flat, **{k: flat[o:o + shapes[k].numel()].view(shapes[k].shape) for k, o in offsets.items()}}

    # -- one step --
    @contextmanager
    def run(self, layers: list[nn.Module]):
        """Iterate the span's modules for one step: ``layers`` are the resident layers followed by
        the offloaded shells (``self.shells``); each shell is filled from its buffer while it runs.

        With prefetch, the first offloaded layer of the *next* step is read as soon as a step ends
        (both buffers are free then, and a stage between steps waits on the network and the other
        stages). Leaving the block by an exception waits for any read in flight and reads nothing ahead.
        """
        n_res = len(layers) - len(self.shells)
        self.last = StreamStats()
        pending: list[Future | None] = [self._ahead]
        self._ahead = None
        if self.shells and self.prefetch and pending[0] is None:  # overlaps the resident layers' compute
            pending[0] = self._reader.submit(self._read, 0, 0)
        try:
            yield self._iterate(layers[:n_res], pending)
        except BaseException:
            self._settle(pending[0])
            raise
        finally:
            for j in range(len(self.shells)):
                self._bind(j, self._empty[j])
        self._settle(pending[0])  # only if the step stopped early
        if self.shells and self.prefetch:
            self._ahead = self._reader.submit(self._read, 0, 0)

    @staticmethod
    def _settle(fut: Future | None) -> None:
        if fut is not None:
            try:
                fut.result()
            except Exception:  # noqa: BLE001 - a read error surfaces when its layer is needed
                pass

    def idle(self) -> None:
        """Wait for the read ahead of the next step (diagnostics, shutdown)."""
        self._settle(self._ahead)

    def _iterate(self, resident, pending):
        yield from resident
        for j, shell in enumerate(self.shells):
            b = j % len(self._buffers)
            t0 = time.perf_counter()
            if self.prefetch:
                fut, pending[0] = pending[0], None
                views, read_s = fut.result()
            else:
                views, read_s = self._read(j, b)
            self.last.wait_s += time.perf_counter() - t0
            self.last.layers, self.last.read_bytes = self.last.layers + 1, self.last.read_bytes + self.layer_bytes[j]
            self.last.read_s += read_s
            if j == 0:
                self.last.first_read_s = read_s
            if self.prefetch and j + 1 < len(self.shells):  # read the next layer while this one computes
                pending[0] = self._reader.submit(self._read, j + 1, (j + 1) % len(self._buffers))
            self._bind(j, views)
            yield shell
            self._bind(j, self._empty[j])  # the buffer is someone else's next
            self._done[b] = self._sync.event()

    def _bind(self, j: int, tensors: dict[str, torch.Tensor]) -> None:
        """Point shell ``j``'s parameters at ``tensors`` (its buffer's views, or the meta ones) — what
        ``load_state_dict(assign=True)`` does, without its per-call cost (~0.3 ms a layer)."""
        for k, (module, kind, attr) in self._slots[j].items():
            t = tensors[k]
            getattr(module, kind)[attr] = t if kind == "_buffers" or isinstance(t, nn.Parameter) else \
                nn.Parameter(t, requires_grad=False)

    @torch.inference_mode()  # a thread's own mode: buffers may have been made inside inference mode
    def _read(self, j: int, b: int) -> tuple[dict[str, torch.Tensor], float]:
        """Read offloaded layer ``j`` from the checkpoint into buffer ``b`` (runs in the reader thread);
        returns the buffer's views and the seconds it took."""
        t0 = time.perf_counter()
        prefix, buf = self.prefixes[j], self._buffers[b]
        views = {k: buf[k] for k in self._meta[j]}
        try:
            if self.reader == "mmap":
                src = load_tensors(self.path, [prefix + k for k in views], self.wmap)  # mapped, nothing read yet
                with self._sync.copy_stream():
                    self._sync.wait(self._done[b], self._sync.stream)  # the last layer using b has finished
                    for k in sorted(views, key=lambda k: self._stored[j][prefix + k].offset):  # file order
                        views[k].copy_(src[prefix + k], non_blocking=True)  # the page faults read the disk here
                    self._sync.flush()
                del src  # unmap before dropping: mapped pages cannot be dropped
            else:
                land = views if self._staging is None else {k: self._staging[k] for k in views}
                self._pread(j, land)
                if self._staging is not None:
                    with self._sync.copy_stream():
                        self._sync.wait(self._done[b], self._sync.stream)
                        for k, v in views.items():
                            v.copy_(land[k], non_blocking=True)  # cast and/or host -> device
                        self._sync.flush()  # the staging buffer is reused by the next read
        except (OSError, SafetensorError) as exc:
            raise CheckpointNotFoundError(
                f"offloaded layer {prefix!r} could not be read from {self.path} ({type(exc).__name__}: {exc}); "
                "a stage with weight_offload > 0 reads its checkpoint files every step: keep them in place") from None
        if self.drop_page_cache:
            self._drop(j)
        return views, time.perf_counter() - t0

    def _pread(self, j: int, land: dict[str, torch.Tensor]) -> None:
        """Read layer ``j``'s stored bytes into ``land`` (CPU tensors of the stored dtype), one read per tensor."""
        parts = []
        for k, dst in land.items():
            st = self._stored[j][self.prefixes[j] + k]
            if dst.dtype != st.dtype or tuple(dst.shape) != st.shape:
                raise UnsupportedArchitectureError(
                    f"{self.prefixes[j]}{k} is stored as {st.dtype} {list(st.shape)}, the layer expects "
                    f"{dst.dtype} {list(dst.shape)}")
            parts.append((st.file, st.offset, memoryview(dst.view(torch.uint8).numpy()).cast("B")))
        # in file order, adjacent tensors in one vectored read: the kernel sees one sequential stream
        # (state-dict order jumps around the layer and defeats readahead: measured ~1.6x slower)
        parts.sort(key=lambda x: x[:2])
        run = [parts[0]]
        for part in parts[1:] + [None]:
            if part is not None and part[0] == run[-1][0] and part[1] == run[-1][1] + len(run[-1][2]):
                run.append(part)
                continue
            read_run(self._files[run[0][0]], [mv for _, _, mv in run], run[0][1])
            run = [part]

    def _drop(self, j: int) -> None:
        """Evict layer ``j``'s file pages. The kernel only drops whole page-cache folios (up to 2 MiB)
        inside the range, and never pages someone maps (the resident layers, other processes):
        the range starts 2 MiB-aligned (the folio that straddles the previous layer's end goes now)
        and ends at the layer's end, so readahead into the next layer survives for its read. After
        the step's last offloaded layer the whole file goes (readahead past it included). So between
        steps the page cache may hold what the kernel read ahead of the first layer read for the
        next step: at most one readahead window (``/sys/block/*/queue/read_ahead_kb``)."""
        last = j == len(self.shells) - 1
        for fname, (a, b) in self._extent[j].items():
            a = 0 if last else a // FOLIO_BYTES * FOLIO_BYTES
            drop_pages(self._files[fname], a, 0 if last else b - a)

    def cached_fraction(self) -> float:
        """Share of the offloaded layers' file bytes now in the page cache (Linux; diagnostics)."""
        self.idle()
        total = cached = 0
        for layer in self._stored:
            for st in layer.values():
                total += st.nbytes
                cached += page_cache_fraction(self.path / st.file, st.offset, st.offset + st.nbytes) * st.nbytes
        return cached / total if total else 0.0

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the streamer's buffers in the fast tier: the two layer buffers, and on a CPU the
        staging buffer too (if there is one; it shares the RAM)."""
        bufs = self._buffers + ([self._staging] if self._staging is not None and self.device.type == "cpu" else [])
        return sum(b["_flat"].numel() * b["_flat"].element_size() for b in bufs)

    @property
    def staging_bytes(self) -> int:
        """Bytes of the pinned host staging buffer when the layers compute on an accelerator (else 0)."""
        if self._staging is None or self.device.type == "cpu":
            return 0
        return self._staging["_flat"].numel() * self._staging["_flat"].element_size()

    def close(self) -> None:
        self.idle()
        if self._reader is not None:
            self._reader.shutdown(wait=True)
        for f in self._files.values():
            f.close()


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current device>``: streams and events need to know which device."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device

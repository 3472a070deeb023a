"""Which codec pays for itself on a link: measured once, decided by a pure function.

The maths. One frame of a tensor crosses a link of bandwidth ``β`` (bytes/s). With codec ``c`` it
costs, end to end::

    T_c(β) = E_c + w_c / β + D_c

``E_c`` / ``D_c`` are the measured wall times of ``encode`` / ``decode`` (for raw they are the
copies into and out of the frame), ``w_c`` the frame's bytes on the wire, header included. The
link's latency is the same for every codec and cancels; encode, send and decode run one after
the other (no overlap), as the stages do. Compressing with ``c`` beats raw exactly when::

    E_c + D_c − (E_raw + D_raw)  <  (w_raw − w_c) / β
    ⇔  β  <  β*_c = (w_raw − w_c) / (E_c + D_c − E_raw − D_raw)        (break-even bandwidth)

so a link slower than ``β*_c`` should compress, a faster one (loopback at GB/s) should not.
:func:`choose_codec` simply returns ``argmin_c T_c(β)`` over the measured candidates, which is the
lower envelope of lines in ``1/β``: between two compressing candidates ``a``, ``b`` the switch
happens at ``β = (w_b − w_a) / ((E_a + D_a) − (E_b + D_b))``.

Times are measured on a sample of the size that will be sent: per-call overheads dominate small
frames (a 1-token decode step of a 4k-wide model is 8–16 KB; blosc2 + CRC cost tens of µs there),
so calibrate prefill-sized and decode-sized tensors separately and cache one choice per
(link, dtype, size class).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .codec import RAW, Codec
from .frame import decode, encode

#: A small set worth calibrating on hidden states (measured in benchmarks/results/compression.md):
#: LZ4 + bitshuffle is the cheapest win (bf16 ~1.2x at ~2 GB/s, fp32 ~1.09x, nothing on fp16),
#: ZSTD-1 + shuffle the best ratio at ~0.5-1 GB/s (bf16 ~1.46x, fp16/fp32 ~1.17-1.19x), and ZSTD-1
#: on the exponent plane alone matches it on large frames and does best on small (decode) ones.
#: Whole-tensor planes, bytedelta, higher levels and the other compressors were dominated there.
DEFAULT_CANDIDATES: tuple[Codec, ...] = (
    RAW,
    Codec("lz4", 5, "bitshuffle"),
    Codec("zstd", 1, "shuffle"),
    Codec("zstd", 1, "none", "high"),
)


@dataclass(frozen=True)
class CodecStats:
    """One codec measured on one sample tensor."""

    codec: Codec
    raw_nbytes: int  # bytes of the sample tensor
    wire_nbytes: int  # bytes of its frame with this codec, header included
    encode_s: float  # median wall time of encode()
    decode_s: float  # median wall time of decode()

    @property
    def ratio(self) -> float:
        """Tensor bytes per wire byte (a raw frame is slightly below 1: its header)."""
        return self.raw_nbytes / self.wire_nbytes

    @property
    def encode_Bps(self) -> float:
        return self.raw_nbytes / self.encode_s if self.encode_s > 0 else math.inf

    @property
    def decode_Bps(self) -> float:
        return self.raw_nbytes / self.decode_s if self.decode_s > 0 else math.inf

    def time_s(self, bandwidth_Bps: float) -> float:
        """``T_c(β)``: encode + transfer + decode of one frame."""
        return self.encode_s + self.wire_nbytes / bandwidth_Bps + self.decode_s


def _raw_of(stats: Sequence[CodecStats]) -> CodecStats:
    for s in stats:
        if s.codec.is_raw:
            return s
    raise ValueError("stats must include the raw codec (calibrate() always measures it)")


def break_even_bandwidth_Bps(candidate: CodecStats, raw: CodecStats) -> float:
    """``β*``: links slower than this should use ``candidate`` rather than raw.

    0.0 when the candidate saves no bytes (never pays); ``inf`` when it saves bytes at no
    extra time (always pays).
    """
    saved = raw.wire_nbytes - candidate.wire_nbytes
    extra_s = (candidate.encode_s + candidate.decode_s) - (raw.encode_s + raw.decode_s)
    if saved <= 0:
        return 0.0
    return math.inf if extra_s <= 0 else saved / extra_s


def choose_codec(stats: Sequence[CodecStats], bandwidth_Bps: float, margin: float = 0.0) -> Codec:
    """The candidate with the least ``encode + transfer + decode`` time on this link.

    Pure function of measured numbers. ``margin`` (e.g. 0.05) demands that compressing beat raw
    by that fraction before it is chosen, to ride out measurement noise; ties go to raw.
    """
    if not bandwidth_Bps > 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth_Bps!r}")
    raw = _raw_of(stats)
    best = min(stats, key=lambda s: (s.time_s(bandwidth_Bps), not s.codec.is_raw))
    if best.time_s(bandwidth_Bps) < (1.0 - margin) * raw.time_s(bandwidth_Bps):
        return best.codec
    return RAW


def timed_s(fn, repeats: int, min_batch_s: float = 1e-3, best: bool = False) -> float:
    """Median (or, with ``best``, the fastest) of ``repeats`` timings of ``fn`` after one untimed
    warm-up call; calls shorter than ``min_batch_s`` are timed in batches (0: one call per timing).

    ``best`` estimates what the code can do: load from other processes on a shared machine only
    adds time, and adds it unevenly to codecs timed one after the other."""
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    inner = max(1, min(1000, int(min_batch_s / max(one, 1e-7))))  # batch tiny calls for a stable clock
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return min(samples) if best else statistics.median(samples)


def calibrate(sample: torch.Tensor, candidates: Iterable[Codec] = DEFAULT_CANDIDATES, repeats: int = 5,
              nthreads: int = 1) -> tuple[CodecStats, ...]:
    """Measure ratio and encode/decode time of each candidate (and raw) on ``sample``.

    Use a real hidden state of the dtype and size the link will carry. Every candidate's round
    trip is checked bit for bit; a mismatch raises (it would be a bug, never a choice).
    """
    sample = sample.detach().to("cpu").contiguous()
    bits = sample.reshape(-1).view(torch.uint8)
    codecs = [RAW, *(c for c in candidates if not c.is_raw)]
    out = []
    for c in dict.fromkeys(codecs):  # de-duplicated, order kept
        frame = encode(sample, c, nthreads=nthreads)
        back = decode(frame, max_bytes=max(len(frame), bits.numel()) + 1, nthreads=nthreads)
        if not torch.equal(back.reshape(-1).view(torch.uint8), bits):
            raise AssertionError(f"{c} did not round-trip bit-exactly; please report this bug")
        enc = timed_s(lambda: encode(sample, c, nthreads=nthreads), repeats, best=True)
        dec = timed_s(lambda: decode(frame, max_bytes=bits.numel() + 1, nthreads=nthreads), repeats,
                            best=True)
        out.append(CodecStats(c, bits.numel(), len(frame), enc, dec))
    return tuple(out)


@dataclass(frozen=True)
class CodecPolicy:
    """Which codec a sender uses on one link, by frame size: ``classes`` are ``(upto_nbytes, codec)``
    in increasing size, the last one unbounded. A value: shown, sent to a stage, compared in tests."""

    classes: tuple[tuple[float, Codec], ...] = ((math.inf, RAW),)
    bandwidth_Bps: float = math.inf  # the link it was chosen for (inf: not chosen from a measurement)

    def codec_for(self, nbytes: int) -> Codec:
        for upto, codec in self.classes:
            if nbytes <= upto:
                return codec
        return self.classes[-1][1]

    @classmethod
    def fixed(cls, codec: Codec, min_compress_bytes: int = 0) -> "CodecPolicy":
        """One codec for frames of at least ``min_compress_bytes``, raw below (headers outweigh the gain)."""
        if codec.is_raw or min_compress_bytes <= 0:
            return cls(((math.inf, codec),))
        return cls(((min_compress_bytes - 1, RAW), (math.inf, codec)))

    @classmethod
    def choose(cls, stats_by_size: Sequence[Sequence[CodecStats]], bandwidth_Bps: float,
               margin: float = 0.05) -> "CodecPolicy":
        """Per calibrated sample size, :func:`choose_codec` on this link; the switch between two
        neighbouring sizes is at their geometric mean. Neighbouring equal choices merge."""
        ordered = sorted(stats_by_size, key=lambda st: st[0].raw_nbytes)
        sizes = [st[0].raw_nbytes for st in ordered]
        chosen: list[Codec] = []
        for st in ordered:
            best = choose_codec(st, bandwidth_Bps, margin)
            # near-ties flip with measurement noise: keep the smaller size's codec when it is
            # within ``margin`` of the best here too (fewer classes, the same time within noise)
            prev = next((s for s in st if chosen and s.codec == chosen[-1]), None)
            if prev is not None and not best.is_raw and not prev.codec.is_raw and \
                    prev.time_s(bandwidth_Bps) <= (1 + margin) * next(s for s in st if s.codec == best).time_s(bandwidth_Bps):
                best = prev.codec
            chosen.append(best)
        bounds = [math.sqrt(a * b) for a, b in zip(sizes, sizes[1:])] + [math.inf]
        classes: list[tuple[float, Codec]] = []
        for upto, codec in zip(bounds, chosen):
            if classes and classes[-1][1] == codec:
                classes[-1] = (upto, codec)
            else:
                classes.append((upto, codec))
        return cls(tuple(classes), bandwidth_Bps)

    def __str__(self) -> str:
        if len(self.classes) == 1:
            return str(self.classes[0][1])
        parts = []
        lo = 0.0
        for upto, codec in self.classes:
            parts.append(f"{codec} ≥{_fmt_bytes(lo)}" if lo else str(codec))
            lo = upto
        return " · ".join(parts)

    def to_dict(self) -> dict:
        return {"classes": [[None if math.isinf(u) else u, str(c)] for u, c in self.classes],
                "bandwidth_Bps": None if math.isinf(self.bandwidth_Bps) else self.bandwidth_Bps}

    @classmethod
    def from_dict(cls, d: dict) -> "CodecPolicy":
        classes = tuple((math.inf if u is None else float(u), Codec.parse(c)) for u, c in d["classes"])
        bw = d.get("bandwidth_Bps")
        return cls(classes, math.inf if bw is None else float(bw))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.0f} TiB"


#: Rows of a calibration sample (batch × tokens of hidden states): decode of 1 and 8 sequences,
#: and prefills of growing length; the bytes are capped by ``CALIBRATION_MAX_BYTES``.
CALIBRATION_ROWS = (1, 8, 64, 512, 4096)
CALIBRATION_MAX_BYTES = 16 << 20


def calibrate_sizes(sample: torch.Tensor, rows: Sequence[int] = CALIBRATION_ROWS,
                    candidates: Iterable[Codec] = DEFAULT_CANDIDATES, repeats: int = 5,
                    nthreads: int = 1) -> tuple[tuple[CodecStats, ...], ...]:
    """:func:`calibrate` on row prefixes of ``sample`` [rows, D] (repeated to reach large sizes)."""
    flat = sample.detach().reshape(-1, sample.shape[-1])
    row_bytes = flat.shape[1] * flat.element_size()
    out = []
    for r in rows:
        r = min(r, max(1, CALIBRATION_MAX_BYTES // row_bytes))
        reps = -(-r // flat.shape[0])
        out.append(calibrate(flat.repeat(reps, 1)[:r], candidates, repeats, nthreads))
        if r * row_bytes >= CALIBRATION_MAX_BYTES:
            break
    return tuple(out)

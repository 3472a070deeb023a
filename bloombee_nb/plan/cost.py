"""The cost model: pure functions from profiles to seconds and bytes.

Every function works on Python scalars and, where it says so, on numpy arrays that broadcast,
so the dynamic program builds its tables with the very same formulas it later reports.

Notation: a *stage* hosts ``n`` consecutive layers on one worker; a *micro-batch* of ``m``
sequences moves through the chain as one unit; ``B`` is the workload's batch, ``Lmax`` its
``max_length``, ``c̄`` its mean context (``prompt_len + new_tokens/2``).

- Compute (decode, per micro-batch step):   t_c = n · t_layer(m) / speed
- Compute (prefill, per micro-batch):       t_p = n · m · t_prefill(prompt_len) / speed
- One hop (one way) of ``x`` bytes:          t_link = x / bandwidth + rtt / 2
  (serialisation plus half the measured round trip; ``x / bandwidth`` alone is how long the
  link is *busy*, which is what limits a pipeline's rate.)
  Decode moves ``m · hidden_bytes_per_token`` per hop, prefill ``m · prompt_len · hidden…``.
- Memory of a stage: weights ``n · layer_weight_bytes`` and KV ``n · B · Lmax · kv_bytes…``
  (the KV of the whole batch is reserved up front, whatever the micro-batch).
- Offloading: a fraction ``w`` of the weights and ``k`` of the KV leave the fast tier. The
  offloaded weights fill the middle tier (RAM behind an accelerator) first, then the offloaded
  KV, and the rest goes to disk — weights first because every micro-batch step reads all of
  them, but only ``m/B`` of the KV, so a byte of RAM saves more on weights.
- Offload time per micro-batch step: every offloaded weight byte, and the offloaded KV of the
  ``m`` sequences at the mean context (a fraction ``(m/B)·(c̄/Lmax)`` of the reservation), are
  read from their tier: t_read = Σ bytes_tier / read_bandwidth_tier. The runtime prefetches
  layer i+1 while computing layer i, so reading overlaps compute and costs only what it does
  not hide: extra = max(0, t_read − t_c), and the stage takes t_c + extra = max(t_c, t_read).
- Quantized stages (``fmt``, e.g. "int8", "nf4"): weights of ``model.weight_bytes_for(fmt)`` per
  layer, compute × ``worker.format_decode_factor[fmt]`` (both measured); a format the profile lacks
  costs ∞ (never chosen), and so does a quantized stage with weights offloaded (the runtime streams
  offloaded layers as the checkpoint stores them, so it quantizes resident spans only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profile import ModelProfile, WorkerProfile, Workload

# ---- compute -----------------------------------------------------------------------------------

def decode_compute_s(worker: WorkerProfile, n_layers, micro_batch: int):
    """One decode step of ``micro_batch`` sequences through ``n_layers`` layers (array-friendly in n),
    plus the stage's fixed per-step cost (``step_overhead_s``)."""
    return n_layers * worker.decode_s(micro_batch) + worker.step_overhead_s


def prefill_compute_s(worker: WorkerProfile, n_layers, prompt_len: int, micro_batch: int = 1):
    """Prefill of ``micro_batch`` prompts of ``prompt_len`` tokens (prompts run one after another)."""
    return n_layers * micro_batch * worker.prefill_s(prompt_len)


# ---- links -------------------------------------------------------------------------------------

def hop_bytes(model: ModelProfile, tokens) -> float:
    """Activation bytes crossing one link for ``tokens`` tokens (sequences × tokens each)."""
    return tokens * model.hidden_bytes_per_token


def transfer_s(nbytes, bandwidth_bytes_per_s, rtt_s):
    """One-way time of ``nbytes`` over a link: nbytes / bandwidth + rtt / 2 (array-friendly)."""
    return nbytes / bandwidth_bytes_per_s + rtt_s / 2


def link_busy_s(nbytes, bandwidth_bytes_per_s):
    """How long ``nbytes`` occupy a link: nbytes / bandwidth (the RTT is latency, not occupancy)."""
    return nbytes / bandwidth_bytes_per_s


# ---- memory ------------------------------------------------------------------------------------

def weight_bytes(model: ModelProfile, n_layers, fmt: str | None = None):
    return n_layers * model.weight_bytes_for(fmt)


def decode_factor(worker: WorkerProfile, fmt: str | None) -> float:
    """A quantized format's decode time per layer relative to the float one on ``worker`` (∞: not measured)."""
    return 1.0 if fmt is None else worker.format_decode_factor.get(fmt, np.inf)


def kv_bytes(model: ModelProfile, n_layers, batch: int, length: int):
    """KV reserved for ``batch`` sequences of ``length`` tokens in ``n_layers`` layers."""
    return n_layers * batch * length * model.kv_bytes_per_token_per_layer


@dataclass(frozen=True)
class TierBytes:
    """Where a stage's weights and KV live: bytes per tier (fast, mid = RAM behind an accelerator, disk).

    Fields broadcast like numpy arrays when the inputs were arrays.
    """

    weights_fast: object
    weights_mid: object
    weights_disk: object
    kv_fast: object
    kv_mid: object
    kv_disk: object


def tier_bytes(worker: WorkerProfile, weights, kv, weight_offload, kv_offload) -> TierBytes:
    """Split weights and KV over the tiers for the offloaded fractions (array-friendly).

    Offloaded weights fill the middle tier first, then offloaded KV; the remainder goes to disk.
    """
    w_off, k_off = weights * weight_offload, kv * kv_offload
    w_mid = np.minimum(w_off, worker.mid_bytes)
    k_mid = np.minimum(k_off, worker.mid_bytes - w_mid)
    return TierBytes(weights - w_off, w_mid, w_off - w_mid, kv - k_off, k_mid, k_off - k_mid)


def fits(worker: WorkerProfile, t: TierBytes):
    """Whether the split respects the fast-tier and disk budgets (the middle tier is filled by construction)."""
    return (t.weights_fast + t.kv_fast <= worker.fast_bytes) & (t.weights_disk + t.kv_disk <= worker.disk_bytes)


def offload_read_s(worker: WorkerProfile, t: TierBytes, kv_read_fraction):
    """Seconds to read one micro-batch step's offloaded bytes back (all offloaded weights, a
    ``kv_read_fraction`` of the offloaded KV) from the middle tier and from disk."""
    mid = t.weights_mid + kv_read_fraction * t.kv_mid
    disk = t.weights_disk + kv_read_fraction * t.kv_disk
    return mid / worker.ram_read_bytes_per_s + disk / worker.disk_read_bytes_per_s


def kv_read_fraction(workload: Workload, micro_batch: int) -> float:
    """Share of the reserved KV one micro-batch step reads: (m / B) · (mean context / max_length)."""
    return (micro_batch / workload.batch) * (workload.mean_context / workload.max_length)


def offload_extra_s(read_s, compute_s):
    """Time offloading adds when reading layer i+1 overlaps computing layer i: max(0, read − compute)."""
    return np.maximum(0.0, read_s - compute_s)


@dataclass(frozen=True)
class StageCost:
    """Decode time of one stage for one micro-batch step: compute + offload (∞ when it does not fit)."""

    compute_s: object
    offload_s: object
    fits: object
    tiers: TierBytes

    @property
    def total_s(self):
        return np.where(self.fits, self.compute_s + self.offload_s, np.inf)


def stage_cost(worker: WorkerProfile, model: ModelProfile, workload: Workload, n_layers, micro_batch: int,
               weight_offload, kv_offload, fmt: str | None = None) -> StageCost:
    """Everything about a stage of ``n_layers`` layers on ``worker`` with weights in ``fmt``
    (array-friendly in n and the fractions)."""
    n_layers = np.asarray(n_layers)
    t = tier_bytes(worker, weight_bytes(model, n_layers, fmt),
                   kv_bytes(model, n_layers, workload.batch, workload.max_length), weight_offload, kv_offload)
    compute = decode_compute_s(worker, n_layers * decode_factor(worker, fmt), micro_batch)
    read = offload_read_s(worker, t, kv_read_fraction(workload, micro_batch))
    ok = fits(worker, t)
    if fmt is not None:  # offloaded weights stream as stored in the checkpoint: a quantized span stays resident
        ok = ok & (np.asarray(weight_offload) == 0)
    return StageCost(compute, offload_extra_s(read, compute), ok, t)


def min_bytes_for(model: ModelProfile, workload: Workload, n_layers: int, fmt: str | None = None) -> int:
    """Bytes ``n_layers`` layers need across all tiers: weights plus the batch's KV at max_length."""
    return weight_bytes(model, n_layers, fmt) + kv_bytes(model, n_layers, workload.batch, workload.max_length)


def prefill_stage_s(worker: WorkerProfile, model: ModelProfile, workload: Workload, n_layers: int,
                    weight_offload: float, kv_offload: float, fmt: str | None = None) -> float:
    """Prefill of the whole batch through a stage: compute, or reading its offloaded weights once
    (overlapped), whichever is longer. Writing the prompt's KV is not costed."""
    t = tier_bytes(worker, weight_bytes(model, n_layers, fmt),
                   kv_bytes(model, n_layers, workload.batch, workload.max_length), weight_offload, kv_offload)
    compute = prefill_compute_s(worker, n_layers * decode_factor(worker, fmt), workload.prompt_len, workload.batch)
    return float(max(compute, offload_read_s(worker, t, 0.0)))

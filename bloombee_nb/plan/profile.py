"""What the planner knows: measured (or hand-written) profiles of the model, workers and links.

Over 400 lines because it holds the whole vocabulary the planner, the profiler and the widgets
share (model, worker, link, cluster and workload profiles), each a frozen value with its
validation, JSON round trip, what-if copies and ``_repr_html_``.

Every profile is a frozen value that round-trips through JSON with plain, unit-suffixed field
names, so a profile measured today can be saved, edited by hand to ask "what if this machine had
a GPU / this link were 10× faster", and planned for machines that are not here::

    cluster = ClusterProfile.load("lab.json")
    faster = cluster.with_link("client", "gpu-box", bandwidth_bytes_per_s=125e6)
    slower = cluster.with_worker("laptop", compute_speed_factor=0.5, include=False)

Conventions (the cost model in ``cost.py`` relies on them):

- ``decode_layer_s[b]`` is the time of ONE decoder layer for one decode step of a batch of ``b``
  sequences (one new token each); ``prefill_layer_s[t]`` the time of one layer for a prompt of
  ``t`` tokens at batch 1. Values in between are interpolated linearly; see :func:`interp_s`.
- ``compute_speed_factor`` divides measured times (2.0 = "twice as fast as measured").
- Memory tiers: the *fast* tier is the one the layer computes from: the accelerator when
  ``accel_bytes > 0``, else RAM. Bytes offloaded from it go to RAM (only when there is an
  accelerator) and then to disk, and are read back at ``ram_read_bytes_per_s`` /
  ``disk_read_bytes_per_s``.
- A link is one direction ``src → dst``; a missing pair means the two cannot talk directly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ._format import fmt_bytes, fmt_rate, fmt_s, html_table
from .errors import ProfileError

OBJECTIVES = ("latency", "throughput")


class _JsonValue:
    """``to_json``/``from_json``/``save``/``load`` for a frozen dataclass with a ``from_dict``."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ProfileError(f"{cls.__name__} has no field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**d)


def _positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ProfileError(f"{owner}: {name} must be > 0, got {v!r}; fix the profile (or re-measure it)")


def _non_negative(owner: str, **values: float) -> None:
    for name, v in values.items():
        if not v >= 0:
            raise ProfileError(f"{owner}: {name} must be >= 0, got {v!r}; fix the profile (or re-measure it)")


# ---- the model ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelProfile(_JsonValue):
    """Sizes of one decoder layer; every layer of the model is assumed identical."""

    name: str
    n_layers: int
    layer_weight_bytes: int            # parameters of one decoder layer, in their serving dtype
    kv_bytes_per_token_per_layer: int  # K and V of one token of one sequence in one layer
    hidden_bytes_per_token: int        # activation bytes of one token crossing a link (hidden_size × dtype)
    format_weight_bytes: dict[str, int] = field(default_factory=dict)  # quantized format → bytes of one layer

    def weight_bytes_for(self, fmt: str | None) -> float:
        """Bytes of one layer stored in ``fmt`` (None: the serving dtype); ∞ for a format not profiled."""
        return self.layer_weight_bytes if fmt is None else self.format_weight_bytes.get(fmt, float("inf"))

    def __post_init__(self):
        _positive(f"model {self.name!r}", n_layers=self.n_layers, layer_weight_bytes=self.layer_weight_bytes,
                  hidden_bytes_per_token=self.hidden_bytes_per_token)
        _non_negative(f"model {self.name!r}", kv_bytes_per_token_per_layer=self.kv_bytes_per_token_per_layer)

    @classmethod
    def for_decoder(cls, name: str, n_layers: int, hidden_size: int, intermediate_size: int, n_heads: int,
                    n_kv_heads: int, head_dim: int | None = None, dtype_bytes: int = 2) -> "ModelProfile":
        """Sizes of a Llama-style layer (q/k/v/o projections, gated MLP, two norms) from its config."""
        hd = head_dim or hidden_size // n_heads
        attn = hidden_size * hd * (2 * n_heads + 2 * n_kv_heads)   # q, o: h×(H·d); k, v: h×(KV·d)
        mlp = 3 * hidden_size * intermediate_size                   # gate, up, down
        return cls(name, n_layers, (attn + mlp + 2 * hidden_size) * dtype_bytes,
                   2 * n_kv_heads * hd * dtype_bytes, hidden_size * dtype_bytes)

    def _repr_html_(self) -> str:
        return html_table(f"ModelProfile {self.name}", ["layers", "weights / layer", "KV / token / layer",
                                                        "hidden / token", "weights total"],
                          [[self.n_layers, fmt_bytes(self.layer_weight_bytes),
                            fmt_bytes(self.kv_bytes_per_token_per_layer), fmt_bytes(self.hidden_bytes_per_token),
                            fmt_bytes(self.n_layers * self.layer_weight_bytes)]])


# ---- workers -----------------------------------------------------------------------------------

def interp_s(points: dict[int, float], x: float) -> float:
    """Time at ``x`` from times measured at a few ``x`` (batch sizes or prompt lengths).

    Linear between measured points. Below the smallest point: the smallest point's time (a smaller
    batch is never assumed faster than measured). Above the largest: extend the last segment's
    slope (floored at 0); with a single point, scale proportionally (t·x/x₀: no batching gain
    beyond what was measured).
    """
    xs = sorted(points)
    ys = [points[k] for k in xs]
    if x <= xs[0]:
        return float(ys[0])
    if x <= xs[-1]:
        return float(np.interp(x, xs, ys))
    if len(xs) == 1:
        return float(ys[0] * x / xs[0])
    slope = max(0.0, (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))
    return float(ys[-1] + slope * (x - xs[-1]))


def _int_keyed(owner: str, name: str, d: dict) -> dict[int, float]:
    """JSON turns int keys into strings; take them back, sorted, and check them."""
    try:
        out = {int(k): float(v) for k, v in sorted(d.items(), key=lambda kv: int(kv[0]))}
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{owner}: {name} must map integers to seconds, got {d!r}") from e
    for k, v in out.items():
        _positive(owner, **{f"{name} key": k, f"{name}[{k}]": v})
    return out


@dataclass(frozen=True)
class WorkerProfile(_JsonValue):
    """One machine that can host a span: its measured layer times and its memory per tier."""

    name: str
    address: str                        # Dask worker address (what a Placement names)
    decode_layer_s: dict[int, float]    # batch size → seconds per layer for one decode step
    prefill_layer_s: dict[int, float] = field(default_factory=dict)  # prompt tokens → s/layer at batch 1
    accel_bytes: int = 0                # accelerator memory budget (0: no accelerator; RAM is fast tier)
    ram_bytes: int = 0                  # CPU RAM budget
    disk_bytes: int = 0                 # disk budget for offloaded weights/KV
    ram_read_bytes_per_s: float = 12e9  # RAM → accelerator (≈ PCIe 4.0 x16 in practice)
    disk_read_bytes_per_s: float = 1e9  # disk → compute memory (≈ an NVMe SSD)
    compute_speed_factor: float = 1.0   # what-if knob: measured times are divided by it
    include: bool = True                # False: the planner must not use this worker
    step_overhead_s: float = 0.0        # fixed cost of one step at this stage beyond compute and link
                                        # time (dispatch, frames, thread hand-offs), measured with the
                                        # client calling the stage (the star relay's path)
    chain_step_overhead_s: float | None = None  # the same when stages forward to each other (chain
                                        # relay), measured on a real chain; None: not measured
    format_decode_factor: dict[str, float] = field(default_factory=dict)  # quantized format → its decode time
    # per layer ÷ the float one, measured on this worker (a format absent here is not offered to it)

    def __post_init__(self):
        owner = f"worker {self.name!r}"
        if not self.decode_layer_s:
            raise ProfileError(f"{owner}: decode_layer_s is empty; measure at least one batch size")
        object.__setattr__(self, "decode_layer_s", _int_keyed(owner, "decode_layer_s", self.decode_layer_s))
        object.__setattr__(self, "prefill_layer_s", _int_keyed(owner, "prefill_layer_s", self.prefill_layer_s))
        _non_negative(owner, accel_bytes=self.accel_bytes, ram_bytes=self.ram_bytes, disk_bytes=self.disk_bytes,
                      step_overhead_s=self.step_overhead_s)
        if self.chain_step_overhead_s is not None:
            _non_negative(owner, chain_step_overhead_s=self.chain_step_overhead_s)
        _positive(owner, ram_read_bytes_per_s=self.ram_read_bytes_per_s,
                  disk_read_bytes_per_s=self.disk_read_bytes_per_s, compute_speed_factor=self.compute_speed_factor)

    # -- memory tiers: fast (where layers compute), mid (RAM behind an accelerator), disk --
    @property
    def has_accel(self) -> bool:
        return self.accel_bytes > 0

    @property
    def fast_bytes(self) -> int:
        return self.accel_bytes if self.has_accel else self.ram_bytes

    @property
    def mid_bytes(self) -> int:
        return self.ram_bytes if self.has_accel else 0

    @property
    def total_bytes(self) -> int:
        return self.fast_bytes + self.mid_bytes + self.disk_bytes

    # -- compute --
    def decode_s(self, batch: int) -> float:
        """Seconds per layer for one decode step of ``batch`` sequences."""
        return interp_s(self.decode_layer_s, batch) / self.compute_speed_factor

    def prefill_s(self, prompt_len: int) -> float:
        """Seconds per layer for a ``prompt_len``-token prompt of one sequence.

        Without prefill measurements, a prompt of t tokens is costed like a decode batch of t
        single tokens (the same matrix shapes, minus attention over the prompt).
        """
        points = self.prefill_layer_s or self.decode_layer_s
        return interp_s(points, prompt_len) / self.compute_speed_factor

    def _repr_html_(self) -> str:
        return html_table(f"WorkerProfile {self.name}" + ("" if self.include else " (excluded)"), *_worker_rows([self]))


def _worker_rows(workers) -> tuple[list[str], list[list[object]]]:
    header = ["name", "address", "decode s/layer (batch→)", "prefill s/layer (tokens→)", "accel", "RAM", "disk",
              "RAM read", "disk read", "speed ×", "include"]
    rows = [[w.name, w.address, ", ".join(f"{b}: {fmt_s(t)}" for b, t in w.decode_layer_s.items()),
             ", ".join(f"{n}: {fmt_s(t)}" for n, t in w.prefill_layer_s.items()) or "(from decode)",
             fmt_bytes(w.accel_bytes), fmt_bytes(w.ram_bytes), fmt_bytes(w.disk_bytes),
             fmt_rate(w.ram_read_bytes_per_s), fmt_rate(w.disk_read_bytes_per_s), w.compute_speed_factor,
             w.include] for w in workers]
    return header, rows


# ---- links -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkProfile(_JsonValue):
    """One direction of a network path between two participants (the client included)."""

    src: str
    dst: str
    bandwidth_bytes_per_s: float
    rtt_s: float

    def __post_init__(self):
        owner = f"link {self.src}→{self.dst}"
        if self.src == self.dst:
            raise ProfileError(f"{owner}: a link joins two different participants")
        _positive(owner, bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        _non_negative(owner, rtt_s=self.rtt_s)

    @staticmethod
    def both_ways(a: str, b: str, bandwidth_bytes_per_s: float, rtt_s: float) -> tuple["LinkProfile", "LinkProfile"]:
        """A symmetric pair ``a → b`` and ``b → a``."""
        return LinkProfile(a, b, bandwidth_bytes_per_s, rtt_s), LinkProfile(b, a, bandwidth_bytes_per_s, rtt_s)


# ---- the cluster -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterProfile(_JsonValue):
    """Everything the planner needs about the machines: the model, the workers, the links."""

    model: ModelProfile
    workers: tuple[WorkerProfile, ...]
    links: tuple[LinkProfile, ...]
    client: str = "client"  # the notebook's name in ``links``

    def __post_init__(self):
        object.__setattr__(self, "workers", tuple(self.workers))
        object.__setattr__(self, "links", tuple(self.links))
        names = [w.name for w in self.workers]
        if len(set(names)) != len(names) or self.client in names:
            raise ProfileError(f"worker names must be unique and differ from the client {self.client!r}: {names}")
        known = {*names, self.client}
        pairs = [(ln.src, ln.dst) for ln in self.links]
        if len(set(pairs)) != len(pairs):
            raise ProfileError("a link (src, dst) appears twice; keep one measurement per ordered pair")
        for src, dst in pairs:
            if src not in known or dst not in known:
                raise ProfileError(f"link {src}→{dst} names an unknown participant; known: {sorted(known)}")

    @classmethod
    def from_dict(cls, d: dict) -> "ClusterProfile":
        return cls(model=ModelProfile.from_dict(d["model"]),
                   workers=tuple(WorkerProfile.from_dict(w) for w in d["workers"]),
                   links=tuple(LinkProfile.from_dict(ln) for ln in d["links"]), client=d.get("client", "client"))

    # -- lookups --
    @property
    def included(self) -> tuple[WorkerProfile, ...]:
        return tuple(w for w in self.workers if w.include)

    def worker(self, name: str) -> WorkerProfile:
        name = str(name)  # Dask names LocalCluster workers 0, 1, …; profiles name them "0", "1", …
        for w in self.workers:
            if w.name == name:
                return w
        raise ProfileError(f"no worker named {name!r}; workers: {[w.name for w in self.workers]}")

    def link(self, src: str, dst: str) -> LinkProfile | None:
        """The measured link ``src → dst``, or None when the two cannot talk directly."""
        return self._link_index.get((str(src), str(dst)))

    @cached_property  # frozen dataclasses have a __dict__; replace() makes a fresh copy
    def _link_index(self) -> dict[tuple[str, str], LinkProfile]:
        return {(ln.src, ln.dst): ln for ln in self.links}

    # -- edited copies --
    def with_worker(self, name: str, **changes) -> "ClusterProfile":
        """A copy where worker ``name`` has the given fields changed (e.g. ``include=False``)."""
        name = self.worker(name).name  # raises on an unknown name
        workers = tuple(dataclasses.replace(w, **changes) if w.name == name else w for w in self.workers)
        return dataclasses.replace(self, workers=workers)

    def with_formats(self, layer_weight_bytes: dict[str, int], decode_factor: dict[str, dict[str, float]]) -> "ClusterProfile":
        """A copy that prices quantized formats: one layer's bytes per format, and per worker name the
        format's decode time ÷ the float one (``bloombee_nb.model.quantize.measure_formats`` measures both)."""
        model = dataclasses.replace(self.model, format_weight_bytes=dict(layer_weight_bytes))
        workers = tuple(dataclasses.replace(w, format_decode_factor=dict(decode_factor.get(w.name, {})))
                        for w in self.workers)
        return dataclasses.replace(self, model=model, workers=workers)

    def with_link(self, src: str, dst: str, **changes) -> "ClusterProfile":
        """A copy with link ``src → dst`` changed, or added (then give bandwidth and RTT)."""
        src, dst = str(src), str(dst)
        old = self.link(src, dst)
        if old is None:
            if set(changes) != {"bandwidth_bytes_per_s", "rtt_s"}:
                raise ProfileError(f"there is no link {src}→{dst} yet; give bandwidth_bytes_per_s and rtt_s to add it")
            new = LinkProfile(src, dst, **changes)
            return dataclasses.replace(self, links=(*self.links, new))
        return dataclasses.replace(self, links=tuple(dataclasses.replace(ln, **changes) if ln is old else ln
                                                     for ln in self.links))

    def priced_for_chain(self) -> "ClusterProfile":
        """A copy whose stages cost what they cost when they forward to each other: each worker's
        ``step_overhead_s`` replaced by its measured ``chain_step_overhead_s`` (kept where unmeasured)."""
        return dataclasses.replace(self, workers=tuple(
            w if w.chain_step_overhead_s is None else dataclasses.replace(w, step_overhead_s=w.chain_step_overhead_s)
            for w in self.workers))

    def relayed_through_client(self) -> "ClusterProfile":
        """A copy where every worker→worker hop goes through the client (the Petals-style star).

        Hop u→v becomes u→client then client→v: RTTs add, and 1/bandwidth adds, so the one-way
        time bytes/bw + rtt/2 is exactly the sum of the two legs. The runtime relays this way
        until stages forward to each other directly.
        """
        c = self.client
        links = [ln for ln in self.links if c in (ln.src, ln.dst)]
        for u in self.workers:
            for v in self.workers:
                up, down = self.link(u.name, c), self.link(c, v.name)
                if u is not v and up is not None and down is not None:
                    links.append(LinkProfile(u.name, v.name, 1 / (1 / up.bandwidth_bytes_per_s + 1 / down.bandwidth_bytes_per_s),
                                             up.rtt_s + down.rtt_s))
        return dataclasses.replace(self, links=tuple(links))

    def added(self, *workers: WorkerProfile, links: tuple[LinkProfile, ...] = ()) -> "ClusterProfile":
        """A copy with more workers (and their links)."""
        return dataclasses.replace(self, workers=(*self.workers, *workers), links=(*self.links, *links))

    def _repr_html_(self) -> str:
        header, rows = _worker_rows(self.workers)
        link_rows = [[ln.src, ln.dst, fmt_rate(ln.bandwidth_bytes_per_s), fmt_s(ln.rtt_s)] for ln in self.links]
        return (f"<div><b>ClusterProfile</b> (client {self.client!r})" + self.model._repr_html_()
                + html_table(f"{len(self.workers)} workers", header, rows)
                + html_table(f"{len(self.links)} links", ["src", "dst", "bandwidth", "RTT"], link_rows) + "</div>")


# ---- the question asked ------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload(_JsonValue):
    """What the chain must serve, and what to optimise for it."""

    batch: int = 1                 # sequences decoded together
    prompt_len: int = 128          # tokens per prompt (prefill)
    new_tokens: int = 128          # tokens generated per sequence
    max_length: int | None = None  # KV reserved per sequence; None: prompt_len + new_tokens
    objective: str = "latency"     # "latency": least per-token time; "throughput": most tokens/s

    def __post_init__(self):
        _positive("workload", batch=self.batch, prompt_len=self.prompt_len, new_tokens=self.new_tokens)
        if self.max_length is None:
            object.__setattr__(self, "max_length", self.prompt_len + self.new_tokens)
        if self.max_length < self.prompt_len + self.new_tokens:
            raise ProfileError(f"max_length={self.max_length} cannot hold prompt_len + new_tokens = "
                               f"{self.prompt_len + self.new_tokens}; raise max_length or lower new_tokens")
        if self.objective not in OBJECTIVES:
            raise ProfileError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    @property
    def mean_context(self) -> float:
        """Average tokens in the KV cache over the decode steps: prompt_len + new_tokens/2."""
        return self.prompt_len + self.new_tokens / 2

    def _repr_html_(self) -> str:
        return html_table("Workload", ["batch", "prompt", "new tokens", "max_length", "objective"],
                          [[self.batch, self.prompt_len, self.new_tokens, self.max_length, self.objective]])

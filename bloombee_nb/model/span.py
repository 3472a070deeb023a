"""A span of decoder layers and the KV caches of the sessions that run through it.

Over 400 lines because :class:`SpanRunner` is the one stateful object of a stage: ``forward``,
``keep_path``, ``rollback`` and the offload tiers read and change the same sessions' KV, masks and
trees under one rule (a failed step leaves them as they were), easiest to check in one place.

This is the state a stage owns (DESIGN.md: "state only in the stage (span + KV)"). It is plain
torch + transformers — the Dask actor in ``cluster/stage.py`` only wraps it — so it can be tested
and benchmarked without a cluster.

Each session keeps a ``DynamicCache`` built from the *whole* model's config (so sliding/full
layer kinds line up with global layer indices; the layers outside the span stay empty) and the
2-D attention mask seen so far. Masks are built by transformers' own ``masking_utils`` with
``layer_idx`` set to the first layer of the span of that kind — without it the mask is sized
against an empty cache layer and the output is silently wrong.

Speculative decoding: a step may carry a token tree (``tree_parents``, see ``kernels/tree.py``).
Its nodes are the step's new positions. transformers builds the family's mask as for any step
(causality, padding, sliding window) and the tree-attention mask is ANDed into it; then
:meth:`SpanRunner.keep_path` compacts the KV cache to the accepted path. (Handing the tree to
``masking_utils`` as an ``and_mask_function`` gives the same mask but switches it to a vmap
construction: 4-21 ms per mask on CPU for 11-45 nodes after 10-2000 positions, against 0.1-0.2 ms.)

Offloading (``weight_offload``, ``kv_offload``; see ``offload.py``): the last
``round(weight_offload · n)`` layers are streamed from the checkpoint each step through two
resident buffers, the next one read while the current one computes; a ``kv_offload`` fraction of
each session's positions (the oldest) lives in a memory-mapped file. Outputs are bit-identical to
the fully resident span: same tensors, same modules, same ops.

Device (``device=``): the *fast tier* the span computes in — ``"auto"`` (default) picks the
worker's GPU when it has one. The resident layers, the rotary embedding, the two offload buffers,
the hot KV and the sessions' masks live there; streamed weights pass through a pinned host buffer
and cold KV stays in its host file. Inputs may come on any device and the output goes back to
the device the hidden states came on (a stage decodes frames on the CPU, so it gets CPU tensors).
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from .._kernels import TokenTree, compact_cache, tree_attention_mask
from ..errors import (SessionLengthError, SessionLimitError, ShapeMismatchError, SpanError, TreeError,
                      UnknownSessionError, UnsupportedArchitectureError)
from .checkpoint import resolve_checkpoint, weight_map
from .family import (MASK_FUNCTIONS, _prefix, _stored_dtype, alibi_function, cache_keyword, decoder_layers, kv_bytes_per_token,
                     layer_attention_types, layer_prefix, load_config, load_span, meta_model, new_rotary,
                     rotary_per_layer_type)
from .offload import WeightStreamer, check_fraction, n_offloaded, offload_kv
from .quantize import QuantizationError, check_format, quantize_layers, weight_bytes

#: Default ceiling of KV-cache bytes all sessions together may reserve on one stage.
DEFAULT_MAX_KV_BYTES = 2 << 30
DEFAULT_MAX_SESSIONS = 256
#: SDPA backends a span uses on a GPU (see ``SpanRunner._on_device``).
GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class _Session:
    batch: int
    max_length: int
    reserved_bytes: int  # KV bytes reserved in the fast tier
    cache: DynamicCache
    mask: torch.Tensor  # [batch, length] long: 1 = real token, 0 = padding
    tree: tuple[int, torch.Tensor] | None = None  # (past_len, parents [T]) when the last step was a tree
    cold_kv_bytes: int = 0  # KV bytes reserved in the slow tier (kv_offload)

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class SpanRunner:
    """Layers ``[start, end)`` of a checkpoint, runnable for many sessions.

    ``weight_offload``: fraction of the layers (the last ``round(f · n)``) kept out of memory and
    streamed from the checkpoint each step; ``offload_prefetch`` reads the next one while the
    current one computes; ``drop_page_cache`` keeps the kernel's page cache from turning the
    "disk" tier into RAM; ``offload_reader`` is ``"pread"`` (read calls straight into the buffer)
    or ``"mmap"`` (``load_tensors`` + copy). ``kv_offload``: fraction of each session's KV
    positions (the oldest) kept in a memory-mapped file (``kv_offload_dir``, default the temp dir).
    ``device``: where the span computes (see :func:`resolve_device`: ``None``/``"auto"``, ``"cpu"``,
    ``"cuda"``, ``"cuda:1"``); offloaded weights and cold KV leave that device for host RAM and disk.
    ``quantize``: store the layers' linear weights as ``"int8"`` or ``"nf4"`` (alias ``"int4"``), see
    ``quantize.py``; ``None`` keeps the checkpoint's dtype.
    """

    def __init__(self, path: str | Path, start: int, end: int, dtype: torch.dtype | None = None,
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 allow_unverified_architecture: bool = False, weight_offload: float = 0.0, kv_offload: float = 0.0,
                 offload_prefetch: bool = True, drop_page_cache: bool = True, offload_reader: str = "pread",
                 kv_offload_dir: str | None = None, device: str | torch.device | None = None,
                 quantize: str | None = None):
        self._device = resolve_device(device)
        self.quantize = check_format(quantize)
        if self.quantize and weight_offload:
            raise QuantizationError(f"quantize={quantize!r} with weight_offload={weight_offload}: offloaded layers are "
                                    "streamed as stored in the checkpoint; quantize a resident span (weight_offload=0)")
        path = resolve_checkpoint(path)  # a Hub id resolves in *this* worker's cache
        config = load_config(path, allow_unverified_architecture)
        check_fraction("kv_offload", kv_offload)
        self.weight_offload, self.kv_offload, self.kv_offload_dir = weight_offload, kv_offload, kv_offload_dir
        self.config, self.layers, self.rotary, self.dtype, self.streamer = _load(
            path, config, start, end, dtype, n_offloaded(weight_offload, end - start),
            dict(prefetch=offload_prefetch, drop_page_cache=drop_page_cache, reader=offload_reader), self._device)
        quantize_layers(self.layers, self.quantize, self.dtype)
        self.start, self.end = start, end
        self.hidden_size = self.config.hidden_size
        self.max_kv_bytes, self.max_sessions = max_kv_bytes, max_sessions
        self.kv_bytes_per_token = kv_bytes_per_token(self.config, end - start, self.dtype)
        kinds = layer_attention_types(self.config)
        self.layer_kinds = kinds[start:end]
        # mask kind -> global index of the first layer of that kind in this span
        self.mask_layer_idx = {k: start + self.layer_kinds.index(k) for k in dict.fromkeys(self.layer_kinds)}
        self.cache_keyword = cache_keyword(self.layers[0])  # read from the family's decoder-layer class
        self._layer_params = inspect.signature(self.layers[0].forward).parameters
        self.rotary_per_kind = self.rotary is not None and rotary_per_layer_type(self.rotary)
        self.alibi = alibi_function(self.config, self.layers[0])  # BLOOM: the family's own ALiBi builder
        self.offloaded_weight_bytes = sum(self.streamer.layer_bytes) if self.streamer else 0
        self.weight_bytes = self.offloaded_weight_bytes + weight_bytes(self.layers)  # quantized: as stored
        self.sessions: dict[str, _Session] = {}

    @property
    def device(self) -> torch.device:
        """Where the span computes (its fast tier), e.g. ``cuda:0`` or ``cpu``."""
        return self._device

    # ---- sessions ---------------------------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        return sum(s.reserved_bytes for s in self.sessions.values())

    def open(self, session_id: str, batch: int, max_length: int) -> None:
        if session_id in self.sessions:
            raise SessionLimitError(f"session {session_id!r} is already open on layers {self.span}; use a new id")
        if batch < 1 or max_length < 1:
            raise ShapeMismatchError(f"batch ({batch}) and max_length ({max_length}) must be positive")
        if len(self.sessions) >= self.max_sessions:
            raise SessionLimitError(
                f"layers {self.span} already serve {len(self.sessions)} sessions (limit {self.max_sessions}); "
                "close finished sessions or add workers")
        cache = DynamicCache(config=self.config)
        n_cold = offload_kv(cache, self.start, self.end, self.kv_offload, max_length, self.kv_offload_dir)
        cold = batch * int(self.kv_offload * max_length) * n_cold * self.kv_bytes_per_token // (self.end - self.start)
        need = batch * max_length * self.kv_bytes_per_token - cold  # the fast tier's share
        if self.reserved_bytes + need > self.max_kv_bytes:
            raise SessionLimitError(
                f"layers {self.span} cannot reserve {need / 2**20:.1f} MiB of KV cache for batch {batch} x "
                f"max_length {max_length}: {self.reserved_bytes / 2**20:.1f} of {self.max_kv_bytes / 2**20:.1f} MiB "
                "are taken; lower max_length or batch, close sessions, or add workers")
        self.sessions[session_id] = _Session(batch, max_length, need, cache,
                                             torch.zeros(batch, 0, dtype=torch.long, device=self._device),
                                             cold_kv_bytes=cold)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)  # closing twice is harmless

    def rollback(self, session_id: str, length: int) -> None:
        """Keep only the first ``length`` positions of the session's KV cache (speculation, retries)."""
        s = self._get(session_id)
        if not 0 <= length <= s.length:
            raise SessionLengthError(f"cannot roll session {session_id!r} back to {length}: it holds {s.length} positions")
        window = getattr(self.config, "sliding_window", None)
        if length < s.length and "sliding_attention" in self.layer_kinds and s.length >= window:
            raise SessionLengthError(
                f"layers {self.span} use sliding-window attention (window {window}) and session {session_id!r} "
                f"holds {s.length} positions: those layers keep only the last {window - 1}, so it cannot roll back "
                "to an earlier position; start a new session from that position's tokens")
        if length < s.length:
            self._crop(s, length)
            s.mask = s.mask[:, :length]

    def _get(self, session_id: str) -> _Session:
        try:
            s = self.sessions[session_id]
        except KeyError:
            raise UnknownSessionError(
                f"session {session_id!r} is not open on layers {self.span} (never opened, closed, or lost when "
                "the worker restarted); open a new inference session") from None
        return s

    @property
    def span(self) -> str:
        return f"[{self.start}, {self.end})"

    # ---- compute ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, session_id: str, hidden: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, tree_parents: torch.Tensor | None = None) -> torch.Tensor:
        """Run the span on ``hidden [B, T, D]`` at ``position_ids [B, T]``.

        ``attention_mask [B, T]`` holds the mask columns of the *new* positions only; the stage
        remembers the earlier ones. Everything is validated before any state changes.

        ``tree_parents [T]`` (int64, optional) makes the new positions a token tree, node 0 its root:
        each node attends to the past, its ancestors and itself, and ``position_ids`` must be the
        root's position plus each node's depth (``_kernels.tree_position_ids``). Follow it with
        :meth:`keep_path` (or :meth:`rollback`) before the next step.

        Inputs may be on any device; they are moved to :attr:`device` and the output comes back on
        the device of ``hidden``.
        """
        s = self._get(session_id)
        self._check_step(s, session_id, hidden, position_ids, attention_mask, tree_parents)
        if tree_parents is not None:
            tree_parents = tree_parents.cpu()  # checked and turned into a mask on the host: a few tiny ops
            self._check_tree(s, tree_parents, position_ids)
        out_device, dev = hidden.device, self._device
        hidden, position_ids = hidden.to(dev), position_ids.to(dev)
        mask = torch.cat([s.mask, attention_mask.to(dev, torch.long)], dim=1)
        try:
            with self._on_device():
                out = self._run(s, hidden, position_ids, mask, tree_parents)
        except Exception:
            self._crop(s, s.length)  # a failed step must leave the KV cache as it was
            raise
        s.tree = None if tree_parents is None else (s.length, tree_parents.clone())
        s.mask = mask
        return out.to(out_device)

    def _check_step(self, s: _Session, session_id: str, hidden: torch.Tensor, position_ids: torch.Tensor,
                    attention_mask: torch.Tensor, tree_parents: torch.Tensor | None) -> None:
        """A step's shapes, dtypes and length against the span and the session (the tree itself:
        :meth:`_check_tree`); raises before anything changes."""
        B, T = s.batch, (hidden.shape[1] if hidden.dim() == 3 else -1)
        if hidden.dim() != 3 or hidden.shape[0] != B or hidden.shape[2] != self.hidden_size or T < 1:
            raise ShapeMismatchError(
                f"layers {self.span} expect hidden states [batch={B}, tokens>=1, hidden={self.hidden_size}], "
                f"got {list(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise ShapeMismatchError(f"layers {self.span} run in {self.dtype}, got hidden states in {hidden.dtype}")
        if tuple(position_ids.shape) != (B, T) or position_ids.dtype != torch.long:
            raise ShapeMismatchError(f"position_ids must be int64 [{B}, {T}], got {position_ids.dtype} {list(position_ids.shape)}")
        if tuple(attention_mask.shape) != (B, T):
            raise ShapeMismatchError(f"attention_mask must be [{B}, {T}] (new positions only), got {list(attention_mask.shape)}")
        if s.length + T > s.max_length:
            raise SessionLengthError(
                f"session {session_id!r} reserved max_length={s.max_length} but this step reaches "
                f"{s.length + T}; open the session with a larger max_length")
        if tree_parents is not None and self.alibi is not None:
            raise TreeError(f"layers {self.span} use ALiBi ({self.config.model_type}), whose bias follows the "
                            "mask's token count, not a tree's depths: token-tree speculation is not supported for "
                            "this family; generate without assistant_model")

    def _on_device(self):
        """Make :attr:`device` the current CUDA device while the span computes (``cuda:1`` included),
        with SDPA's cuDNN backend left out: it builds a new plan for every new key length, which
        a decode step always has (measured on an H100: 4.2 ms of CPU per attention call, a decode
        step of 8 layers 39 ms against 6 ms for transformers' own model, which takes another backend)."""
        if self._device.type != "cuda":
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(torch.cuda.device(self._device))
        stack.enter_context(sdpa_kernel(GPU_SDPA_BACKENDS))
        return stack

    def _check_tree(self, s: _Session, parents: torch.Tensor, position_ids: torch.Tensor) -> None:
        T = position_ids.shape[1]
        if parents.dtype != torch.long or tuple(parents.shape) != (T,):
            raise ShapeMismatchError(f"tree_parents must be int64 [{T}] (one parent per new position), "
                                     f"got {parents.dtype} {list(parents.shape)}")
        try:
            tree = TokenTree(None, parents)  # the one tree type, the client's too: it checks the shape
        except ValueError as e:
            raise TreeError(f"tree_parents do not form a token tree: {e}. Flatten the tree breadth-first "
                            "(bloombee_nb._kernels.TokenTree / branching_parents)") from None
        depth = tree.depths().to(position_ids.device)
        if not torch.equal(position_ids - position_ids[:, :1], depth.expand_as(position_ids)):
            raise TreeError(f"position_ids of a tree step must be the root's position plus each node's depth "
                            f"{depth.tolist()}, got {position_ids.tolist()}; build them with "
                            "bloombee_nb._kernels.tree_position_ids")
        window = getattr(self.config, "sliding_window", None)
        if "sliding_attention" in self.layer_kinds and s.length + T >= window:
            raise SessionLengthError(
                f"layers {self.span} use sliding-window attention (window {window}): a tree step can only run while "
                f"the session plus the tree stay under the window ({s.length} + {T} >= {window}); "
                "decode without speculation from here on")

    def _run(self, s: _Session, hidden, position_ids, mask, tree_parents=None):
        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=s.cache, position_ids=position_ids)
        masks = {kind: MASK_FUNCTIONS[kind](**kw, layer_idx=idx) for kind, idx in self.mask_layer_idx.items()}
        if tree_parents is not None:
            allowed = tree_attention_mask(tree_parents, s.length).to(hidden.device)  # [T, past + T]
            masks = {kind: _and_tree(m, allowed, s.batch) for kind, m in masks.items()}
        with self._layers() as layers:
            return self.run_layers(layers, hidden, position_ids, masks, s.cache, mask)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """Layer kind -> the family's rotary (cos, sin) for these positions: one table for every kind,
        or one per kind where the family's rotary module takes a ``layer_type`` (Gemma 3)."""
        if self.rotary is None:  # ALiBi
            return dict.fromkeys(self.mask_layer_idx)
        if self.rotary_per_kind:
            return {k: self.rotary(hidden, position_ids, k) for k in self.mask_layer_idx}
        pos = self.rotary(hidden, position_ids)
        return dict.fromkeys(self.mask_layer_idx, pos)

    def run_layers(self, layers, hidden: torch.Tensor, position_ids: torch.Tensor, masks: dict, cache,
                   mask_2d: torch.Tensor | None = None) -> torch.Tensor:
        """``layers`` (this span's, materialised) on ``hidden [B, T, D]``, each with its kind's mask.
        ALiBi families (BLOOM) take their bias from ``mask_2d [B, past + T]``, as their model does."""
        pos = self.position_embeddings(hidden, position_ids)
        kw = {self.cache_keyword: cache, "use_cache": True}
        if "position_ids" in self._layer_params:
            kw["position_ids"] = position_ids
        if self.alibi is not None:
            kw["alibi"] = self.alibi(mask_2d, self.config.num_attention_heads, dtype=hidden.dtype)
        for layer, kind in zip(layers, self.layer_kinds):
            if pos[kind] is not None:
                kw["position_embeddings"] = pos[kind]
            hidden = layer(hidden, attention_mask=masks[kind], **kw)
            if isinstance(hidden, tuple):  # Falcon and BLOOM layers still return (hidden, …)
                hidden = hidden[0]
        return hidden

    def _layers(self):
        """The span's layers for one step: offloaded ones are filled from the checkpoint as they come."""
        return self.streamer.run(list(self.layers)) if self.streamer else nullcontext(self.layers)

    @torch.inference_mode()
    def keep_path(self, session_id: str, past_len: int, keep) -> None:
        """After a tree step that started at ``past_len``, keep only the accepted path's KV entries.

        ``keep``: the path's tree node indices, root first — ``[K]`` for every row, or ``[B, K]`` per
        row, right-padded with -1 where a row accepted fewer (those slots become padding, so that
        row's next position is its own position count plus what it accepted). Lists or tensors.
        Afterwards the session holds ``past_len + K`` positions, compacted in place.
        """
        s = self._get(session_id)
        keep = self._check_path(s, session_id, past_len, keep)  # [B, K], -1 padded
        keep = keep.to(self._device)  # index tensors live with the cache they index
        cols = s.mask[:, past_len:].gather(1, keep.clamp(min=0)) * (keep >= 0)  # [B, K] new mask columns
        try:  # the routine the client's draft runs on its own cache too (offloaded KV layers compact themselves)
            compact_cache(s.cache.layers[self.start:self.end], past_len, keep)
        except Exception:  # cannot happen after the checks above; if it does, never leave layers that disagree
            self._crop(s, past_len)
            s.mask, s.tree = s.mask[:, :past_len], None
            raise
        s.mask, s.tree = torch.cat([s.mask[:, :past_len], cols], 1), None

    def _check_path(self, s: _Session, session_id: str, past_len: int, keep) -> torch.Tensor:
        if s.tree is None or s.length != s.tree[0] + s.tree[1].numel():
            raise TreeError(f"session {session_id!r} on layers {self.span} has no tree step to keep a path of (the "
                            "last step was linear, rolled back, or already kept); run forward(..., tree_parents=...) first")
        tree_past, parents = s.tree
        if past_len != tree_past:
            raise TreeError(f"the last tree step of session {session_id!r} started at position {tree_past}, not "
                            f"{past_len}; pass the session's length from before the tree step")
        try:
            keep = torch.as_tensor(keep, dtype=torch.long).cpu()
        except (ValueError, TypeError, RuntimeError):
            raise TreeError("keep must be node indices [K], or one equal-length list per row (pad with -1)") from None
        B, T = s.batch, parents.numel()
        if keep.dim() == 1:
            keep = keep.expand(B, -1)
        if keep.dim() != 2 or keep.shape[0] != B or not 1 <= keep.shape[1] <= T:
            raise TreeError(f"keep must be [K] or [{B}, K] node indices with 1 <= K <= {T} (the tree's size), "
                            f"got shape {list(keep.shape)}")
        if ((keep < -1) | (keep >= T)).any():
            raise TreeError(f"keep holds indices outside the tree's nodes [0, {T}): {keep.tolist()} "
                            "(-1 pads a row that accepted fewer)")
        p = parents.tolist()
        for b, row in enumerate(keep.tolist()):
            n = row.index(-1) if -1 in row else len(row)
            if n == 0 or row[0] != 0 or any(x != -1 for x in row[n:]) or any(p[row[j]] != row[j - 1] for j in range(1, n)):
                raise TreeError(f"row {b} keeps {row}, which is not a root-first path of the tree: node 0, then a "
                                "child of the node before, with -1 padding only at the end")
        return keep

    def _crop(self, s: _Session, length: int) -> None:
        """Keep ``length`` positions in this span's cache layers (the others belong to other stages)."""
        for layer in s.cache.layers[self.start:self.end]:
            if layer.is_initialized and layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())  # negative = positions to drop

    def info(self) -> dict:
        """The span and its memory, split by tier. Fast tier (``fast_tier``, the compute device):
        ``resident_weight_bytes``, ``offload_buffer_bytes``, ``reserved_kv_bytes``. Host RAM / disk:
        ``offloaded_weight_bytes`` (read from the checkpoint each step), ``offload_staging_bytes``
        (pinned, with an accelerator), ``cold_kv_bytes``."""
        return {"start": self.start, "end": self.end, "dtype": str(self.dtype).removeprefix("torch."),
                "quantize": self.quantize,
                "fast_tier": str(self._device),
                "weight_bytes": self.weight_bytes, "sessions": len(self.sessions),
                "resident_weight_bytes": self.weight_bytes - self.offloaded_weight_bytes,
                "reserved_kv_bytes": self.reserved_bytes, "max_kv_bytes": self.max_kv_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token,
                "weight_offload": self.weight_offload, "offloaded_weight_bytes": self.offloaded_weight_bytes,
                "offload_buffer_bytes": self.streamer.buffer_bytes if self.streamer else 0,
                "offload_staging_bytes": self.streamer.staging_bytes if self.streamer else 0,
                "kv_offload": self.kv_offload, "cold_kv_bytes": sum(s.cold_kv_bytes for s in self.sessions.values())}

    def release(self) -> None:
        """Stop the offload reader thread (the runner is being dropped)."""
        if self.streamer:
            self.streamer.close()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Where a span computes: ``None``/``"auto"`` = this worker's GPU (``cuda``) if it has one, else
    the CPU; ``"cpu"``, ``"cuda"`` (the current GPU) or ``"cuda:1"`` explicitly. CUDA devices come
    back with their index (``cuda:0``)."""
    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpanError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise SpanError(f"spans run on 'cpu' or a CUDA device, got {device!r}")
    if not torch.cuda.is_available():
        raise SpanError(f"device {device!r} was asked for, but this worker sees no CUDA GPU (torch "
                        f"{torch.__version__}, CUDA build {torch.version.cuda}); pass device='cpu' or 'auto'")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise SpanError(f"device {device!r}: this worker has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def _load(path: Path, config, start: int, end: int, dtype, n_off: int, streamer_kw: dict,
          device: torch.device = torch.device("cpu")):
    """``load_span`` for the resident layers ``[start, end - n_off)`` (on ``device``); the last ``n_off``
    stay meta shells of the same meta model family, streamed by a :class:`WeightStreamer` into buffers
    on ``device``."""
    if n_off == 0 or not 0 <= start < end <= config.num_hidden_layers:  # load_span reports a bad span
        return (*load_span(path, config, start, end, dtype, device), None)
    model = meta_model(config)
    wmap = weight_map(path)
    dtype = dtype or _stored_dtype(path, wmap, config)
    config, resident, rotary = model.config, [], new_rotary(model, device)
    if n_off < end - start:
        config, resident, rotary, dtype = load_span(path, config, start, end - n_off, dtype, device)
    prefix = _prefix(model, wmap)
    shells = {layer_prefix(model, prefix, i): decoder_layers(model)[i].eval() for i in range(end - n_off, end)}
    converted = [p + k for p, m in shells.items() for k in m.state_dict() if p + k not in wmap]
    if converted:  # e.g. Mixtral's experts: one tensor per expert on disk, fused by transformers on load
        raise UnsupportedArchitectureError(
            f"weight_offload streams layers tensor by tensor from the checkpoint, but {path} stores "
            f"{converted[0]} in another layout (transformers converts it on load); run this span with "
            "weight_offload=0 (kv_offload still works)")
    streamer = WeightStreamer(path, wmap, shells, dtype, device=device, **streamer_kw)
    return config, nn.ModuleList([*resident, *shells.values()]).eval(), rotary, dtype, streamer


def _and_tree(mask: torch.Tensor | None, allowed: torch.Tensor, batch: int) -> torch.Tensor:
    """The family's 4-D mask ``[B, 1, T, past + T]`` restricted to ``allowed [T, past + T]`` (the tree).

    Parents come before their children, so the tree mask is causal by itself: where transformers
    skipped the mask (``None``: SDPA's causal fast path, no padding), the tree mask is the whole mask.
    """
    if mask is None:
        return allowed.expand(batch, 1, *allowed.shape)
    if not isinstance(mask, torch.Tensor) or mask.shape[-2:] != allowed.shape:
        raise ShapeMismatchError(f"cannot apply a token tree to a {type(mask).__name__} attention mask "
                                 f"{list(getattr(mask, 'shape', []))}; tree steps need the sdpa or eager attention")
    if mask.dtype == torch.bool:  # sdpa: True = attend
        return mask & allowed
    return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)  # eager: additive

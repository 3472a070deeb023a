"""A span of decoder layers and the KV caches of the sessions that run through it.

This is the state a stage owns (DESIGN.md: "state only in the stage (span + KV)"). It is plain
torch + transformers — the Dask actor in ``cluster/stage.py`` only wraps it — so it can be tested
and benchmarked without a cluster.

Each session keeps a ``DynamicCache`` built from the *whole* model's config (so sliding/full
layer kinds line up with global layer indices; the layers outside the span stay empty) and the
2-D attention mask seen so far. Masks are built by transformers' own ``masking_utils`` with
``layer_idx`` set to the first layer of the span of that kind — without it the mask is sized
against an empty cache layer and the output is silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from ..errors import SessionLengthError, SessionLimitError, ShapeMismatchError, UnknownSessionError
from .checkpoint import resolve_checkpoint
from .family import MASK_FUNCTIONS, kv_bytes_per_token, layer_attention_types, load_config, load_span

#: Default ceiling of KV-cache bytes all sessions together may reserve on one stage.
DEFAULT_MAX_KV_BYTES = 2 << 30
DEFAULT_MAX_SESSIONS = 256


@dataclass
class _Session:
    batch: int
    max_length: int
    reserved_bytes: int
    cache: DynamicCache
    mask: torch.Tensor  # [batch, length] long: 1 = real token, 0 = padding

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class SpanRunner:
    """Layers ``[start, end)`` of a checkpoint, runnable for many sessions."""

    def __init__(self, path: str | Path, start: int, end: int, dtype: torch.dtype | None = None,
                 max_kv_bytes: int = DEFAULT_MAX_KV_BYTES, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 allow_unverified_architecture: bool = False):
        path = resolve_checkpoint(path)  # a Hub id resolves in *this* worker's cache
        config = load_config(path, allow_unverified_architecture)
        self.config, self.layers, self.rotary, self.dtype = load_span(path, config, start, end, dtype)
        self.start, self.end = start, end
        self.hidden_size = self.config.hidden_size
        self.max_kv_bytes, self.max_sessions = max_kv_bytes, max_sessions
        self.kv_bytes_per_token = kv_bytes_per_token(self.config, end - start, self.dtype)
        kinds = layer_attention_types(self.config)
        self.layer_kinds = kinds[start:end]
        # mask kind -> global index of the first layer of that kind in this span
        self.mask_layer_idx = {k: start + self.layer_kinds.index(k) for k in dict.fromkeys(self.layer_kinds)}
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.layers.parameters())
        self.sessions: dict[str, _Session] = {}

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
        need = batch * max_length * self.kv_bytes_per_token
        if self.reserved_bytes + need > self.max_kv_bytes:
            raise SessionLimitError(
                f"layers {self.span} cannot reserve {need / 2**20:.1f} MiB of KV cache for batch {batch} x "
                f"max_length {max_length}: {self.reserved_bytes / 2**20:.1f} of {self.max_kv_bytes / 2**20:.1f} MiB "
                "are taken; lower max_length or batch, close sessions, or add workers")
        cache = DynamicCache(config=self.config)
        self.sessions[session_id] = _Session(batch, max_length, need, cache, torch.zeros(batch, 0, dtype=torch.long))

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)  # closing twice is harmless

    def rollback(self, session_id: str, length: int) -> None:
        """Keep only the first ``length`` positions of the session's KV cache (speculation, retries)."""
        s = self._get(session_id)
        if not 0 <= length <= s.length:
            raise SessionLengthError(f"cannot roll session {session_id!r} back to {length}: it holds {s.length} positions")
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
                attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the span on ``hidden [B, T, D]`` at ``position_ids [B, T]``.

        ``attention_mask [B, T]`` holds the mask columns of the *new* positions only; the stage
        remembers the earlier ones. Everything is validated before any state changes.
        """
        s = self._get(session_id)
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
        mask = torch.cat([s.mask, attention_mask.to(torch.long)], dim=1)
        try:
            out = self._run(s, hidden, position_ids, mask)
        except Exception:
            self._crop(s, s.length)  # a failed step must leave the KV cache as it was
            raise
        s.mask = mask
        return out

    def _run(self, s: _Session, hidden, position_ids, mask):
        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=s.cache, position_ids=position_ids)
        masks = {kind: MASK_FUNCTIONS[kind](**kw, layer_idx=idx) for kind, idx in self.mask_layer_idx.items()}
        pos_emb = self.rotary(hidden, position_ids)
        for layer, kind in zip(self.layers, self.layer_kinds):
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids,
                           cache=s.cache, use_cache=True, position_embeddings=pos_emb)
        return hidden

    def _crop(self, s: _Session, length: int) -> None:
        """Keep ``length`` positions in this span's cache layers (the others belong to other stages)."""
        for layer in s.cache.layers[self.start:self.end]:
            if layer.is_initialized and layer.get_seq_length() > length:
                layer.crop(length - layer.get_seq_length())  # negative = positions to drop

    def info(self) -> dict:
        return {"start": self.start, "end": self.end, "dtype": str(self.dtype).removeprefix("torch."),
                "weight_bytes": self.weight_bytes, "sessions": len(self.sessions),
                "reserved_kv_bytes": self.reserved_bytes, "max_kv_bytes": self.max_kv_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token}

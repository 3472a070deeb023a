"""One forward for the steps of several sessions: what a stage does with decode steps that arrive together.

Sessions hold their own ``DynamicCache`` of their own length, so their steps cannot simply be
stacked: the keys and values each row attends to differ in length. Everything else in a decoder
layer — the projections, the rotary embedding, the MLP, the norms — is row-wise, and those are the
matrix products that cost. So a merged step stacks the sessions' hidden states ``[ΣBᵢ, T, D]``
and runs the family's own decoder layers once, and only attention is split per session:

- the layer's ``cache.update(k, v, layer_idx)`` goes to :class:`_MergedCache`, which hands each
  session's rows to that session's own cache (the very call an unmerged step makes) and returns
  the per-session keys/values as a :class:`Ragged` list;
- attention runs through transformers' ``AttentionInterface`` under our registered name
  (``"bloombee_merged"``), which calls the span's own attention function (sdpa or eager) once per
  session, on that session's queries, keys, values and its own mask — built by ``masking_utils``
  exactly as for an unmerged step.

No KV is copied or padded. Attention per session is the same call on the same tensors as an
unmerged step; the row-wise products run on more rows, which on CPU can change the last bits of
a float (the BLAS kernel's blocking depends on the row count), not the tokens in practice: the
tests compare greedy tokens with transformers'.

Only plain steps of one length ``T`` merge (no token tree, no kept path pending); anything else
runs alone (``SpanRunner.forward``).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .family import MASK_FUNCTIONS

MERGED_ATTENTION = "bloombee_merged"


class Ragged(list):
    """Per-session tensors (keys, values or masks) standing where a layer expects one batched tensor."""

    def __init__(self, items, base: str = "sdpa"):
        super().__init__(items)
        self.base = base  # the attention implementation each session's part runs with


def merged_attention(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` entry: attention of each session's rows against its own cache."""
    if not isinstance(key, Ragged):  # not a merged step: exactly the span's own attention
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    attend = ALL_ATTENTION_FUNCTIONS[key.base] if key.base in ALL_ATTENTION_FUNCTIONS else _eager(module)
    outs, row = [], 0
    for k, v, m in zip(key, value, attention_mask):
        b = k.shape[0]
        outs.append(attend(module, query[row:row + b], k, v, m, **kwargs)[0])
        row += b
    return torch.cat(outs, dim=0), None


def _eager(module):
    """The family's own eager attention, from the module that defines its attention class (Gemma 2's
    soft-caps the scores; Llama's would silently drop that)."""
    own = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if own is not None:
        return own
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


AttentionInterface.register(MERGED_ATTENTION, merged_attention)


class _MergedCache:
    """What the layers see as ``cache`` in a merged step: each session's rows go to its own cache."""

    def __init__(self, caches: list, rows: list[int], base: str):
        self.caches, self.rows, self.base = caches, rows, base

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values, r = [], [], 0
        for cache, b in zip(self.caches, self.rows):
            k, v = cache.update(key_states[r:r + b], value_states[r:r + b], layer_idx, *args, **kwargs)
            keys.append(k)
            values.append(v)
            r += b
        return Ragged(keys, self.base), Ragged(values, self.base)


@dataclass
class MergeItem:
    """One session's plain step, validated: what :func:`forward_merged` runs together."""

    session: object             # span._Session
    hidden: torch.Tensor        # [B, T, D]
    position_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor          # [B, past + T] 2-D mask with the new columns appended


@contextmanager
def _attention(config):
    """Run the span's layers with the merged attention for the duration of one step."""
    base = config._attn_implementation
    config._attn_implementation = MERGED_ATTENTION
    try:
        yield base
    finally:
        config._attn_implementation = base


def forward_merged(runner, items: list[MergeItem]) -> list[torch.Tensor]:
    """Run ``items`` (steps of distinct sessions, all the same T) through ``runner``'s layers at
    once; returns each item's output ``[Bᵢ, T, D]``. The caller updates the sessions' masks."""
    config = runner.config
    masks = {}
    for kind, idx in runner.mask_layer_idx.items():  # each session's own mask, as an unmerged step builds it
        masks[kind] = [MASK_FUNCTIONS[kind](config=config, inputs_embeds=it.hidden, attention_mask=it.mask,
                                            cache=it.session.cache, position_ids=it.position_ids, layer_idx=idx)
                       for it in items]
    hidden = torch.cat([it.hidden for it in items], dim=0)
    position_ids = torch.cat([it.position_ids for it in items], dim=0)
    rows = [it.hidden.shape[0] for it in items]
    with _attention(config) as base, runner._layers() as layers:
        cache = _MergedCache([it.session.cache for it in items], rows, base)
        ragged = {kind: Ragged(m, base) for kind, m in masks.items()}
        hidden = runner.run_layers(layers, hidden, position_ids, ragged, cache)
    return list(hidden.split(rows, dim=0))


def forward_many(runner, steps: list[tuple]) -> list:
    """Steps ``(session_id, hidden [B, T, D], position_ids [B, T], attention_mask [B, T])`` of
    distinct sessions on one span, run together where they can be (same T, valid, no tree
    pending) and alone otherwise. Returns each step's output, or the exception it raised — a bad
    step fails alone and every other step still runs."""
    results: list = [None] * len(steps)
    by_len: dict[int, list[int]] = {}
    seen: set[str] = set()
    for i, (sid, h, p, m) in enumerate(steps):
        s = runner.sessions.get(sid)
        if s is not None and sid not in seen and _mergeable(runner, s, h, p, m):
            by_len.setdefault(h.shape[1], []).append(i)
            seen.add(sid)
        else:
            results[i] = _alone(runner, steps[i])
    for group in by_len.values():
        if len(group) == 1:
            results[group[0]] = _alone(runner, steps[group[0]])
            continue
        for i, out in zip(group, _merged(runner, [steps[i] for i in group])):
            results[i] = out
    return results


def _merged(runner, steps: list[tuple]) -> list:
    device = getattr(runner, "device", None)
    items = []
    for sid, h, p, m in steps:
        s = runner.sessions[sid]
        h, p, m = (x.to(device) if device is not None else x for x in (h, p, m))
        items.append(MergeItem(s, h, p, torch.cat([s.mask.to(m.device), m.to(torch.long)], dim=1)))
    try:
        with torch.inference_mode(), runner._on_device():
            outs = forward_merged(runner, items)
    except Exception:  # noqa: BLE001 — find the step at fault: each runs alone, and only it fails
        for it in items:
            runner._crop(it.session, it.session.length)
        return [_alone(runner, st) for st in steps]
    for it in items:
        it.session.mask, it.session.tree = it.mask.to(it.session.mask.device), None
    return [o.to(h.device) for o, (_, h, _, _) in zip(outs, steps)]


def _alone(runner, step: tuple):
    try:
        return runner.forward(*step)
    except Exception as exc:  # noqa: BLE001 — returned to the step's caller, typed as raised
        return exc


def _mergeable(runner, s, h: torch.Tensor, p: torch.Tensor, m: torch.Tensor) -> bool:
    """True when ``SpanRunner.forward`` would accept the step as a plain one (else it runs alone,
    where forward raises the typed error that says what is wrong)."""
    return (getattr(runner, "alibi", None) is None  # ALiBi (BLOOM) builds its bias from one session's mask
            and h.dim() == 3 and h.shape[0] == s.batch and h.shape[1] >= 1 and h.shape[2] == runner.hidden_size
            and h.dtype == runner.dtype and p.dtype == torch.long and tuple(p.shape) == tuple(h.shape[:2])
            and tuple(m.shape) == tuple(h.shape[:2]) and s.length + h.shape[1] <= s.max_length)

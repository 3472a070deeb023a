"""The draft model's side of speculative decoding: loading and checking a draft, and its KV
cache kept position for position like the session's on the stages (:class:`DraftMirror`).

The loop (``speculative.py``) grows each round's tree a level at a time through
:meth:`DraftMirror.level` and keeps the accepted path with :meth:`DraftMirror.keep_path`, which
runs the stages' own compaction (``bloombee_nb._kernels.compact_cache``) on the draft's cache.
"""

from __future__ import annotations

import time
from collections import deque
from functools import lru_cache

import torch
from transformers import DynamicCache

from .._kernels import compact_cache
from ..errors import DraftModelError


def default_draft_path() -> str:
    from ..shipped import DRAFT_PATH

    return str(DRAFT_PATH)


@lru_cache(maxsize=4)
def load_draft(path: str | None = None):
    """A draft model (default: the shipped ``tiny-llama-draft``), loaded once per path, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path or default_draft_path()).eval()


def check_draft(model, draft, tokenizer=None, draft_tokenizer=None) -> None:
    """Raise :class:`DraftModelError` unless ``draft`` can propose tokens ``model`` verifies."""
    if not callable(draft) or not hasattr(getattr(draft, "config", None), "vocab_size"):
        raise DraftModelError(f"assistant_model must be a causal LM (e.g. AutoModelForCausalLM.from_pretrained(...)), "
                              f"got {type(draft).__name__}")
    ours, theirs = model.config.vocab_size, draft.config.vocab_size
    if ours != theirs:
        raise DraftModelError(
            f"the draft model's vocabulary ({theirs} tokens) differs from the target's ({ours}): speculative decoding "
            "compares token ids, so the draft must use the target's tokenizer. Pick a smaller model of the same "
            "family (for the shipped model: bloombee_nb.shipped.DRAFT_PATH)")
    if tokenizer is not None and draft_tokenizer is not None and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        raise DraftModelError("the draft's tokenizer maps tokens to different ids than the target's; speculative "
                              "decoding needs one shared tokenizer (different tokenizers are not supported)")


class DraftMirror:
    """The draft model's KV cache, kept position for position like the session's on the stages.

    It holds what the session holds (plus the root while a tree is drafted). Tokens the target
    decodes without a tree wait in ``pending`` and enter the draft's cache with the next tree.
    """

    def __init__(self, draft, batch: int):
        self.model, self.batch = draft, batch
        self.cache = DynamicCache(config=draft.config)
        self.mask = torch.zeros(batch, 0, dtype=torch.long)  # [B, L]: 1 = real token, as on the stages
        self.pending = (torch.zeros(batch, 0, dtype=torch.long),) * 3  # tokens, mask, positions [B, m]
        self.dtype = next(draft.parameters()).dtype
        self.timings: deque[tuple[int, float]] = deque(maxlen=64)  # (nodes per row, seconds) per forward

    def append(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        """Tokens ``[B, m]`` the session took without the draft (prompt, plain steps)."""
        new = (tokens, mask, positions)
        self.pending = tuple(torch.cat([a, b.to(torch.long)], 1) for a, b in zip(self.pending, new))

    def start(self, root: torch.Tensor, root_pos: torch.Tensor) -> torch.Tensor:
        """Catch up on pending tokens and run the root: its logits ``[B, 1, V]`` (depth 0 of the tree)."""
        toks, mask, pos = self.pending
        mask2d = torch.cat([self.mask, mask, torch.ones(self.batch, 1, dtype=torch.long)], 1)
        logits = self._forward(torch.cat([toks, root[:, None]], 1), mask2d, torch.cat([pos, root_pos[:, None]], 1))
        self.mask = mask2d[:, :-1]  # the root is node 0 of the tree, not history
        self.pending = (torch.zeros(self.batch, 0, dtype=torch.long),) * 3
        return logits[:, -1:]

    def level(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Run one level of the tree: ``tokens [B, n]``; ``allowed [n, nodes so far]`` (tree attention)."""
        B, n = tokens.shape
        see = torch.cat([self.mask.bool()[:, None, :].expand(B, n, -1), allowed.expand(B, n, -1)], -1)  # [B, n, L+N]
        additive = torch.zeros(see.shape, dtype=self.dtype).masked_fill_(~see, torch.finfo(self.dtype).min)
        return self._forward(tokens, additive[:, None], positions)

    def _forward(self, tokens, mask, positions) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                         use_cache=True).logits
        self.timings.append((tokens.shape[1], time.perf_counter() - t0))
        return out

    def keep_path(self, keep: torch.Tensor) -> None:
        """Keep the accepted paths ``[B, K]`` (-1 padded) of the tree drafted on top of ``self.mask``:
        the same compaction the stages run on the session's cache."""
        compact_cache(self.cache.layers, self.mask.shape[1], keep)
        self.mask = torch.cat([self.mask, (keep >= 0).to(torch.long)], 1)

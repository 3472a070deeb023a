"""Hot compute kernels, each with a pure-torch reference (DESIGN.md, ``kernels/``).

This directory installs as ``bloombee_nb._kernels`` (package-dir mapping in pyproject.toml): a
top-level ``kernels`` would clash with a PyPI package. Import it by that name, and keep imports
inside it relative; it depends on torch only.

- :mod:`.tree` — token trees for speculative decoding: tree-attention mask, position ids.
- :mod:`.kv` — KV compaction to the accepted path after a tree step.
"""

from .kv import ACCELERATED_COMPACT_KV, compact_kv, compact_kv_reference
from .tree import (TokenTree, ancestors, branching_parents, check_parents, depths, leaves, path,
                   tree_attention_mask, tree_position_ids)

__all__ = ["ACCELERATED_COMPACT_KV", "TokenTree", "ancestors", "branching_parents", "check_parents", "compact_kv",
           "compact_kv_reference", "depths", "leaves", "path", "tree_attention_mask", "tree_position_ids"]

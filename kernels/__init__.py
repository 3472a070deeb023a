"""Hot compute kernels, each with a pure-torch reference (DESIGN.md, ``kernels/``).

This directory installs as ``bloombee_nb._kernels`` (package-dir mapping in pyproject.toml). Import
it by that name, and keep imports inside it relative; it depends on torch only.

- :mod:`.tree` — token trees for speculative decoding: tree-attention mask, position ids.
- :mod:`.kv` — KV compaction to the accepted path after a tree step (one layer, or a whole cache).

It is never the top-level ``kernels``: that name belongs to Hugging Face's ``kernels`` distribution,
which transformers (>= 5.25 depends on it) imports. Wherever the repository root is on ``sys.path``
(pytest, ``python`` or a Jupyter kernel started there) Python finds this folder first, so the guard
below hands the import over to the installed distribution, or fails as if nothing were there.
"""

if __name__ == "kernels":
    import importlib.util
    import sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    _root = Path(__file__).resolve().parents[1]        # the repository root: skip it when searching
    _elsewhere = [p for p in sys.path if isinstance(p, str) and Path(p or ".").resolve() != _root]
    _spec = PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.origin == __file__:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the repository's kernels/ folder is bloombee_nb's "
                                  "and imports only as bloombee_nb._kernels)", name=__name__)
    _real = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _real                      # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_real)
else:
    from .kv import ACCELERATED_COMPACT_KV, compact_cache, compact_kv, compact_kv_reference
    from .tree import (TokenTree, ancestors, branching_parents, check_parents, depths, leaves, path,
                       tree_attention_mask, tree_position_ids)

    __all__ = ["ACCELERATED_COMPACT_KV", "TokenTree", "ancestors", "branching_parents", "check_parents",
               "compact_cache", "compact_kv", "compact_kv_reference", "depths", "leaves", "path", "tree_attention_mask",
               "tree_position_ids"]

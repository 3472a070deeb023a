"""Token trees for speculative decoding: shape, tree-attention mask, position ids.

A tree of T nodes is flattened in topological order (every parent before its children; the
builders below give breadth-first order) and described by one tensor:

    parents [T] int64: parents[0] = -1 (the root); 0 <= parents[i] < i for every other node.

Node 0, the root, is the *last accepted token*: the token sampled at the end of the previous step,
not yet in the KV cache. Its output verifies the depth-1 drafts, a depth-1 node's output verifies
its children, and so on. The root is always accepted, so an accepted path is ``[0, a1, ..., ak]``
(k accepted drafts) and keeps k + 1 KV entries; the token sampled after ``ak`` becomes the next
root. A linear draft of d tokens is the chain ``parents = [-1, 0, 1, ..., d - 1]``.

The tree's shape is shared by the batch rows; their tokens differ (``TokenTree.tokens [B, T]``).
:class:`TokenTree` is the one tree value: the client's speculative loop and the stages both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch


def check_parents(parents: torch.Tensor) -> None:
    """Raise ``ValueError`` saying what is wrong unless ``parents [T]`` is a topologically ordered tree."""
    if parents.dim() != 1 or parents.numel() < 1 or parents.dtype != torch.long:
        raise ValueError(f"parents must be a non-empty 1-D int64 tensor, got {parents.dtype} {list(parents.shape)}")
    if parents[0].item() != -1:
        raise ValueError(f"node 0 is the root and must have parent -1, got {parents[0].item()}")
    bad = (parents[1:] < 0) | (parents[1:] >= torch.arange(1, parents.numel(), device=parents.device))
    if bad.any():
        i = int(bad.nonzero()[0]) + 1
        raise ValueError(f"node {i} has parent {parents[i].item()}; every node i > 0 needs a parent in [0, i) "
                         "(one root, parents listed before their children)")


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` bool: ``out[i, j]`` is True when node j is node i or one of its ancestors."""
    T = parents.numel()
    out = torch.eye(T, dtype=torch.bool, device=parents.device)
    for i, p in enumerate(parents.tolist()[1:], start=1):  # parents come first: row p is complete
        out[i] |= out[p]
    return out


def depths(parents: torch.Tensor) -> torch.Tensor:
    """``[T]`` int64: the root is at depth 0, its children at 1, …"""
    return ancestors(parents).sum(-1) - 1


def path(parents: torch.Tensor, node: int) -> torch.Tensor:
    """``[depth(node) + 1]`` int64: the nodes from the root to ``node``, root first."""
    return ancestors(parents)[node].nonzero().flatten()  # ancestors have smaller indices: already in order


def leaves(parents: torch.Tensor) -> torch.Tensor:
    """Node indices that are nobody's parent, ascending."""
    is_parent = torch.zeros(parents.numel(), dtype=torch.bool, device=parents.device)
    is_parent[parents[1:]] = True
    return (~is_parent).nonzero().flatten()


def branching_parents(widths: Sequence[int]) -> torch.Tensor:
    """The tree where every node at depth l has ``widths[l]`` children; depth = ``len(widths)``.

    Breadth-first: ``(2, 1)`` gives ``[-1, 0, 0, 1, 2]``; ``(1,) * d`` is a linear draft of d tokens.
    """
    if any(w < 1 for w in widths):
        raise ValueError(f"every level needs at least one child per node, got widths {tuple(widths)}")
    parents, level = [-1], [0]
    for w in widths:
        nxt = []
        for p in level:
            nxt += range(len(parents), len(parents) + w)
            parents += [p] * w
        level = nxt
    return torch.tensor(parents, dtype=torch.long)


def tree_attention_mask(parents: torch.Tensor, past_len: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """``[T, past_len + T]``: node i sees all ``past_len`` cached positions, its ancestors and itself.

    ``torch.bool``: True = attend. A float dtype gives the additive form: 0 = attend, dtype's min = masked.
    """
    T = parents.numel()
    allowed = torch.cat([torch.ones(T, past_len, dtype=torch.bool, device=parents.device), ancestors(parents)], 1)
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=parents.device).masked_fill(~allowed, torch.finfo(dtype).min)


def tree_position_ids(parents: torch.Tensor, past_len: int | torch.Tensor) -> torch.Tensor:
    """Position of each node = position of the root + its depth.

    ``past_len`` int -> ``[T]``; ``past_len [B]`` (positions already used by each row, e.g. real tokens
    of a left-padded batch) -> ``[B, T]``.
    """
    d = depths(parents)
    if isinstance(past_len, torch.Tensor):
        return past_len.to(d.device, torch.long)[:, None] + d[None, :]
    return past_len + d


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A token tree: one shape for the batch, each row's own tokens. The only tree type of the
    package: the speculative loop drafts and accepts on it, the stages check and mask with it.

    ``tokens`` is ``None`` for a shape alone (what the loop plans before the draft fills it in,
    what a stage receives as ``tree_parents``). Everything derived from the shape is computed once
    per tree (cached properties), since the loop reuses one tree per shape for many rounds.
    """

    tokens: torch.Tensor | None  # [B, T] int64: token of each node; tokens[:, 0] = the last accepted token (the root)
    parents: torch.Tensor        # [T] int64: parent of each node, -1 for the root, parents[i] < i

    def __post_init__(self):
        check_parents(self.parents)
        if self.tokens is not None and (self.tokens.dim() != 2 or self.tokens.shape[1] != self.parents.numel()):
            raise ValueError(f"tokens must be [batch, {self.parents.numel()}] for a tree of "
                             f"{self.parents.numel()} nodes, got {list(self.tokens.shape)}")

    @classmethod
    def from_widths(cls, root: torch.Tensor, widths: Sequence[int], drafts: torch.Tensor) -> TokenTree:
        """Root tokens ``[B]`` + breadth-first draft tokens ``[B, T - 1]`` on :func:`branching_parents` ``(widths)``."""
        return cls(torch.cat([root[:, None], drafts], 1), branching_parents(widths))

    @classmethod
    def shape(cls, widths: Sequence[int]) -> TokenTree:
        """The tree of :func:`branching_parents` ``(widths)`` without tokens; ``()`` is the root alone."""
        return cls(None, branching_parents(widths))

    def with_tokens(self, tokens: torch.Tensor) -> TokenTree:
        """This shape carrying ``tokens [B, T]``."""
        return TokenTree(tokens, self.parents)

    @property
    def size(self) -> int:
        return self.parents.numel()

    @cached_property
    def ancestors(self) -> torch.Tensor:
        """``[T, T]`` bool, see :func:`ancestors`."""
        return ancestors(self.parents)

    def depths(self) -> torch.Tensor:
        return self.ancestors.sum(-1) - 1

    def path(self, node: int) -> torch.Tensor:
        return self.ancestors[node].nonzero().flatten()

    def leaves(self) -> torch.Tensor:
        return leaves(self.parents)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        """``children[n]``: node n's children in tree order (the order acceptance tries them in)."""
        out: list[list[int]] = [[] for _ in range(self.size)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            out[p].append(i)
        return tuple(map(tuple, out))

    @cached_property
    def level_starts(self) -> tuple[int, ...]:
        """First node of each depth, then T: depth l is nodes ``level_starts[l]:level_starts[l + 1]``.
        Raises ``ValueError`` unless the tree is breadth-first (every depth contiguous)."""
        d = self.depths().tolist()
        if d != sorted(d):
            raise ValueError(f"the tree {self.parents.tolist()} is not breadth-first: its depths are not contiguous")
        return tuple(d.index(l) for l in range(d[-1] + 1)) + (self.size,)

    def nodes(self, depth: int) -> slice:
        """The nodes at ``depth`` (breadth-first trees)."""
        return slice(self.level_starts[depth], self.level_starts[depth + 1])

    @cached_property
    def widths(self) -> tuple[int, ...] | None:
        """Children per node at each depth (``()`` for the root alone), or ``None`` when a depth's
        nodes have different numbers of children (not a :func:`branching_parents` tree)."""
        out = []
        for l in range(len(self.level_starts) - 2):
            counts = {len(self.children[n]) for n in range(*self.nodes(l).indices(self.size))}
            if len(counts) != 1:
                return None
            out.append(counts.pop())
        return tuple(out)

    def path_nodes(self, depth: int) -> torch.Tensor:
        """``[n_depth, depth]``: the nodes on the path to each node at ``depth``, root excluded."""
        rows = self.nodes(depth)
        return self.ancestors[rows, 1:].nonzero()[:, 1].reshape(rows.stop - rows.start, depth) + 1

    def attention_mask(self, past_len: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        return tree_attention_mask(self.parents, past_len, dtype)

    def position_ids(self, past_len: int | torch.Tensor) -> torch.Tensor:
        return tree_position_ids(self.parents, past_len)

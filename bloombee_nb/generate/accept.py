"""Speculative acceptance: one row's walk down a verified token tree (greedy or sampled).

Pure functions over the target's scores and the tree's tokens; the loop (``speculative.py``) calls
them once per row per round. Node 0 is the root (the last accepted token); see
``bloombee_nb._kernels.tree`` for the tree's layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .._kernels import TokenTree


@dataclass(frozen=True)
class Verdict:
    """What one row accepted from one tree."""

    path: tuple[int, ...]   # tree nodes kept, root first: (0, a1, ..., ak)
    token: int              # the target's token after the path: the next root
    tries: tuple[int, ...]  # children tried at each node of the path (acceptance statistics)

    @property
    def accepted(self) -> int:
        return len(self.path) - 1


def children_of(parents: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    """``children[n]``: node n's children in tree order (the order they are tried in)."""
    return TokenTree(None, parents).children


def accept_greedy(best: list[int], tokens: list[int], children: Sequence[Sequence[int]]) -> Verdict:
    """Greedy verification. ``best[n]``: the target's argmax after node n; ``tokens[n]``: node n's token.

    Walk from the root: if a child carries the target's argmax, it is exactly what plain greedy
    decoding would have produced there, so keep it and go on from it; otherwise stop and emit the
    argmax. Every emitted token is the target's argmax given the tokens before it.
    """
    node, path, tries = 0, [0], []
    while True:
        want, kids = best[node], children[node]
        hit = next((i for i, c in enumerate(kids) if tokens[c] == want), None)
        if kids:
            tries.append(len(kids) if hit is None else hit + 1)
        if hit is None:
            return Verdict(tuple(path), want, tuple(tries))
        node = kids[hit]
        path.append(node)


def accept_sampled(p: torch.Tensor, q: torch.Tensor, tokens: list[int], children: Sequence[Sequence[int]],
                   generator: torch.Generator | None = None) -> Verdict:
    """Multi-candidate speculative sampling down one row's tree (SpecInfer, Miao et al. 2023).

    ``p [T, V]``: the target's distribution after each node; ``q [T', V]``: the draft's, for every
    node with children (the children of node n were drawn i.i.d. from ``q[n]``).

    At a node, try its children x_1, x_2, … in order against the current target p:

        accept x_i with probability min(1, p(x_i) / q(x_i))
        else    p <- norm(max(p - q, 0))     (the residual) and try x_{i+1} against it

    and if every child is rejected, sample the token from the last residual. One try is a step of
    standard speculative sampling: it emits x with probability q(x)·min(1, p(x)/q(x)) = min(p, q)(x)
    and, on rejection (probability 1 - sum min(p, q)), leaves the residual, so
    min(p, q) + (1 - sum min(p, q))·norm(max(p - q, 0)) = p: the token leaving a try is distributed
    as that try's p, and by induction over the children as the node's original p. An accepted
    child becomes the node, with its own p and q, so the whole walk samples from the target.
    """
    node, path, tries = 0, [0], []
    while True:
        target = p[node]
        kids = children[node]
        for i, c in enumerate(kids):
            x = tokens[c]
            u = torch.rand((), generator=generator)
            if u * q[node, x] < target[x]:               # u < p(x) / q(x); q(x) > 0: x was drawn from q
                tries.append(i + 1)
                node = c
                path.append(c)
                break
            residual = (target - q[node]).clamp_(min=0)
            total = residual.sum()
            target = residual / total if total > 0 else target  # p == q up to rounding: nothing to remove
        else:
            if kids:
                tries.append(len(kids))
            token = int(torch.multinomial(target, 1, generator=generator))
            return Verdict(tuple(path), token, tuple(tries))

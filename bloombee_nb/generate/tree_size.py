"""Link-aware tree size: which token tree pays for itself on this chain, from measured numbers.

Pure functions over values (no I/O): :func:`choose_widths` picks the tree's widths per level that
maximise expected accepted tokens per second,

    rate(widths) = E[accepted + 1] / (traversal_s(T) + draft_s(widths)),     T = tree_size(widths)

where a round is one traversal of the chain with T tree tokens per sequence, ``E[accepted + 1]``
comes from the running acceptance rates (:class:`AcceptanceStats`) and the times from
:class:`ChainCost` (link latency and bandwidth, the stages' compute as a line in T, the draft's
time per level). ``widths == ()`` is plain decoding (one token per traversal, no draft): it wins
whenever speculation does not pay, e.g. when a large batch already fills the stages' compute.

Expected tokens of a tree. A node at depth l tries its children in order; ``r[l][i]`` is the
measured chance that candidate i is accepted given candidates 0..i-1 were rejected. With
``w[l]`` children per node at depth l, the walk moves one level deeper with probability

    A_l(w) = 1 - prod_{i < w} (1 - r[l][i])

and E[accepted] = sum_{l=1..d} prod_{j<l} A_j(w_j)  (the walk reaches depth l only through every
level above it). The +1 is the token the target samples at the end of the walk, always kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import numpy as np

#: Tree of the first round, before anything is measured.
START_WIDTHS = (2, 2, 1)
MAX_WIDTH = 4     # children per node: beyond ~4 candidates the marginal acceptance is tiny
MAX_DEPTH = 8
MAX_NODES = 96    # tree tokens per sequence in one step


def tree_size(widths: Sequence[int]) -> int:
    """Nodes of the tree with ``widths[l]`` children per node at depth l, root included."""
    total, level = 1, 1
    for w in widths:
        level *= w
        total += level
    return total


def level_sizes(widths: Sequence[int]) -> tuple[int, ...]:
    """Nodes per depth, root (1) first."""
    sizes = [1]
    for w in widths:
        sizes.append(sizes[-1] * w)
    return tuple(sizes)


@dataclass(frozen=True)
class ChainCost:
    """Seconds of one round for a step of T tree tokens per sequence (at this session's batch)."""

    link_s: float                   # one traversal's fixed link time: every hop's one-way latency + overheads
    link_per_token_s: float = 0.0   # wire time of one more tree token (its hidden states, every row, every hop)
    compute_s: float = 0.0          # the stages' fixed compute per step, all stages together
    compute_per_token_s: float = 0.0  # the stages' compute per tree token, all stages together
    draft_level_s: float = 0.0      # one draft forward (a level of the tree), fixed part
    draft_per_token_s: float = 0.0  # one draft forward, per node of the level

    def traversal_s(self, tokens: int) -> float:
        return self.link_s + self.compute_s + tokens * (self.link_per_token_s + self.compute_per_token_s)

    def draft_s(self, widths: Sequence[int]) -> float:
        """The draft runs one forward per depth (the root's, then each level's nodes, leaves included)."""
        if not widths:
            return 0.0
        return (len(widths) + 1) * self.draft_level_s + tree_size(widths) * self.draft_per_token_s

    def round_s(self, widths: Sequence[int]) -> float:
        return self.traversal_s(tree_size(widths)) + self.draft_s(widths)


@dataclass(frozen=True)
class AcceptanceStats:
    """Running acceptance per (depth, candidate rank), forgetting the past geometrically.

    ``tried[l][i]``: how often candidate i of a node at depth l was tried (candidates before it were
    rejected); ``accepted[l][i]``: how often it was accepted. Rates shrink toward the rank's rate
    pooled over depths, and that toward a prior, so unmeasured depths and widths get sane values.
    """

    tried: tuple[tuple[float, ...], ...] = ()
    accepted: tuple[tuple[float, ...], ...] = ()
    decay: float = 0.95           # weight of the past at each update (adapts within ~20 rounds)
    prior_rate: float = 0.5       # acceptance of candidate 0 assumed before measuring (rank i: half of rank i-1)
    prior_weight: float = 2.0     # pseudo-tries behind the prior
    depth_weight: float = 8.0     # pseudo-tries behind the pooled rate in each depth's own rate: a depth
                                  # departs from the others only on real evidence, not on a few rounds' noise

    def updated(self, tried: Sequence[Sequence[float]], accepted: Sequence[Sequence[float]]) -> "AcceptanceStats":
        """The stats after one round's counts (same [depth][rank] layout, any size)."""
        def merge(old, new):
            depth = max(len(old), len(new))
            rows = []
            for l in range(depth):
                a = old[l] if l < len(old) else ()
                b = new[l] if l < len(new) else ()
                rows.append(tuple((a[i] * self.decay if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0)
                                  for i in range(max(len(a), len(b)))))
            return tuple(rows)
        return replace(self, tried=merge(self.tried, tried), accepted=merge(self.accepted, accepted))

    def _cell(self, table, l: int, i: int) -> float:
        return table[l][i] if l < len(table) and i < len(table[l]) else 0.0

    def pooled_rate(self, rank: int) -> float:
        """Rank ``rank``'s rate over all depths; its prior is half the rank before it (``prior_rate`` for rank 0)."""
        prior = self.prior_rate if rank == 0 else 0.5 * self.pooled_rate(rank - 1)
        acc = sum(self._cell(self.accepted, l, rank) for l in range(len(self.accepted)))
        tried = sum(self._cell(self.tried, l, rank) for l in range(len(self.tried)))
        return (acc + prior * self.prior_weight) / (tried + self.prior_weight)

    def rate(self, depth: int, rank: int) -> float:
        """Chance that candidate ``rank`` of a node at ``depth`` is accepted, earlier ones rejected."""
        pooled = self.pooled_rate(rank)
        return ((self._cell(self.accepted, depth, rank) + pooled * self.depth_weight)
                / (self._cell(self.tried, depth, rank) + self.depth_weight))

    def advance(self, depth: int, width: int) -> float:
        """A_l(w): chance that one of ``width`` children of a node at ``depth`` is accepted."""
        miss = 1.0
        for i in range(width):
            miss *= 1.0 - self.rate(depth, i)
        return 1.0 - miss

    def expected_tokens(self, widths: Sequence[int]) -> float:
        """E[accepted + 1] per sequence for a round with this tree."""
        total, reach = 1.0, 1.0
        for l, w in enumerate(widths):
            reach *= self.advance(l, w)
            total += reach
        return total

    def acceptance_by_depth(self) -> tuple[float, ...]:
        """Measured chance to move one level deeper, per depth, over the widths tried (no prior)."""
        out = []
        for l in range(len(self.tried)):
            node_visits = self._cell(self.tried, l, 0)
            out.append(sum(self.accepted[l]) / node_visits if node_visits else 0.0)
        return tuple(out)


def candidate_widths(max_depth: int = MAX_DEPTH, max_width: int = MAX_WIDTH,
                     max_nodes: int = MAX_NODES) -> Iterator[tuple[int, ...]]:
    """Every tree with non-increasing widths (wide near the root, where acceptance is likeliest)
    within the limits, ``()`` (no speculation) first."""
    def grow(prefix: tuple[int, ...], size: int, level: int) -> Iterator[tuple[int, ...]]:
        yield prefix
        if len(prefix) >= max_depth:
            return
        for w in range(min(prefix[-1] if prefix else max_width, max_width), 0, -1):
            if size + level * w <= max_nodes:
                yield from grow((*prefix, w), size + level * w, level * w)
    yield from grow((), 1, 1)


def choose_widths(cost: ChainCost, stats: AcceptanceStats, *, max_depth: int = MAX_DEPTH,
                  max_width: int = MAX_WIDTH, max_nodes: int = MAX_NODES) -> tuple[int, ...]:
    """The tree (widths per level) with the most expected tokens per second; ``()``: do not speculate."""
    best, best_rate = (), 0.0
    for widths in candidate_widths(max_depth, max_width, max_nodes):
        rate = stats.expected_tokens(widths) / max(cost.round_s(widths), 1e-9)
        if rate > best_rate * (1 + 1e-9):   # ties keep the smaller tree (enumerated first)
            best, best_rate = widths, rate
    return best


# ---- the costs, from measurements -------------------------------------------------------------
def fit_line(xs: Sequence[float], ys: Sequence[float], *, through_origin_if_single: bool,
             robust: bool = False) -> tuple[float, float]:
    """``y = a + b·x`` with a, b >= 0: least squares, or with ``robust`` the Theil–Sen line (b the
    median of the slopes between samples of different x, a the median of ``y - b·x``), which a few
    wild samples (under ~30% of them) do not move. One distinct x: all fixed (``a``), or all
    proportional (``b``) when ``through_origin_if_single``."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(xs) == 0:
        return 0.0, 0.0
    centre = np.median if robust else np.mean
    if np.ptp(xs) == 0:
        level = max(float(centre(ys)), 0.0)
        return (0.0, level / max(xs[0], 1.0)) if through_origin_if_single else (level, 0.0)
    if robust:
        i, j = np.triu_indices(len(xs), 1)
        dx = xs[j] - xs[i]
        apart = dx != 0
        b = float(np.median((ys[j] - ys[i])[apart] / dx[apart]))
        a = float(np.median(ys - b * xs))
    else:
        b, a = (float(v) for v in np.polyfit(xs, ys, 1))
    if b < 0:
        return max(float(centre(ys)), 0.0), 0.0
    if a < 0:
        per_x = float(np.median(ys / np.maximum(xs, 1e-12))) if robust else float((xs * ys).sum() / (xs * xs).sum())
        return 0.0, max(per_x, 0.0)
    return a, b


@dataclass(frozen=True)
class StepSample:
    """One chain step as the policy sees it (read off a ``StepTrace``)."""

    tokens: int        # positions per sequence (tree tokens of a tree step)
    wall_s: float      # the whole traversal, client clock
    compute_s: float   # all stages' compute, worker clocks


@dataclass(frozen=True)
class LinkSample:
    """The chain's links from a measured profile: what one traversal spends on the wire."""

    latency_s: float          # sum over the hops of half their round trip
    per_token_s: float = 0.0  # sum over the hops of one token's hidden states (all rows) / bandwidth


def chain_cost(steps: Sequence[StepSample], draft_levels: Sequence[tuple[int, float]] = (),
               link: LinkSample | None = None) -> ChainCost:
    """A :class:`ChainCost` from measured steps (compute, and the link when there is no profile:
    wall minus compute; least squares), the draft's measured forwards ``(nodes, seconds)`` (a
    robust line: see below), and a profile's link."""
    xs = [s.tokens for s in steps]
    compute = fit_line(xs, [s.compute_s for s in steps], through_origin_if_single=True)
    if link is None:
        link_fixed, link_token = fit_line(xs, [max(s.wall_s - s.compute_s, 0.0) for s in steps],
                                          through_origin_if_single=False)
    else:
        link_fixed, link_token = link.latency_s, link.per_token_s
    # The draft's forwards take a millisecond or two of the client's CPU each, so a moment the client
    # is not scheduled (a busy machine; torch's OpenMP threads waiting for a core other processes
    # hold) stretches a few of them a hundredfold. Least squares charged those few to every forward
    # of every tree to come (``len(widths) + 1`` of them a round), priced speculation out, and with
    # speculation off the draft no longer runs, so nothing re-measured it: the generation stayed
    # plain. The median line prices a forward as the draft typically runs it.
    draft = fit_line([n for n, _ in draft_levels], [s for _, s in draft_levels], through_origin_if_single=False,
                     robust=True)
    return ChainCost(link_fixed, link_token, compute[0], compute[1], draft[0], draft[1])


@dataclass(frozen=True)
class TreePolicy:
    """How a generation picks its trees: fixed widths, or ``"auto"`` (link-aware, every round)."""

    widths: tuple[int, ...] | str = "auto"
    max_depth: int = MAX_DEPTH
    max_width: int = MAX_WIDTH
    max_nodes: int = MAX_NODES
    probe_every: int = 8          # auto and off: try the smallest tree this often to re-measure acceptance

    def __post_init__(self):
        if self.widths != "auto" and (not isinstance(self.widths, tuple) or not self.widths
                                      or any(not isinstance(w, int) or w < 1 for w in self.widths)):
            raise ValueError(f"tree widths must be 'auto' or a non-empty tuple of positive ints (children per node "
                             f"at each depth, e.g. (2, 2, 1)), got {self.widths!r}")

    def choose(self, cost: ChainCost | None, stats: AcceptanceStats, rounds_off: int, *, max_depth: int,
               max_nodes: int) -> tuple[int, ...]:
        """This round's widths within the session's room (``max_depth``, ``max_nodes``)."""
        depth, nodes = min(max_depth, self.max_depth), min(max_nodes, self.max_nodes)
        if isinstance(self.widths, tuple):
            return fit_widths(self.widths, depth, nodes)
        if cost is None:
            return fit_widths(START_WIDTHS, depth, nodes)
        chosen = choose_widths(cost, stats, max_depth=depth, max_width=self.max_width, max_nodes=nodes)
        if not chosen and rounds_off >= self.probe_every:
            return fit_widths((1,), depth, nodes)
        return chosen


def fit_widths(widths: Sequence[int], max_depth: int, max_nodes: int) -> tuple[int, ...]:
    """The longest prefix of ``widths`` within ``max_depth`` levels and ``max_nodes`` nodes."""
    out = tuple(widths[:max(max_depth, 0)])
    while out and tree_size(out) > max_nodes:
        out = out[:-1]
    return out

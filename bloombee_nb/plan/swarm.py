"""The swarm's two small decisions, as pure functions over spans (no Dask, no torch).

- :func:`choose_span`: which layers a worker that joins should host, given what the swarm already
  hosts (Petals' ``block_selection`` fills the least-served blocks; we do the same, but keep span
  boundaries aligned with the spans already hosted, because a stage runs its whole span: a route
  needs spans that meet end to start).
- :func:`better_span`: whether a worker already hosting should move (rebalancing after a loss),
  only when that raises the least-replicated layer's count.
- :func:`route`: one client's chain through the hosted spans (replicas included) at minimum cost:
  a shortest path over layer boundaries where hosting span ``i`` is an edge ``start_i → end_i``
  that costs its stage time plus the link into it, and the path ends with the link back to the
  client. Forward-only edges make it a DP in boundary order.

Spans are ``(start, end)`` half-open layer ranges.
"""

from __future__ import annotations

from typing import Callable, Sequence


def coverage(n_layers: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """How many hosted spans hold each layer: ``[n_layers]``."""
    count = [0] * n_layers
    for a, b in spans:
        for layer in range(max(0, a), min(b, n_layers)):
            count[layer] += 1
    return count


def boundaries(n_layers: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Every layer index where a hosted span starts or ends, with 0 and ``n_layers``, sorted."""
    return sorted({0, n_layers, *(a for a, _ in spans), *(b for _, b in spans)})


def choose_span(n_layers: int, hosted: Sequence[tuple[int, int]], capacity: int) -> tuple[int, int]:
    """The span a worker able to hold ``capacity`` layers should host next.

    1. Layers no one hosts come first: the first gap ``[a, b)`` gets ``[a, min(b, a + capacity))``.
    2. Otherwise the least-replicated run of the segments between existing boundaries, as long as
       ``capacity`` allows, starting where coverage is lowest (ties: the earliest). Its edges are
       existing boundaries, so every route keeps meeting end to start.
    """
    if capacity < 1:
        raise ValueError(f"a worker must be able to hold at least one layer, got capacity={capacity}")
    count = coverage(n_layers, hosted)
    if 0 in count:
        a = count.index(0)
        b = a
        while b < n_layers and count[b] == 0 and b - a < capacity:
            b += 1
        return a, b
    cuts = boundaries(n_layers, hosted)
    segments = list(zip(cuts[:-1], cuts[1:]))          # each has one coverage value throughout
    best = None
    for i, (a, _) in enumerate(segments):
        end, j = a, i
        while j < len(segments) and segments[j][1] - a <= capacity:
            end, j = segments[j][1], j + 1
        if end == a:                                    # this segment alone is wider than capacity
            continue
        score = (min(count[a:end]), sum(count[a:end]) / (end - a), a)
        if best is None or score < best[0]:
            best = (score, (a, end))
    if best is None:
        raise ValueError(f"every span between the hosted boundaries {cuts} is wider than capacity={capacity}: "
                         "this worker cannot replicate any of them")
    return best[1]


def better_span(n_layers: int, hosted: Sequence[tuple[int, int]], mine: tuple[int, int],
                capacity: int) -> tuple[int, int] | None:
    """Where the worker hosting ``mine`` (one of ``hosted``) should move, or None to stay.

    The swarm's bottleneck is its least-replicated layer (0: no client can use the model). A move
    is worth its pause only when it raises that minimum: the worker drops ``mine`` and takes
    :func:`choose_span` of the rest. Never when ``mine`` holds a layer's last copy (the minimum
    would not rise), never for a tie, so every move strictly raises the minimum and the swarm
    settles (Petals moves a server when swarm throughput would grow by a margin; same idea, counted
    in replicas because a stage runs its whole span).
    """
    others = list(hosted)
    others.remove(mine)
    new = choose_span(n_layers, others, capacity)
    if new == mine:
        return None
    return new if min(coverage(n_layers, [*others, new])) > min(coverage(n_layers, hosted)) else None


def route(spans: Sequence[tuple[int, int]], n_layers: int, stage_s: Sequence[float],
          hop_s: Callable[[int | None, int | None], float]) -> list[int] | None:
    """Indices into ``spans`` of the cheapest chain covering layers ``0 .. n_layers`` end to start.

    ``stage_s[i]``: the time stage ``i`` adds (compute, scaled by its load); ``hop_s(p, i)``: the
    link from stage ``p`` (None: the client) into stage ``i`` (None: back to the client).
    Returns None when the spans do not cover the model.
    """
    # best[(layer, i)]: cheapest cost of a chain that reached ``layer`` ending with stage i
    best: dict[tuple[int, int | None], tuple[float, tuple[int, ...]]] = {(0, None): (0.0, ())}
    for layer in boundaries(n_layers, spans):
        here = [(k, v) for k, v in best.items() if k[0] == layer]
        for (_, last), (cost, path) in here:
            for i, (a, b) in enumerate(spans):
                if a != layer or b <= a:
                    continue
                c = cost + hop_s(last, i) + stage_s[i]
                if (b, i) not in best or c < best[(b, i)][0]:
                    best[(b, i)] = (c, (*path, i))
    ends = [(cost + hop_s(last, None), path) for (layer, last), (cost, path) in best.items()
            if layer == n_layers and last is not None]
    return list(min(ends)[1]) if ends else None

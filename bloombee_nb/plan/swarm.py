"""The swarm's two small decisions, as pure functions over spans (no Dask, no torch).

- :func:`choose_span`: which layers a worker that joins should host, given what the swarm already
  hosts (Petals' ``block_selection`` fills the least-served blocks; we do the same, but keep span
  boundaries aligned with the spans already hosted, because a stage runs its whole span: a route
  needs spans that meet end to start).
- :func:`better_span`: whether a worker already hosting should move (rebalancing after a loss, or
  for speed), only when that raises the least-served layer: counted in replicas, or with every
  lender's measured speed (``layer_s``: seconds per layer of a one-row decode step) in the tokens/s
  all the spans holding a layer serve together — a slow laptop's replica adds less than a GPU's.
- :func:`route`: one client's chain through the hosted spans (replicas included) at minimum cost:
  a shortest path over layer boundaries where hosting span ``i`` is an edge ``start_i → end_i``
  that costs its stage time plus the link into it, and the path ends with the link back to the
  client. Forward-only edges make it a DP in boundary order. :func:`path_cost` prices a given
  chain the same way (a client compares the chain its sessions open on with the best one).

Spans are ``(start, end)`` half-open layer ranges.
"""

from __future__ import annotations

from typing import Callable, Sequence

#: With measured speeds, a span moves only when the least-served layer's tokens/s would grow by more
#: than this: it must more than double. Lenders on the same hardware measure up to ~2x apart on a
#: busy machine, and a move pauses the sessions on the stage; a GPU against a laptop differs by 10x
#: and more. (Petals' default ``balance_quality=0.75`` asks for +33% of measured throughput.)
SPEED_MARGIN = 1.0


def coverage(n_layers: int, spans: Sequence[tuple[int, int]],
             layer_s: Sequence[float] | None = None) -> list[float]:
    """How many hosted spans hold each layer: ``[n_layers]``; with ``layer_s`` (each span's seconds
    per layer of a decode step), the tokens/s they serve there together: a span ``[a, b)`` on a
    lender with ``layer_s`` passes ``1 / (layer_s · (b - a))`` tokens/s through each of its layers."""
    count = [0.0 if layer_s else 0] * n_layers
    for i, (a, b) in enumerate(spans):
        add = 1 if not layer_s else 1.0 / (layer_s[i] * (b - a))
        for layer in range(max(0, a), min(b, n_layers)):
            count[layer] += add
    return count


def boundaries(n_layers: int, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Every layer index where a hosted span starts or ends, with 0 and ``n_layers``, sorted."""
    return sorted({0, n_layers, *(a for a, _ in spans), *(b for _, b in spans)})


def choose_span(n_layers: int, hosted: Sequence[tuple[int, int]], capacity: int,
                layer_s: Sequence[float] | None = None) -> tuple[int, int]:
    """The span a worker able to hold ``capacity`` layers should host next.

    1. Layers no one hosts come first: the first gap ``[a, b)`` gets ``[a, min(b, a + capacity))``.
    2. Otherwise the least-served run of the segments between existing boundaries (replicas, or
       tokens/s with ``layer_s``: see :func:`coverage`), as long as ``capacity`` allows, starting
       where coverage is lowest (ties: the earliest). Its edges are existing boundaries, so every
       route keeps meeting end to start.
    """
    if capacity < 1:
        raise ValueError(f"a worker must be able to hold at least one layer, got capacity={capacity}")
    count = coverage(n_layers, hosted, layer_s)
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


def better_span(n_layers: int, hosted: Sequence[tuple[int, int]], mine: tuple[int, int] | int,
                capacity: int, layer_s: Sequence[float] | None = None,
                margin: float = SPEED_MARGIN) -> tuple[int, int] | None:
    """Where the worker hosting ``mine`` (one of ``hosted``, or its index there) should move, or
    None to stay.

    The swarm's bottleneck is its least-served layer (0: no client can use the model). A move is
    worth its pause only when it raises that minimum: the worker drops ``mine`` and takes
    :func:`choose_span` of the rest. Never when ``mine`` holds a layer's last copy (the minimum
    would not rise), never for a tie, so every move strictly raises the minimum and the swarm
    settles. Counted in replicas; with every span's ``layer_s``, in tokens/s (:func:`coverage`:
    the mover's own speed on its new span included), and then only for a gain of more than
    ``margin`` (Petals moves a server when swarm throughput would grow by a margin; the same idea,
    spans instead of blocks because a stage runs its whole span).
    """
    i = mine if isinstance(mine, int) else list(hosted).index(tuple(mine))
    others = [h for j, h in enumerate(hosted) if j != i]
    rest_s = None if not layer_s else [x for j, x in enumerate(layer_s) if j != i]
    new = choose_span(n_layers, others, capacity, rest_s)
    if new == tuple(hosted[i]):
        return None
    before = min(coverage(n_layers, hosted, layer_s))
    after = min(coverage(n_layers, [*others, new], None if not layer_s else [*rest_s, layer_s[i]]))
    return new if after > before * (1 + margin if layer_s else 1) else None


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


def path_cost(path: Sequence[int], stage_s: Sequence[float],
              hop_s: Callable[[int | None, int | None], float]) -> float:
    """What :func:`route` charges for the chain ``path`` (indices into its spans): the link into
    each stage plus its time, and the link back to the client."""
    cost, last = 0.0, None
    for i in path:
        cost, last = cost + hop_s(last, i) + stage_s[i], i
    return cost + hop_s(last, None)

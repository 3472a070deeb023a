"""Routing a client's chain through the swarm's hosted spans, from what this client measures.

A client pings every hosted stage of its model (:func:`probe`: its round trip there, the stage's
open sessions, queued steps and clients, whether it is leaving) and prices each stage by its layers
(at the speed it measured when it loaded) scaled by that load, each link by the measured round trip;
:func:`~bloombee_nb.plan.swarm.route` finds the cheapest chain over layer boundaries
(:func:`choose_route`, :func:`attach_chain`). While the stages its new sessions open on are much
busier than another route, :func:`lighter_route` / :func:`lighter_chain` name that route instead;
sessions already open stay (moving one costs a replay). Hosting and the registry's view are in
``swarm.py``; the records both read are the registry's (``registry.py``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import Actor

from ..plan.swarm import coverage, path_cost, route
from .placement import Placement
from .policy import model_key
from .registry import HostedSpan, hosted
from .stage import StageActor


@dataclass(frozen=True)
class StageLoad:
    """What a hosted stage answered a ping with, and how long the answer took from this client."""

    rtt_s: float
    sessions: int
    queued: int
    clients: int
    leaving: bool


def actors(cluster, spans: list[HostedSpan]) -> list:
    """This client's handles on hosted stages. It holds no future of its own: the registry keeps
    the actors alive (Dask's ``Future(key, client)`` no longer tells the scheduler a client wants a key)."""
    with cluster.client.as_current():
        return [Actor(StageActor, s.worker, s.key) for s in spans]


def probe(cluster, spans: list[HostedSpan], timeout_s: float = 5.0) -> dict[str, StageLoad | None]:
    """Ping every hosted stage from this client: ``key -> StageLoad`` (None: no answer in time)."""
    client = cluster.client

    async def one(actor):
        try:
            t0 = time.perf_counter()
            ans = await asyncio.wait_for(actor.ping(), timeout_s)
            return StageLoad(time.perf_counter() - t0, ans["sessions"], ans.get("queued", 0), ans.get("clients", 0),
                             ans["leaving"])
        except Exception:  # noqa: BLE001 — gone, hung or unreachable: not routable
            return None

    async def every():
        return await asyncio.gather(*(one(a) for a in actors(cluster, spans)))

    return dict(zip([s.key for s in spans], client.sync(every)))


#: A swarm client's new sessions move to a less loaded route only when the chain they would open on
#: costs more than this times the best one. Loads and round trips are measured, so they are noisy:
#: without a margin two equal replicas would trade places at every check.
REROUTE_MARGIN = 1.6   # off the 1.25x steps one open session adds (0.25 each), so noise in round trips cannot tip a tie


def _priced(spans: list[HostedSpan], loads: dict[str, StageLoad | None], layer_s: float, prefer=frozenset()):
    """``(live, stage_s, hop)`` for :func:`~bloombee_nb.plan.swarm.route` over the answering, staying
    stages (see :func:`choose_route`), or None when none answers."""
    live = [s for s in spans if loads.get(s.key) is not None and not loads[s.key].leaving]
    if not live:
        return None
    mean_rtt = sum(loads[s.key].rtt_s for s in live) / len(live)
    stage_s = [(s.end - s.start) * (s.layer_s or layer_s) * (1 + loads[s.key].queued + 0.25 * loads[s.key].sessions)
               * (2 if prefer and s.key not in prefer else 1) for s in live]

    def hop(p, i):
        if p is None:
            return loads[live[i].key].rtt_s
        if i is None:
            return loads[live[p].key].rtt_s
        return 0.0 if live[p].worker == live[i].worker else mean_rtt

    return live, stage_s, hop


def choose_route(spans: list[HostedSpan], loads: dict[str, StageLoad | None], n_layers: int,
                 layer_s: float = 1e-3, prefer=frozenset()) -> list[HostedSpan] | None:
    """The cheapest chain through the answering, staying stages: each stage costs its layers (at
    its measured ``HostedSpan.layer_s`` each, or ``layer_s`` when unknown) scaled by its queue and
    sessions, plus this client's measured round trip to it (the link into it; stage-to-stage links
    are priced as the mean client round trip). ``prefer``: keys of the stages a re-routed chain's
    sessions are open on; any other stage counts double, since moving there costs a replay of
    every session (``generate/replay.py``)."""
    priced = _priced(spans, loads, layer_s, prefer)
    if priced is None:
        return None
    live, stage_s, hop = priced
    path = route([s.span for s in live], n_layers, stage_s, hop)
    return None if path is None else [live[i] for i in path]


def lighter_route(spans: list[HostedSpan], loads: dict[str, StageLoad | None], n_layers: int, current: list[str],
                  layer_s: float = 1e-3, margin: float = REROUTE_MARGIN) -> list[HostedSpan] | None:
    """Where new sessions should open instead of the chain through the stages ``current`` (keys):
    the cheapest route (:func:`choose_route`) when it costs less than ``1 / margin`` of that chain,
    or at any cost when a stage of ``current`` does not answer or is leaving (a session would fail
    there); None: stay. Sessions already open stay where they are: moving one costs a replay."""
    priced = _priced(spans, loads, layer_s)
    if priced is None:
        return None
    live, stage_s, hop = priced
    best = route([s.span for s in live], n_layers, stage_s, hop)
    index = {s.key: i for i, s in enumerate(live)}
    if best is None or [live[i].key for i in best] == list(current):
        return None
    if all(k in index for k in current) and \
            path_cost(best, stage_s, hop) * margin >= path_cost([index[k] for k in current], stage_s, hop):
        return None
    return [live[i] for i in best]


def attach_chain(cluster, model: str | Path, n_layers: int, *, dtype: str | None = None, exclude=(), prefer=frozenset(),
                 **chain_kwargs):
    """A :class:`~bloombee_nb.cluster.chain.RemoteChain` over the swarm's hosted spans of ``model``
    (routed by :func:`choose_route`), or None when the swarm does not cover it. ``exclude``:
    worker addresses not to route through (lost ones); ``prefer``: see :func:`choose_route`."""
    spans = _routable(cluster, model, n_layers, dtype, exclude)
    if not spans:
        return None
    chosen = choose_route(spans, probe(cluster, spans), n_layers, prefer=prefer)
    return None if chosen is None else _chain(cluster, chosen, chain_kwargs)


def lighter_chain(cluster, model: str | Path, n_layers: int, current, *, dtype: str | None = None, **chain_kwargs):
    """A chain for new sessions through less loaded stages than the chain ``current`` (see
    :func:`lighter_route`), or None to keep opening them on ``current``."""
    spans = _routable(cluster, model, n_layers, dtype)
    chosen = spans and lighter_route(spans, probe(cluster, spans), n_layers, [r.key for r in current.refs])
    return _chain(cluster, chosen, chain_kwargs) if chosen else None


def _routable(cluster, model, n_layers: int, dtype: str | None, exclude=()) -> list[HostedSpan]:
    """The hosted spans of ``model`` a chain may use; empty when together they miss a layer."""
    spans = [s for s in hosted(cluster, model_key(model))
             if s.worker not in exclude and s.n_layers == n_layers and (dtype is None or s.dtype == dtype)]
    return [] if not spans or 0 in coverage(n_layers, [s.span for s in spans]) else spans


def _chain(cluster, chosen: list[HostedSpan], chain_kwargs: dict):
    from .chain import RemoteChain

    placement = Placement(tuple(s.stage() for s in chosen))
    chain_kwargs = {k: v for k, v in chain_kwargs.items() if k != "group"}
    return RemoteChain(cluster.client, placement, actors(cluster, chosen), shared=True, **chain_kwargs)


def missing_layers(cluster, model: str | Path, n_layers: int) -> list[int]:
    """Layers of ``model`` no hosted span holds."""
    count = coverage(n_layers, [s.span for s in hosted(cluster, model_key(model))])
    return [i for i, c in enumerate(count) if c == 0]

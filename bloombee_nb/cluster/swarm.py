"""The swarm: spans hosted once by lenders, used by any number of clients.

Hosting is separate from using. :func:`host` (or ``bloombee-nb worker … --host MODEL``) starts
stage actors that belong to the swarm, not to a client: the registry (``registry.py``, a Dask
scheduler plugin) records them and *wants* their keys on the scheduler (as Dask's own published datasets
are wanted), so they outlive the client that placed them, and forgets them when their worker
leaves. A client's ``from_pretrained`` finds the model in the registry and :func:`attach_chain`
routes a chain through the hosted spans — replicas included — from what it measures itself (its
round trip to each stage and each stage's load), without loading a layer; while the stages it
opens sessions on are much busier than another route (:func:`lighter_chain`), its new sessions
open on that route instead, and the sessions already open stay. Every session on a
shared stage carries its own route (every step does: ``protocol.py``), and steps of different
clients that meet at a stage merge into one forward like any others. Lenders keep the swarm
balanced: :func:`rebalance` moves a replica to layers whose only host was lost, or (``by="speed"``,
weighed by each stage's speed measured when it loads) to layers only slow lenders serve.

Who may host what is the lender's choice: a worker started with ``--host`` / ``--allow`` carries a
:class:`HostPolicy` (a Dask worker plugin), and a stage refuses to load any other model there.

    bb.host("path/or/hub-id", cluster)       # even split over the workers (or spans=, workers=)
    bb.swarm(cluster)                          # who hosts which layers of which model, load, sessions
    model = bb.DistributedModelForCausalLM.from_pretrained("path/or/hub-id", cluster=cluster)  # attaches
"""

from __future__ import annotations

import asyncio
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from distributed import Actor

from ..errors import SwarmError
from ..plan.swarm import coverage, path_cost, route
from .loading import gather_actors, release_now
from .placement import Placement, StageSpec, even_spans
from .registry import ensure_registry
from .policy import HostPolicy, model_key  # noqa: F401 (HostPolicy: part of the swarm's API)
from .stage import StageActor



@dataclass(frozen=True)
class HostedSpan:
    """One hosted stage: the one identity of a stage (worker address, name, span) plus its model."""

    model: str       # the model's key (see :func:`model_key`)
    worker: str      # Dask worker address
    name: str        # the worker's Dask name
    start: int       # first layer (inclusive)
    end: int         # last layer (exclusive)
    n_layers: int    # layers of the whole model
    dtype: str       # e.g. "float32", or "float32+int8" for a quantized span
    key: str         # the stage actor's Dask key
    layer_s: float = 0.0  # seconds per layer of a one-row decode step there, measured at load (0: unknown)

    @property
    def span(self) -> tuple[int, int]:
        return self.start, self.end

    def stage(self) -> StageSpec:
        return StageSpec(self.worker, self.start, self.end)


def hosted(cluster, model: str | None = None) -> list[HostedSpan]:
    """The spans the swarm hosts (of ``model``, a :func:`model_key`, when given)."""
    client = cluster.client
    ensure_registry(client)
    recs = client.sync(client.scheduler.bloombee_swarm_list)
    spans = [HostedSpan(**r) for r in recs]
    return sorted((s for s in spans if model is None or s.model == model), key=lambda s: (s.model, s.start, s.name))


# ---- the lender's side -----------------------------------------------------------------------
def host(model: str | Path, cluster, *, workers: list[str] | None = None, spans: list[tuple[int, int]] | None = None,
         dtype: str | None = None, layers_per_worker: int | None = None, layer_s: float | None = None,
         **stage_kwargs) -> list[HostedSpan]:
    """Host spans of ``model`` on the cluster's workers for the swarm (they outlive this client).

    ``spans`` (with ``workers``, one span each) places them by hand; otherwise each worker in turn
    takes :func:`~bloombee_nb.plan.swarm.choose_span` of what the swarm already hosts — on an empty
    swarm an even split over ``workers`` (default: all), on a covered one a replica of the least
    served span. ``layers_per_worker`` caps a worker's span (default: an even share). Each stage
    measures its speed once loaded (``StageActor.speed``), which rebalancing weighs spans by;
    ``layer_s`` gives it instead (a worker moving keeps the speed measured where it was).
    """
    # Long: claim, load and register are one transaction - the spans claimed here are unclaimed if
    # loading or registering fails, and the futures are released either way.
    from ..model.checkpoint import resolve_checkpoint, weight_map
    from ..model.family import _stored_dtype, load_config
    from ..model.quantize import canonical

    key = model_key(model)
    path = resolve_checkpoint(model)
    config = load_config(path, stage_kwargs.get("allow_unverified_architecture", False))
    n = config.num_hidden_layers
    workers = list(workers or cluster.worker_addresses())
    claimed = spans is None
    ensure_registry(cluster.client)
    if spans is None:
        cap = layers_per_worker or max(b - a for a, b in even_spans(n, len(workers)))
        spans = [tuple(cluster.client.sync(cluster.client.scheduler.bloombee_swarm_claim, model=key, worker=w,
                                           n_layers=n, capacity=cap)) for w in workers]
    if len(spans) != len(workers):
        raise SwarmError(f"{len(spans)} spans for {len(workers)} workers: give one span per worker")
    dtype, _, fmt = (dtype or "").partition("+")  # quantized spans are recorded as "float32+int8" (issue 19)
    quantize = canonical(fmt or stage_kwargs.pop("quantize", None))  # "none"/"fp32": float, no suffix
    if quantize:
        stage_kwargs["quantize"] = quantize
    dtype = dtype or str(_stored_dtype(path, weight_map(path), config)).removeprefix("torch.")
    label = dtype + (f"+{quantize}" if quantize else "")
    placement = [StageSpec(w, a, b) for w, (a, b) in zip(workers, spans)]
    futures = [cluster.client.submit(StageActor, key, st.start, st.end, actor=True, pure=False, workers=[st.worker],
                                     allow_other_workers=False, dtype=dtype, **stage_kwargs)
               for st in placement]
    stages = []
    try:
        stages = gather_actors(cluster.client, futures, tuple(placement))
        speeds = [None if layer_s else a.speed() for a in stages]  # measured together, each on its own worker
        names = {a: str(w.get("name", a)) for a, w in cluster.workers().items()}
        recs = [HostedSpan(key, st.worker, names.get(st.worker, st.worker), st.start, st.end, n, label, str(f.key),
                           float(layer_s or sp.result()))
                for st, f, sp in zip(placement, futures, speeds)]
        cluster.client.sync(cluster.client.scheduler.bloombee_swarm_add, spans=[r.__dict__ for r in recs])
    except BaseException:
        if claimed:  # free the spans this call claimed, for the next worker that joins
            cluster.client.sync(cluster.client.scheduler.bloombee_swarm_unclaim, model=key, workers=workers)
        raise
    finally:
        release_now(futures, stages)  # the registry wants them now (a called handle's Future too: unhost)
    return recs


def unhost(cluster, model: str | Path | None = None, workers: list[str] | None = None) -> list[HostedSpan]:
    """Stop hosting (``model``'s spans, on ``workers``; default every one): the swarm forgets them and
    the stages stop now. Sessions on them re-route through the replicas left, or say which layers to
    host (``RecoveryError``)."""
    gone = [s for s in hosted(cluster, None if model is None else model_key(model))
            if workers is None or s.worker in workers]
    cluster.client.sync(cluster.client.scheduler.bloombee_swarm_remove, keys=[s.key for s in gone])
    return gone


def hand_over(cluster, leaving: str) -> list[HostedSpan]:
    """Before the worker ``leaving`` goes: each model it hosts that the other workers' spans could no
    longer route is hosted again elsewhere first — its span on the live worker hosting the fewest
    spans that accepts the model. Returns the spans hosted anew. (The leaving worker's own records go
    when it leaves; meanwhile its stages answer ``leaving`` and clients route around them.)"""
    running = [a for a, w in cluster.workers().items() if a != leaving and w.get("status", "running") == "running"]
    spans, new = hosted(cluster), []
    for mine in [s for s in spans if s.worker == leaving]:
        others = [o.span for o in spans if o.model == mine.model and o.worker != leaving]
        if route(others, mine.n_layers, [1.0] * len(others), lambda p, i: 0.0) is not None:
            continue
        load = {a: sum(o.worker == a for o in spans) for a in running}
        for candidate in sorted(running, key=lambda a: load[a]):
            try:
                added = host(mine.model, cluster, workers=[candidate], spans=[mine.span], dtype=mine.dtype)
                spans, new = spans + added, new + added
                break
            except SwarmError:
                continue  # its owner did not allow this model: the next one
        else:
            raise SwarmError(f"no other worker accepts layers {mine.start}–{mine.end - 1} of {mine.model}: clients "
                             "lose this model until a worker hosts them")
    return new


def rebalance(cluster, model: str | Path, workers: list[str] | None = None, *, capacity: int | None = None,
              drain_s: float = 2.0, by: str = "replicas", **stage_kwargs) -> list[tuple[HostedSpan, HostedSpan]]:
    """Move hosted spans of ``model`` where the swarm needs them: each of ``workers`` (default: every
    worker hosting it) in turn asks the registry whether moving raises the least-served layer
    (:func:`~bloombee_nb.plan.swarm.better_span`), counted in replicas (``by="replicas"``: e.g. a
    replica moves to layers whose only host was lost) or in tokens/s from every stage's speed
    measured at load (``by="speed"``: also a fast lender to layers only slow ones serve; opt-in,
    because speeds measured on a busy machine differ, and a move pauses its stage's sessions).

    A moving stage first refuses new steps (its sessions replay on the replicas that still hold its
    layers — a move never takes a layer's last copy), waits up to ``drain_s`` for steps in flight
    and for its sessions to leave, then the worker drops it and loads the new span. ``capacity``:
    layers a worker may hold (default: its current span's). Returns ``(old, new)`` per move. A
    lender started with ``--host`` runs this for itself every few seconds (``--rebalance-every``)."""
    if by not in ("replicas", "speed"):
        raise ValueError(f'by must be "replicas" or "speed", got {by!r}')
    key = model_key(model)
    client = cluster.client
    ensure_registry(client)
    moves = []
    for worker in list(workers or dict.fromkeys(s.worker for s in hosted(cluster, key))):
        mine = [s for s in hosted(cluster, key) if s.worker == worker]
        if len(mine) != 1:
            continue
        (old,) = mine
        span = client.sync(client.scheduler.bloombee_swarm_move, model=key, worker=worker,
                           capacity=capacity or old.end - old.start, by_speed=by == "speed")
        if span is None:
            continue
        try:
            _drain(cluster, old, drain_s)
            client.sync(client.scheduler.bloombee_swarm_remove, keys=[old.key])
            (new,) = host(model, cluster, workers=[worker], spans=[tuple(span)], dtype=old.dtype,
                          layer_s=old.layer_s or None, **stage_kwargs)
        except BaseException:
            client.sync(client.scheduler.bloombee_swarm_unclaim, model=key, workers=[worker])
            raise
        moves.append((old, new))
    return moves


def _drain(cluster, span: HostedSpan, timeout_s: float) -> None:
    """The stage hosting ``span`` refuses new steps and sessions; wait up to ``timeout_s`` for the
    sessions open on it to move (their clients replay them on replicas at their next step)."""
    def leave(dask_worker, key=span.key):
        stage = dask_worker.state.actors.get(key)
        if stage is None:
            return 0
        stage.leaving = True
        return len(stage.runner.sessions)

    deadline = time.monotonic() + timeout_s
    while cluster.client.run(leave, workers=[span.worker], on_error="ignore").get(span.worker) \
            and time.monotonic() < deadline:
        time.sleep(0.1)


# ---- the client's side -------------------------------------------------------------------------
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


# ---- the view ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SwarmView:
    """What ``bb.swarm(cluster)`` shows: every hosted span with its load, by model."""

    spans: tuple[HostedSpan, ...]
    loads: dict = field(default_factory=dict)   # key -> StageLoad | None

    def models(self) -> dict[str, list[HostedSpan]]:
        out: dict[str, list[HostedSpan]] = {}
        for s in self.spans:
            out.setdefault(s.model, []).append(s)
        return out

    def replicas(self, model: str) -> list[int]:
        """Per layer of ``model``, how many hosted spans hold it."""
        spans = self.models().get(model_key(model), [])
        return coverage(spans[0].n_layers, [s.span for s in spans]) if spans else []

    def _load(self, s: HostedSpan) -> str:
        ld = self.loads.get(s.key)
        if ld is None:
            return "no answer"
        state = " (leaving)" if ld.leaving else ""
        speed = f", {s.layer_s * (s.end - s.start) * 1e3:.1f} ms/token" if s.layer_s else ""
        return (f"{ld.sessions} sessions, {ld.clients} clients, {ld.queued} queued, {ld.rtt_s * 1e3:.1f} ms"
                f"{speed}{state}")

    def __repr__(self):
        lines = [f"<SwarmView: {len(self.models())} models, {len(self.spans)} hosted spans>"]
        for model, spans in self.models().items():
            reps = self.replicas(model)
            lines.append(f"  {model}  ({spans[0].n_layers} layers, replicas per layer min {min(reps)} max {max(reps)})")
            lines += [f"    layers {s.start}–{s.end - 1} on {s.name} ({s.worker}): {self._load(s)}" for s in spans]
        return "\n".join(lines)

    def _repr_html_(self):
        if not self.spans:
            return ("<div><b>swarm</b>: nothing hosted yet — <code>bb.host(model, cluster)</code> or "
                    "<code>bloombee-nb worker SCHEDULER --host MODEL</code></div>")
        parts = []
        for model, spans in self.models().items():
            n = spans[0].n_layers
            reps = self.replicas(model)
            bar = "".join(f"<td title='layer {i}: {r} replicas' style='background:{_shade(r)};width:{max(4, 240 // n)}px'>"
                          "</td>" for i, r in enumerate(reps))
            rows = "".join(f"<tr><td>{s.start}–{s.end - 1}</td><td>{html.escape(s.name)}</td>"
                           f"<td><code>{html.escape(s.worker)}</code></td><td>{html.escape(self._load(s))}</td></tr>"
                           for s in spans)
            parts.append(f"<div><b>{html.escape(model)}</b> — {n} layers, {spans[0].dtype}; replicas per layer "
                         f"<table style='border-collapse:collapse'><tr>{bar}</tr></table>"
                         "<table><tr><th>layers</th><th>worker</th><th>address</th><th>load</th></tr>"
                         f"{rows}</table></div>")
        return "<div><b>swarm</b>" + "".join(parts) + "</div>"


def _shade(replicas: int) -> str:
    return ["#d62728", "#9ecae1", "#4292c6", "#08519c"][min(replicas, 3)]


def swarm(cluster, *, ping: bool = True) -> SwarmView:
    """Every span the swarm hosts, with each stage's load as this client measures it."""
    spans = hosted(cluster)
    return SwarmView(tuple(spans), probe(cluster, spans) if ping and spans else {})

"""The swarm: spans hosted once by lenders, used by any number of clients.

Hosting is separate from using. :func:`host` (or ``bloombee-nb worker … --host MODEL``) starts stage
actors that belong to the swarm, not to a client: the registry (``registry.py``, a Dask scheduler
plugin) records them and *wants* their keys on the scheduler (as Dask's own published datasets are
wanted), so they outlive the client that placed them, and forgets them when their worker leaves. A
client's ``from_pretrained`` finds the model in the registry and routes a chain through the hosted
spans (``routing.py``) — replicas included — from what it measures itself (its round trip to each
stage and each stage's load), without loading a layer; while the stages it opens sessions on are
much busier than another route, its new sessions open on that route instead, and the sessions
already open stay. Every session on a shared stage carries its own route (every step does:
``protocol.py``), and steps of different clients that meet at a stage merge into one forward like
any others. Lenders keep the swarm balanced: :func:`rebalance` moves a replica to layers whose only
host was lost, or (``by="speed"``, weighed by each stage's speed measured when it loads) to layers
only slow lenders serve.

Who may host what is the lender's choice: a worker started with ``--host`` / ``--allow`` carries a
:class:`HostPolicy` (a Dask worker plugin), and a stage refuses to load any other model there.

    bb.host("path/or/hub-id", cluster)       # even split over the workers (or spans=, workers=)
    bb.swarm(cluster)                          # who hosts which layers of which model, load, sessions
    model = bb.DistributedModelForCausalLM.from_pretrained("path/or/hub-id", cluster=cluster)  # attaches
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SwarmError
from ..plan.swarm import coverage, route
from .loading import gather_actors, release_now
from .placement import StageSpec, even_spans
from .registry import HostedSpan, ensure_registry, hosted  # noqa: F401 (the records: part of the swarm's API)
from .policy import HostPolicy, model_key  # noqa: F401 (HostPolicy: part of the swarm's API)
from .routing import probe
from .stage import StageActor


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

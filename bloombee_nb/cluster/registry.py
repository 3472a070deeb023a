"""The swarm's registry: which worker hosts which span of which model, kept in the Dask scheduler.

A :class:`SwarmRegistry` is a Dask scheduler plugin (no second discovery service): its handlers
record hosted spans, *want* their actors' keys for the swarm (so the stages outlive the client that
placed them, as Dask's published datasets do), hand out claims to joining or moving workers one at
a time, and forget a worker's spans when it leaves. :mod:`bloombee_nb.cluster.swarm` (hosting) and
:mod:`bloombee_nb.cluster.routing` (using) are its clients; both read its records as :class:`HostedSpan`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from distributed.diagnostics.plugin import SchedulerPlugin

from ..errors import SwarmError
from ..plan.swarm import better_span, choose_span
from .placement import StageSpec

REGISTRY = "bloombee-swarm"          # the scheduler plugin's name
OWNER = "bloombee-swarm"             # the pseudo-client that wants hosted actors' keys on the scheduler


# ---- the registry (runs inside the Dask scheduler) -----------------------------------------------
class SwarmRegistry(SchedulerPlugin):
    """Which worker hosts which span of which model, kept on the scheduler.

    Handlers (called as ``client.scheduler.bloombee_swarm_*``): ``add`` records spans and wants
    their actors' keys for the swarm; ``remove`` forgets them (the actors stop when no client holds
    them either); ``list`` answers the records. A worker that leaves takes its records with it.
    """

    name = REGISTRY
    idempotent = True  # registering again (every client does) keeps the running registry

    #: a claimed span not hosted within this long (its worker failed to load it) is free again
    CLAIM_S = 120.0

    def __init__(self):
        self.spans: dict[str, dict] = {}
        self.claims: dict[tuple[str, str], tuple[tuple[int, int], float]] = {}  # (model, worker) -> (span, when)

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        scheduler.handlers.update({"bloombee_swarm_add": self.add, "bloombee_swarm_remove": self.remove,
                                   "bloombee_swarm_list": self.list, "bloombee_swarm_claim": self.claim,
                                   "bloombee_swarm_unclaim": self.unclaim,
                                   "bloombee_swarm_move": self.move})

    def claim(self, model: str, worker: str, n_layers: int, capacity: int) -> tuple[int, int]:
        """The span ``worker`` should host (``choose_span`` over what is hosted and claimed), claimed
        for it at once: workers joining together each get a different one."""
        now = time.time()
        self.claims = {k: v for k, v in self.claims.items() if now - v[1] < self.CLAIM_S}
        taken = [(r["start"], r["end"]) for r in self.spans.values() if r["model"] == model]
        taken += [span for (m, w), (span, _) in self.claims.items() if m == model and w != worker]
        span = choose_span(n_layers, taken, capacity)  # in replicas: a joining worker's speed is not known yet
        self.claims[(model, worker)] = (span, now)
        return span

    def unclaim(self, model: str, workers: list[str]) -> None:
        """Claims of ``workers`` that will not be hosted after all (their stages failed to load)."""
        for w in workers:
            self.claims.pop((model, w), None)

    def move(self, model: str, worker: str, capacity: int, by_speed: bool = False) -> tuple[int, int] | None:
        """Rebalancing, one worker at a time: the span ``worker`` should move to (claimed for it at
        once), or None — when staying is as good (``better_span``: in replicas, or ``by_speed`` in
        tokens/s from the spans' measured speeds, when every span has one), when it hosts no single span of
        ``model``, or while another worker's claim on ``model`` is in flight (a join or a move: the
        next check sees its result)."""
        now = time.time()
        self.claims = {k: v for k, v in self.claims.items() if now - v[1] < self.CLAIM_S}
        if any(m == model and w != worker for m, w in self.claims):
            return None
        recs = [r for r in self.spans.values() if r["model"] == model]
        mine = [r for r in recs if r["worker"] == worker]
        if len(mine) != 1:
            return None
        span = better_span(mine[0]["n_layers"], [(r["start"], r["end"]) for r in recs], recs.index(mine[0]),
                           capacity, _speeds(recs) if by_speed else None)
        if span is not None:
            self.claims[(model, worker)] = (span, now)
        return span

    def add(self, spans: list[dict]) -> None:
        for rec in spans:
            if rec["worker"] not in self.scheduler.workers:
                raise SwarmError(f"{rec['worker']} is not a worker of this cluster")
            self.scheduler.client_desires_keys(keys=[rec["key"]], client=OWNER)
            self.spans[rec["key"]] = rec
            self.claims.pop((rec["model"], rec["worker"]), None)

    def remove(self, keys: list[str]) -> None:
        keys = [k for k in keys if self.spans.pop(k, None) is not None]
        if keys:
            self.scheduler.client_releases_keys(keys=keys, client=OWNER, stimulus_id=f"bloombee-unhost-{time.time()}")

    def list(self) -> list[dict]:
        return list(self.spans.values())

    def remove_worker(self, scheduler, worker: str, *, stimulus_id: str, **kwargs) -> None:
        self.claims = {k: v for k, v in self.claims.items() if k[1] != worker}
        gone = [k for k, rec in self.spans.items() if rec["worker"] == worker]
        if gone:  # after Dask has finished removing the worker
            asyncio.get_running_loop().call_soon(self.remove, gone)


def _speeds(recs: list[dict]) -> list[float] | None:
    """Every record's measured seconds per layer, or None (count replicas) when one is unknown."""
    speeds = [float(r.get("layer_s") or 0.0) for r in recs]
    return speeds if speeds and all(x > 0 for x in speeds) else None


def ensure_registry(client) -> None:
    """Install the registry on the scheduler, once (later calls find it running)."""
    if not getattr(client, "_bloombee_swarm", False):
        try:
            client.register_plugin(SwarmRegistry())
        except Exception as exc:  # noqa: BLE001 — e.g. the scheduler's Python cannot import bloombee_nb
            raise SwarmError(f"the scheduler could not start the swarm's registry ({type(exc).__name__}: {exc}); "
                             "run the scheduler where bloombee_nb is installed (`bloombee-nb scheduler`, or "
                             "`dask scheduler` in the same environment)") from exc
        client._bloombee_swarm = True


# ---- its records, as clients read them ----------------------------------------------------------
@dataclass(frozen=True)
class HostedSpan:
    """One hosted stage: the one identity of a stage (worker address, name, span) plus its model."""

    model: str       # the model's key (see :func:`~bloombee_nb.cluster.policy.model_key`)
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
    """The spans the swarm hosts (of ``model``, a :func:`~bloombee_nb.cluster.policy.model_key`, when given)."""
    client = cluster.client
    ensure_registry(client)
    recs = client.sync(client.scheduler.bloombee_swarm_list)
    spans = [HostedSpan(**r) for r in recs]
    return sorted((s for s in spans if model is None or s.model == model), key=lambda s: (s.model, s.start, s.name))

"""``Deployment``: where one model's decoder layers run, and keeping them running.

A :class:`~bloombee_nb.generate.model.DistributedModelForCausalLM` does the client's arithmetic
(embeddings, norm, LM head) and drives transformers' ``generate``; everything about the layers'
whereabouts lives here:

- placing them (:meth:`Deployment.start`): attached to the swarm's hosted spans when it covers the
  model, otherwise the model's own spans — by hand (``spans``/``workers``), or as the DP planner
  chooses from a profile of the cluster (``plan="auto"``) — with the offload fractions, micro-batch
  and quantization formats that come with them;
- moving them (:meth:`Deployment.replan`), and a swarm client's new sessions off stages much busier
  than another route (:meth:`Deployment.chain_for_session`); the chains left behind are released
  when their last session closes;
- recovery (:meth:`Deployment.replacement_chain`): the chain a session that lost a stage goes on
  with — a re-route through the swarm's replicas, a chain another session already moved to, or
  spans re-placed on live workers — and the record of every recovery (``events``);
- the workers' names, kept for workers that are gone (events and panels name them);
- the cluster: an embedded one it started is closed with it.

Its options are one :class:`~bloombee_nb.generate.options.DeployConfig`, kept for every chain it makes.

Over 400 lines because placing, moving and recovering share one state (the chain, the chains left
behind, the plan, the names) under one lock; the helpers at the bottom are the plan's per-stage parts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from ..cluster import BloombeeCluster, Placement, connect, place
from ..cluster.chain import RemoteChain
from ..cluster.planning import runtime_plan
from ..cluster.profiling import measure_links, profile_cluster
from ..errors import RecoveryError, StageUnavailableError, SwarmError
from ..model.quantize import per_stage
from ..plan import ClusterProfile, Plan, Workload
from .options import DeployConfig
from .recovery import LEAVING, find_lost, live_workers, recovery_error, replacement_placement, settled_workers


class Deployment:
    def __init__(self, cluster: BloombeeCluster, options: DeployConfig, name: str, worker_path: str, n_layers: int,
                 dtype: torch.dtype, embed: torch.nn.Module, owns_cluster: bool = False):
        self.cluster, self.options, self.owns_cluster = cluster, options, owns_cluster
        self.name = name                 # the model as the user named it
        self.worker_path = worker_path   # what each worker opens: a path that exists there, or a Hub id
        self.n_layers = n_layers
        self.stage_options = options.stage_options(dtype)
        self.embed = embed               # compression="auto" calibrates on real hidden states
        self.chain: RemoteChain | None = None
        self.group = False               # concurrent decode steps travel together (fixed by the first plan)
        self.plan: Plan | None = None
        self.stage_formats: list[str | None] = []  # each stage's quantized format beyond stage_options' one
        self.profile: ClusterProfile | None = None
        self.events: list = []           # RecoveryEvents, oldest first (status and generation panels)
        self.worker_names: dict[str, str] = {}  # address -> Dask name, also of workers that are gone
        self.recover = options.recover   # sessions replay onto live workers when a stage is lost
        self.closed = False
        self._lock = threading.RLock()
        self._lost: dict = {}            # what the last recovery found lost (address -> LostWorker)
        self._retired: list[RemoteChain] = []  # chains new sessions left while some were open there
        self._route_checked = time.monotonic()  # when new sessions last asked for a less loaded route
        self.load_reroutes = 0           # times new sessions moved to a less loaded route (swarm)

    # ---- placing ------------------------------------------------------------------------------
    @classmethod
    def start(cls, cluster: BloombeeCluster | None, options: DeployConfig, name: str, worker_path: str,
              n_layers: int, dtype: torch.dtype, embed: torch.nn.Module) -> "Deployment":
        """The layers placed (or attached) on ``cluster`` (None: an embedded one, closed with this)."""
        owns = cluster is None
        self = cls(cluster or connect(), options, name, worker_path, n_layers, dtype, embed, owns_cluster=owns)
        try:
            self.chain = self._first_chain()
        except BaseException:
            if owns:
                self.cluster.close()
            raise
        self.remember_names(self.cluster.workers())
        self.cluster.deployments.add(self)
        return self

    def _first_chain(self) -> RemoteChain:
        opts, plan = self.options, self.options.plan
        workers, spans = opts.workers, opts.spans
        if plan == "auto":
            self.profile = profile_cluster(self.cluster, self.worker_path, workers, num_threads=opts.num_threads,
                                           formats=opts.formats)
            plan = runtime_plan(self.profile, opts.workload or Workload(), relay=opts.relay, formats=opts.plan_formats)
        if plan is not None:
            workers, spans = plan.workers, plan.layer_spans
        chain_options = opts.chain_options(plan)
        self.plan, self.group = plan, chain_options["group"]
        chain = None
        if opts.swarm and not opts.places_by_hand:
            chain = self._attach()
        if chain is None:
            placement = place(workers or self.cluster.worker_addresses(), self.n_layers, spans)
            per = _plan_offloads(plan, placement, self.stage_options) or [{} for _ in placement.stages]
            formats = (per_stage(opts.quantize, len(per)) if opts.per_stage_formats
                       else _plan_formats(plan, len(per), self.stage_options))
            chain = RemoteChain.create(self.cluster.client, placement, self.worker_path, **chain_options,
                                       **self.stage_options, per_stage=_with_formats(per, formats))
            self.stage_formats = formats
        if opts.compression == "auto":
            choose_compression(chain, self.cluster, self.embed, self.profile)
        return chain

    def _attach(self) -> RemoteChain | None:
        """The swarm's chain for the model (None: not covered and ``swarm="auto"``)."""
        from ..cluster.routing import attach_chain, missing_layers

        label = self._hosted_as()
        try:
            chain = attach_chain(self.cluster, self.worker_path, self.n_layers, dtype=label,
                                 **self.options.swarm_chain_options())
        except SwarmError:
            if self.options.swarm is True:
                raise
            return None  # "auto" on a scheduler without the swarm's registry: nothing can be hosted there anyway
        if chain is None and self.options.swarm is True:
            raise SwarmError(f"the swarm does not host layers {_ranges(missing_layers(self.cluster, self.worker_path, self.n_layers))} "
                             f"of {self.worker_path} in {label}: host them first (bb.host(...) or `bloombee-nb worker "
                             "SCHEDULER --host MODEL`), or load private spans with swarm=False")
        return chain

    def _hosted_as(self) -> str:
        """The label of hosted spans this model can attach to: its dtype, and its format if quantized."""
        fmt = self.stage_options.get("quantize")
        return self.stage_options["dtype"] + (f"+{fmt}" if fmt else "")

    @property
    def placement(self) -> Placement:
        """Which worker runs which layers now."""
        return self.chain.placement

    @property
    def attached(self) -> bool:
        """Whether the layers run on the swarm's hosted spans (shared) rather than this model's own."""
        return self.chain.shared

    def new_chain(self, placement: Placement, profile: ClusterProfile | None = None,
                  plan: Plan | None = None) -> RemoteChain:
        """Stages for ``placement`` with these options (the offload fractions and micro-batch of
        ``plan`` when it places exactly these spans), each layer in the format it had."""
        kwargs = dict(self.options.chain_options(plan), group=self.group, micro_batch=self._micro_batch(plan))
        formats = self._formats_for(placement, plan)
        per = _plan_offloads(plan, placement, self.stage_options) or [{} for _ in placement.stages]
        chain = RemoteChain.create(self.cluster.client, placement, self.worker_path, **kwargs, **self.stage_options,
                                   per_stage=_with_formats(per, formats))
        self.stage_formats = formats
        if chain.compression == "auto":
            choose_compression(chain, self.cluster, self.embed, profile)
        return chain

    def _formats_for(self, placement: Placement, plan: Plan | None) -> list[str | None]:
        """Each new stage's quantized format: ``plan``'s where it places exactly these spans and chose
        formats (or may: ``formats=``), otherwise the format its layers had — so a recovery or a move
        keeps what the user asked for. One format for every stage (``quantize="int8"``) travels in
        ``stage_options`` instead. Layers of different formats cannot share a stage (a span has one
        format): that is a RecoveryError saying what would help, never a silent change of format."""
        n = len(placement.stages)
        if "quantize" in self.stage_options:
            return [None] * n
        chosen = _plan_formats(plan, n, self.stage_options) if _places_exactly(plan, placement) else None
        if chosen is not None and (self.options.formats or any(chosen)):
            return chosen
        by_layer = self.layer_formats()
        if not any(by_layer):
            return [None] * n
        out = []
        for s in placement.stages:
            held = set(by_layer[s.start:s.end])
            if len(held) > 1:
                raise RecoveryError(
                    f"layers {s.start}–{s.end - 1} would go to one stage on worker {self.worker_names.get(s.worker, s.worker)}, "
                    f"but they were held in different formats ({', '.join(sorted(str(f or 'float') for f in held))}) and a "
                    "stage holds one: start a worker for the lost span (`bloombee-nb worker <scheduler>`; the session "
                    "recovers on its next step), or load the model with one format for all stages (quantize=...) or "
                    "with formats=[...] and plan=\"auto\" to let the planner choose again")
            out.append(held.pop())
        return out

    def layer_formats(self) -> list[str | None]:
        """The quantized format of each decoder layer in the current chain (None: float)."""
        out: list[str | None] = [self.stage_options.get("quantize")] * self.n_layers
        if self.chain is not None and len(self.stage_formats) == len(self.placement.stages):
            for s, fmt in zip(self.placement.stages, self.stage_formats):
                out[s.start:s.end] = [fmt or self.stage_options.get("quantize")] * (s.end - s.start)
        return out

    def _micro_batch(self, plan: Plan | None) -> int | None:
        """Rows per forward for a new chain: ``plan``'s when following plans, else the current chain's."""
        return self.options.micro_batch_for(plan) if plan is not None and self.options.micro_batch == "plan" \
            else self.chain.micro_batch

    def replan(self, workload: Workload | None = None, *, profile: ClusterProfile | None = None,
               plan: Plan | None = None) -> Plan:
        """Measure the cluster again (or take ``profile``), re-solve, and move the spans if the plan
        changed them (sessions already open finish on the chain they opened on)."""
        workload = workload or (self.plan.workload if self.plan is not None else Workload())
        profile = profile or profile_cluster(self.cluster, self.worker_path, num_threads=self.options.num_threads,
                                             formats=self.options.formats)
        plan = plan or runtime_plan(profile, workload, relay=self.chain.relay, formats=self.options.plan_formats)
        placement = place(plan.workers, self.n_layers, plan.layer_spans)
        micro_batch = self._micro_batch(plan)
        if (placement != self.placement or _offloads(plan, placement) != _offloads(self.plan, placement)
                or micro_batch != self.chain.micro_batch or self._formats_for(placement, plan) != self.stage_formats):
            self._move_on(self.new_chain(placement, profile, plan))
        self.plan, self.profile = plan, profile
        return plan

    def chain_for_session(self) -> RemoteChain:
        """The chain a new session opens on: the current one, except that a swarm client asks at
        most every ``swarm_reroute_s`` whether another route through the replicas is much less
        loaded (``cluster/routing.py: lighter_route``) and then moves its new sessions there."""
        every = self.options.swarm_reroute_s
        if not self.chain.shared or every is None or time.monotonic() - self._route_checked < every:
            return self.chain
        from ..cluster.routing import lighter_chain

        with self._lock:
            if time.monotonic() - self._route_checked >= every and not self.closed:
                self._route_checked = time.monotonic()
                try:
                    lighter = lighter_chain(self.cluster, self.worker_path, self.n_layers, self.chain,
                                            dtype=self._hosted_as(), **self.options.swarm_chain_options())
                except (SwarmError, OSError):
                    lighter = None  # the registry did not answer: the session opens where it would have
                if lighter is not None:
                    self._move_on(lighter)
                    self.load_reroutes += 1
            return self.chain

    def _move_on(self, chain: RemoteChain) -> None:
        """New sessions open on ``chain``; the current one is released when its last session closes."""
        old, self.chain = self.chain, chain
        old.retire()
        self._retired = [c for c in [*self._retired, old] if not c.released]

    # ---- recovery -----------------------------------------------------------------------------
    def replacement_chain(self, old: RemoteChain, exc: StageUnavailableError):
        """``(chain, lost workers, reused)``: where a session that failed on ``old`` goes on.

        Serialized: when several sessions fail at once, the first re-places the spans and the
        others find the current chain healthy (its workers are not among the lost ones) and reuse it.
        A swarm client re-routes through the replicas left instead (nothing reloads). The failed
        chains are released first, freeing their spans' memory on the workers that stay before the
        new spans load there.
        """
        with self._lock:
            if self.closed:
                raise RecoveryError("the model was closed; load it again with from_pretrained and open a new session")
            workers = settled_workers(self.cluster, exc, self.cluster.workers())
            self.remember_names(workers)
            current = self.chain
            lost = find_lost(old, exc, workers, self.worker_names)
            if old.released:  # a recovery of it failed before: what it found lost then cannot be pinged now
                lost = {**{a: w for a, w in self._lost.items() if a in workers}, **lost}
            if current is not old:
                lost.update(find_lost(current, exc, workers, self.worker_names))
                if not current.released and not set(current.placement.workers) & set(lost):
                    old.release()
                    return current, tuple(lost.values()), True
            if current.shared:  # a swarm client re-routes through the replicas left: nothing reloads
                return self._reroute(old, current, lost), tuple(lost.values()), False
            placement, plan = replacement_placement(
                current.placement, lost, live_workers(workers, lost), self.n_layers,
                profile=self.profile, workload=self.plan.workload if self.plan is not None else None,
                relay=current.relay, names=self.worker_names, formats=self.options.plan_formats)
            self._lost = lost
            old.release()
            current.release()
            try:
                self.chain = self.new_chain(placement, self.profile, plan)
            except (StageUnavailableError, RecoveryError):
                raise  # another worker went while loading (the session tries again), or said what would help
            except Exception as cause:
                raise recovery_error(lost, placement, cause) from cause
            self.plan = plan if plan is not None else self.plan
            return self.chain, tuple(lost.values()), False

    def _reroute(self, old: RemoteChain, current: RemoteChain, lost: dict) -> RemoteChain:
        from ..cluster.routing import attach_chain, missing_layers

        self._lost = lost
        # a stage that said "leaving" is routed around by its ping answer; its worker may host
        # another span (a rebalancing move), so only workers that failed are excluded
        exclude = {a for a, w in lost.items() if w.why != LEAVING}
        deadline = time.monotonic() + self.options.swarm_heal_s
        while (chain := attach_chain(self.cluster, self.worker_path, self.n_layers, dtype=self._hosted_as(),
                                     exclude=exclude, prefer={r.key for r in old.refs},
                                     **self.options.swarm_chain_options())) is None \
                and time.monotonic() < deadline:
            time.sleep(0.25)  # layers no one else hosts: wait for a lender to take them (bb.rebalance)
        if chain is None:
            gone = missing_layers(self.cluster, self.worker_path, self.n_layers)
            raise RecoveryError(f"the swarm no longer hosts layers {_ranges(gone) or 'of a live route'} of "
                                f"{self.worker_path}: host them (bb.host(model, cluster, workers=[...], spans=[...]) "
                                "or `bloombee-nb worker SCHEDULER --host MODEL`); the session resumes on the next step")
        old.release()
        current.release()
        self.chain = chain
        return chain

    def remember_names(self, workers: dict[str, dict]) -> None:
        self.worker_names.update({a: str(w.get("name", a)) for a, w in workers.items()})

    def link_codecs(self, client_name: str | None = None) -> dict[tuple[str, str], str]:
        """``(sender, receiver) -> codec`` for every link the hidden states cross, by worker name
        (the client as in the profile, default "client"): what the link map labels."""
        info = self.cluster.workers()
        client_name = client_name or (self.profile.client if self.profile is not None else "client")
        name = lambda i: client_name if i == -1 else str(  # noqa: E731
            info.get(self.placement.stages[i].worker, {}).get("name", self.placement.stages[i].worker))
        return {(name(s), name(d)): str(p) for s, d, p in self.chain.link_codecs()}

    def close(self) -> None:
        """Free the spans on the workers (and stop the embedded cluster if this started it)."""
        self.closed = True
        for chain in [*self._retired, self.chain]:
            chain.release()
        self.cluster.deployments.discard(self)
        if self.owns_cluster:
            self.cluster.close()


def worker_path(name_or_path: str | Path, resolved: Path) -> str:
    """What the workers open: the resolved folder of a local checkpoint, a Hub id as given."""
    return str(name_or_path if not Path(name_or_path).expanduser().exists() else resolved.resolve())


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    out, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}–{x}" if x > start else str(x))
            start = None
    return ", ".join(out)


def _places_exactly(plan: Plan | None, placement: Placement) -> bool:
    """Whether ``plan`` puts the same spans on the same workers as ``placement``."""
    return plan is not None and [(s.address, s.start, s.end) for s in plan.stages] == [
        (s.worker, s.start, s.end) for s in placement.stages]


def _plan_offloads(plan: Plan | None, placement: Placement, stage_options: dict) -> list[dict] | None:
    """Each stage's offload fractions from ``plan`` (when it places exactly ``placement``'s spans),
    except those given for every stage explicitly."""
    if not _places_exactly(plan, placement):
        return None
    return [{k: v for k, v in dict(weight_offload=s.weight_offload, kv_offload=s.kv_offload).items()
             if k not in stage_options} for s in plan.stages]


def _plan_formats(plan: Plan | None, n_stages: int, stage_options: dict) -> list[str | None]:
    """Each stage's quantization format from ``plan`` (its stages' ``quantize``) unless one was given for all."""
    formats = [getattr(s, "quantize", None) for s in plan.stages] if plan is not None else []
    return formats if len(formats) == n_stages and "quantize" not in stage_options else [None] * n_stages


def _with_formats(per: list[dict], formats: list[str | None]) -> list[dict]:
    """Each stage's keywords with its quantized format added where it has one."""
    return [{**d, "quantize": q} if q else d for d, q in zip(per, formats)]


def _offloads(plan: Plan | None, placement: Placement) -> list[tuple[float, float]]:
    per = _plan_offloads(plan, placement, {}) or [{}] * len(placement.stages)
    return [(d.get("weight_offload", 0.0), d.get("kv_offload", 0.0)) for d in per]


def choose_compression(chain: RemoteChain, cluster: BloombeeCluster, embed: torch.nn.Module,
                       profile: ClusterProfile | None = None) -> None:
    """``compression="auto"``: each link of ``chain`` gets the codec that pays on its bandwidth.

    Bandwidths come from ``profile`` when it has the link, otherwise the chain's own links are
    measured now (real frames, the hidden states' path). The calibration sample is a real
    hidden state: the embeddings of 4096 random token ids, which is what the first stage receives.
    """
    info = cluster.workers()
    names = {a: str(info.get(a, {}).get("name", a)) for a in chain.placement.workers}
    client_name = profile.client if profile is not None else "client"
    node = lambda i: client_name if i == -1 else chain.placement.stages[i].worker  # noqa: E731
    label = lambda i: client_name if i == -1 else names[node(i)]  # noqa: E731
    bw = {}
    for s, d in chain.hops():
        link = profile.link(label(s), label(d)) if profile is not None else None
        if link is not None:
            bw[(s, d)] = link.bandwidth_bytes_per_s
    missing = [(node(s), node(d)) for s, d in chain.hops() if (s, d) not in bw]
    if missing:
        measured = {(ln.src, ln.dst): ln for ln in measure_links(cluster.client, chain.placement.workers, names,
                                                                 client_name, pairs=missing)}
        for s, d in chain.hops():
            bw.setdefault((s, d), measured[(label(s), label(d))].bandwidth_bytes_per_s)
    with torch.no_grad():
        sample = embed(torch.randint(0, embed.num_embeddings, (1, 4096), generator=torch.Generator().manual_seed(0)))
    chain.choose_compression(bw, sample[0])

"""``DistributedModelForCausalLM``: a transformers model whose decoder layers live on Dask workers.

The client holds the token embeddings, the final norm and the LM head; the layers run on the
chain of stages. ``forward`` returns logits and takes an :class:`InferenceSession` as its
``cache``, so transformers' own ``generate`` (greedy, sampling, top-k/p, streamers, stopping
criteria, left-padded batches) drives it unchanged.
"""

from __future__ import annotations

import html
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..cluster import BloombeeCluster, Placement, connect, place
from ..cluster.chain import (DEFAULT_CALL_TIMEOUT_S, DEFAULT_LIVENESS_INTERVAL_S, DEFAULT_PING_TIMEOUT_S,
                             DEFAULT_PREFILL_CHUNK, RemoteChain)
from ..errors import RecoveryError, StageUnavailableError, SwarmError
from ..cluster.profiling import measure_links, profile_cluster
from ..model.checkpoint import resolve_checkpoint
from ..model.family import ClientMath, client_math, load_client_parts, load_config
from ..model.quantize import canonical, per_stage
from ..cluster.planning import runtime_plan
from ..plan import ClusterProfile, Plan, Workload
from .recovery import find_lost, live_workers, recovery_error, replacement_placement
from .session import InferenceSession
from .tree_size import tree_size


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PreTrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True  # the stages run sdpa; the client itself has no attention
    _tree_policy = None    # set for the duration of a speculative generate() (see _assisted_decoding)

    def __init__(self, config, embed_tokens, norm, lm_head, chain: RemoteChain, cluster: BloombeeCluster):
        super().__init__(config)
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head
        self.chain, self.cluster = chain, cluster
        self._owns_cluster = False
        self.auto_recover = True     # sessions replay onto live workers when a stage is lost (session.py)
        self.events: list = []       # RecoveryEvents, oldest first (status and generation panels)
        self._worker_names: dict[str, str] = {}  # address -> Dask name, also of workers that are gone
        self._recovery_lock = threading.RLock()
        self._lost: dict = {}        # what the last recovery found lost (address -> LostWorker)
        self._closed = False

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, cluster: BloombeeCluster | None = None,
                        spans: list[tuple[int, int]] | None = None, workers: list[str] | None = None,
                        plan: "str | Plan | None" = None, workload: Workload | None = None,
                        dtype: torch.dtype | str | None = None, num_threads: int = 1,
                        allow_unverified_architecture: bool = False,
                        call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S, client_threads: int | str | None = "auto",
                        relay: str = "chain", compression: str | None = None, recover: bool = True,
                        ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S,
                        liveness_interval_s: float | None = DEFAULT_LIVENESS_INTERVAL_S,
                        micro_batch: int | str | None = "plan", merge: bool = True, group: bool | None = None,
                        prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, swarm: bool | str = "auto",
                        quantize: str | list | None = None, **stage_kwargs) -> "DistributedModelForCausalLM":
        """Load the client parts here and place the decoder layers on the cluster's workers.

        - ``spans``: the layer ranges per stage (default: an even split over ``workers``, which
          default to every worker of the cluster).
        - ``plan="auto"``: measure the cluster (:func:`~bloombee_nb.cluster.profiling.profile_cluster`)
          and place the spans the planner chooses for ``workload`` (default: one sequence,
          latency); a :class:`~bloombee_nb.plan.Plan` value is applied as given.
        - ``relay="chain"`` forwards hidden states stage to stage; ``"star"`` makes the client
          relay every hop (the Petals-style baseline).
        - ``compression="auto"`` chooses per link and frame size the codec that pays for itself
          on that link's measured bandwidth (raw where compressing costs more time than it
          saves: see :mod:`bloombee_nb.transport.choice`); a blosc2 codec label (e.g.
          ``"zstd-1+shuffle"``) uses that codec for frames of 64 KiB or more on every link;
          ``None`` sends raw bytes.
        - ``client_threads`` caps torch's threads for the client's own work (embeddings, norm, LM
          head): "auto" uses 1 when workers share this machine, where OpenMP threads competing
          with the workers' made a batch-8 LM head 50x slower.
        - ``cluster=None`` starts an embedded LocalCluster that this model owns and closes in
          :meth:`close`.
        - Batching: ``micro_batch`` rows at most per forward on a stage ("plan": the plan's
          micro-batch, else no limit). A batch of more rows is split into micro-batches that
          flow through the chain one behind the other, and decode steps of different sessions that
          reach a stage together run as one forward (``merge=False``: one step at a time, as a
          Petals server does). ``group=True``: this client's concurrent sessions' decode steps
          travel the chain together, one message per hop, waiting up to one traversal for each
          other — more tokens/s under load, more latency when the stages are idle (default: on for
          a plan made for throughput, off otherwise). Prompts longer than ``prefill_chunk`` tokens are sent in chunks, so
          other sessions keep decoding while a long prompt is read (``None``: in one piece).
        - Offloading: ``weight_offload`` / ``kv_offload`` (fractions, every stage); with a plan,
          each stage takes the plan's own fractions unless these are given.
        - Failures: a call fails after ``call_timeout_s`` at the latest; while it waits, the scheduler
          is asked every ``liveness_interval_s`` whether the stages' workers are still there, and
          each stage is pinged — silent for ``ping_timeout_s`` counts as hung. ``recover=True``:
          a session that loses a stage re-places the spans on live workers and replays its history
          there (exact; ``model.events`` records each recovery); ``False``: the error is raised.

        - Swarm (``cluster/swarm.py``): when the cluster's swarm hosts every layer of the model
          (``bb.host``, ``bloombee-nb worker --host``), ``swarm="auto"`` (the default, unless
          ``spans``/``workers``/``plan`` place layers by hand) attaches to those spans — routed
          through the replicas from this client's own measurements, nothing loaded on its behalf;
          otherwise it places its own, private spans. ``swarm=True`` insists on attaching
          (:class:`~bloombee_nb.errors.SwarmError` naming the missing layers); ``False`` never does.
        - ``quantize``: the stages' linear weights in ``"int8"`` or ``"nf4"``/``"int4"`` (one format, or a
          list of one per stage, ``None`` for float): see :mod:`bloombee_nb.model.quantize`; a plan's own
          per-stage formats apply when this is not given. A swarm is attached only if it hosts that format.

        Each worker reads only its own span from its own copy of the checkpoint (a local path
        that exists there, or a Hub id).
        """
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        path = resolve_checkpoint(name_or_path)
        config = load_config(path, allow_unverified_architecture)
        config, embed, norm, head, dtype = load_client_parts(path, config, dtype)
        owns = cluster is None
        cluster = cluster or connect()
        worker_path = str(name_or_path if not Path(name_or_path).expanduser().exists() else path.resolve())
        stage_kwargs.update(num_threads=num_threads, allow_unverified_architecture=allow_unverified_architecture,
                            dtype=str(dtype).removeprefix("torch."))
        stage_kwargs.setdefault("merge", merge)
        chain_kwargs = dict(timeout_s=call_timeout_s, relay=relay, compression=compression,
                            liveness_interval_s=liveness_interval_s, ping_timeout_s=ping_timeout_s,
                            prefill_chunk=prefill_chunk)
        try:
            profile = None
            if plan == "auto":
                profile = profile_cluster(cluster, worker_path, workers, num_threads=num_threads)
                plan = runtime_plan(profile, workload or Workload(), relay=relay)
            if plan is not None:
                workers, spans = plan.workers, plan.layer_spans
            chain_kwargs["micro_batch"] = _micro_batch(micro_batch, plan)
            chain_kwargs["group"] = (merge and plan is not None and plan.objective == "throughput") if group is None else group
            chain, listed = None, isinstance(quantize, (list, tuple))  # one format per stage, or one for all
            if not listed and canonical(quantize):
                stage_kwargs["quantize"] = canonical(quantize)  # every stage, replacements after a recovery too
            if swarm and plan is None and spans is None and workers is None and not listed:
                label = stage_kwargs["dtype"] + (f"+{stage_kwargs['quantize']}" if "quantize" in stage_kwargs else "")
                chain = _attach(cluster, worker_path, config.num_hidden_layers, label, swarm, chain_kwargs)
            if chain is None:
                placement = place(workers or cluster.worker_addresses(), config.num_hidden_layers, spans)
                per = _plan_offloads(plan, placement, stage_kwargs) or [{} for _ in placement.stages]
                formats = per_stage(quantize, len(per)) if listed else _plan_formats(plan, len(per), stage_kwargs)
                chain = RemoteChain.create(cluster.client, placement, worker_path, **chain_kwargs, **stage_kwargs,
                                           per_stage=[{**d, "quantize": q} if q else d for d, q in zip(per, formats)])
            if compression == "auto":
                choose_compression(chain, cluster, embed, profile)
        except BaseException:
            if owns:
                cluster.close()
            raise
        config._name_or_path = str(name_or_path)
        model = cls(config, embed, norm, head, chain, cluster)
        model._owns_cluster, model.plan, model.profile = owns, plan, profile
        model._worker_path, model._stage_kwargs, model._chain_kwargs = worker_path, stage_kwargs, chain_kwargs
        model._micro_batch_setting = micro_batch
        model.auto_recover = recover
        model._remember_names(cluster.workers())
        model.client_threads = (1 if cluster.shares_host() else None) if client_threads == "auto" else client_threads
        model.generation_config = _generation_config(path, config)
        cluster._models.add(model)
        return model.eval()

    @property
    def placement(self) -> Placement:
        return self.chain.placement

    @property
    def attached(self) -> bool:
        """Whether the layers run on the swarm's hosted spans (shared) rather than this model's own."""
        return self.chain.shared

    def replan(self, workload: Workload | None = None, *, profile: ClusterProfile | None = None,
               plan: Plan | None = None) -> Plan:
        """Measure the cluster again (or take ``profile``), re-solve, and move the spans.

        Open sessions are not disturbed: each finishes on the chain it was opened on, whose
        actors are freed when its last session closes. New sessions use the new placement.
        """
        workload = workload or (self.plan.workload if self.plan is not None else Workload())
        profile = profile or profile_cluster(self.cluster, self._worker_path,
                                             num_threads=self._stage_kwargs["num_threads"])
        plan = plan or runtime_plan(profile, workload, relay=self.chain.relay)
        placement = place(plan.workers, self.config.num_hidden_layers, plan.layer_spans)
        if (placement != self.placement or _offloads(plan, placement) != _offloads(self.plan, placement)
                or self._planned_micro_batch(plan) != self.chain.micro_batch):
            self.chain = self._new_chain(placement, profile, plan)
        self.plan, self.profile = plan, profile
        return plan

    def _planned_micro_batch(self, plan: Plan | None) -> int | None:
        """The micro-batch a chain for ``plan`` runs with (the plan's, when the model follows plans)."""
        if plan is None or self._micro_batch_setting != "plan":
            return self.chain.micro_batch
        return _micro_batch("plan", plan)

    @property
    def micro_batch(self) -> int | None:
        """Rows per forward on a stage and per micro-batch (None: no limit)."""
        return self.chain.micro_batch

    def _new_chain(self, placement: Placement, profile: ClusterProfile | None = None,
                   plan: Plan | None = None) -> RemoteChain:
        """Stages for ``placement`` with this model's settings (relay, compression, timeouts; the
        offload fractions of ``plan`` when it places exactly these spans)."""
        kwargs = dict(self._chain_kwargs, micro_batch=self._planned_micro_batch(plan))
        chain = RemoteChain.create(self.cluster.client, placement, self._worker_path, **kwargs, **self._stage_kwargs,
                                   per_stage=_plan_offloads(plan, placement, self._stage_kwargs))
        if chain.compression == "auto":
            choose_compression(chain, self.cluster, self.embed_tokens, profile)
        return chain

    # ---- recovery -----------------------------------------------------------------------------
    def _replacement_chain(self, old: RemoteChain, exc: StageUnavailableError):
        """``(chain, lost workers, reused)``: where a session that failed on ``old`` goes on.

        One recovery at a time; every session of the model moves to the same chain: the first to
        fail re-places the spans (see :mod:`.recovery`), the others find the model's chain healthy
        and reuse it. The failed chains are released first, freeing their spans' memory on the
        workers that stay before the new spans load there.
        """
        with self._recovery_lock:
            if self._closed:
                raise RecoveryError("the model was closed; load it again with from_pretrained and open a new session")
            workers = self.cluster.workers()
            self._remember_names(workers)
            current = self.chain
            lost = find_lost(old, exc, workers, self._worker_names)
            if old.released:  # a recovery of it failed before: what it found lost then cannot be pinged now
                lost = {**{a: w for a, w in self._lost.items() if a in workers}, **lost}
            if current is not old:
                lost.update(find_lost(current, exc, workers, self._worker_names))
                if not current.released and not set(current.placement.workers) & set(lost):
                    old.release()
                    return current, tuple(lost.values()), True
            if current.shared:  # a swarm client re-routes through the replicas left: nothing reloads
                return self._reroute(old, current, lost), tuple(lost.values()), False
            placement, plan = replacement_placement(
                current.placement, lost, live_workers(workers, lost), self.config.num_hidden_layers,
                profile=self.profile, workload=self.plan.workload if self.plan is not None else None,
                relay=current.relay, names=self._worker_names)
            self._lost = lost
            old.release()
            current.release()
            try:
                self.chain = self._new_chain(placement, self.profile, plan)
            except StageUnavailableError:
                raise  # another worker went while loading: the session tries again without it
            except Exception as cause:
                raise recovery_error(lost, placement, cause) from cause
            self.plan = plan if plan is not None else self.plan
            return self.chain, tuple(lost.values()), False

    def _reroute(self, old: RemoteChain, current: RemoteChain, lost: dict) -> RemoteChain:
        from ..cluster.swarm import attach_chain, missing_layers

        self._lost = lost
        chain = attach_chain(self.cluster, self._worker_path, self.config.num_hidden_layers,
                             dtype=self._stage_kwargs["dtype"], exclude=set(lost), **_swarm_kwargs(self._chain_kwargs))
        if chain is None:
            gone = missing_layers(self.cluster, self._worker_path, self.config.num_hidden_layers)
            raise RecoveryError(f"the swarm no longer hosts layers {_ranges(gone) or 'of a live route'} of "
                                f"{self.name_or_path}: host them (bb.host(model, cluster, workers=[...], spans=[...]) "
                                "or `bloombee-nb worker SCHEDULER --host MODEL`); the session resumes on the next step")
        old.release()
        current.release()
        self.chain = chain
        return chain

    def _remember_names(self, workers: dict[str, dict]) -> None:
        self._worker_names.update({a: str(w.get("name", a)) for a, w in workers.items()})

    def link_codecs(self, client_name: str | None = None) -> dict[tuple[str, str], str]:
        """``(sender, receiver) -> codec`` for every link the hidden states cross, by worker name
        (the client as in the profile, default "client"): what the link map labels."""
        info = self.cluster.workers()
        client_name = client_name or (self.profile.client if self.profile is not None else "client")
        name = lambda i: client_name if i == -1 else str(  # noqa: E731
            info.get(self.placement.stages[i].worker, {}).get("name", self.placement.stages[i].worker))
        return {(name(s), name(d)): str(p) for s, d, p in self.chain.link_codecs()}

    # ---- sessions and forward ---------------------------------------------------------------
    def inference_session(self, max_length: int) -> InferenceSession:
        """A session that keeps its KV cache on the stages between calls (multi-turn, streaming)."""
        return InferenceSession(self, max_length)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str | None:
        """Mixture-of-experts layers run on the stages (their own transformers class picks the experts
        kernel there); the client holds none, so there is nothing to check here."""
        return requested_experts

    @property
    def client_math(self) -> ClientMath:
        """The family's arithmetic around the chain (embedding multiplier, logit scale, soft-capping),
        from the adapter table in ``model/family.py``."""
        return client_math(self.config)

    def get_output_embeddings(self):
        return self.lm_head

    @torch.inference_mode()
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: InferenceSession | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, past_key_values: InferenceSession | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits for the new positions. Without a ``cache`` a one-off session is opened and closed."""
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        with _torch_threads(self.client_threads):
            return self._forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, logits_to_keep)

    def _forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, logits_to_keep):
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, T, D]
        B, T = hidden.shape[:2]
        if cache is None:
            with self.inference_session(max_length=T) as once:
                return self.forward(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                                    cache=once, logits_to_keep=logits_to_keep)
        past = cache.get_seq_length()
        new_mask = (torch.ones(B, T, dtype=torch.long) if attention_mask is None
                    else attention_mask[:, -T:].to(torch.long))
        if position_ids is None:  # what transformers does when generate() did not give positions
            position_ids = torch.arange(past, past + T).expand(B, T)
        math = self.client_math
        hidden = cache.step(math.inputs(hidden.to(self.dtype)), position_ids.to(torch.long), new_mask)
        hidden = self.norm(hidden)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = math.logits(self.lm_head(hidden[:, keep, :]))
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def generate(self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None,
                 assistant_model=None, tree_widths: tuple[int, ...] | str = "auto", **kwargs):
        """transformers' ``generate``; opens a session sized for prompt + new tokens unless one is given.

        ``assistant_model=draft`` (transformers' convention for assisted generation) runs our tree
        speculation (:mod:`.speculative`): the draft proposes a token tree, the chain verifies it in
        one traversal. ``tree_widths``: children per node at each depth, e.g. ``(2, 2, 1)``; ``(1,) *
        k`` is a linear draft of k tokens; ``"auto"`` chooses per round from the measured link,
        compute and acceptance (and decodes plainly where speculation does not pay).
        """
        if assistant_model is None:
            if tree_widths != "auto":
                raise ValueError("tree_widths applies to speculative decoding: pass assistant_model=<draft model>")
            return self._generate(inputs, session, None, kwargs)
        from .speculative import check_draft
        from .tree_size import MAX_NODES, TreePolicy

        check_draft(self, assistant_model, kwargs.get("tokenizer"), kwargs.get("assistant_tokenizer"))
        if (kwargs.get("num_beams") or 1) > 1:
            raise ValueError("speculative decoding works with greedy decoding and sampling, not beam search "
                             "(num_beams=1)")
        policy = TreePolicy(widths=tuple(tree_widths) if tree_widths != "auto" else "auto")
        room = MAX_NODES if policy.widths == "auto" else tree_size(policy.widths)
        self._tree_policy = policy
        try:
            return self._generate(inputs, session, room, dict(kwargs, assistant_model=assistant_model))
        finally:
            self._tree_policy = None

    def _generate(self, inputs, session, tree_room: int | None, kwargs):
        if session is not None or kwargs.get("cache") is not None:
            kwargs.setdefault("cache", session)
            return super().generate(inputs, **kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_len = ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        cfg = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", cfg.max_new_tokens)
        max_length = prompt_len + new if new is not None else kwargs.get("max_length", cfg.max_length)
        if tree_room is not None:  # the tree's tokens, and (batch > 1) room for rows that run ahead
            batch = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            max_length += tree_room + (max_length - prompt_len if batch > 1 else 0)
        with self.inference_session(max_length=max_length) as s:
            return super().generate(inputs, cache=s, **kwargs)

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                           synced_gpus=False, streamer=None, inputs_tensor=None, assistant_model=None,
                           assistant_tokenizer=None, tokenizer=None, **model_kwargs):
        """Where transformers' ``generate`` dispatches assisted generation: our token-tree speculation."""
        from .speculative import speculative_decoding

        return speculative_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                    draft=assistant_model, streamer=streamer,
                                    policy=getattr(self, "_tree_policy", None), **model_kwargs)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the spans on the workers (and stop the embedded cluster if this model started it)."""
        self._closed = True
        self.chain.release()
        self.cluster._models.discard(self)
        if self._owns_cluster:
            self.cluster.close()

    def __repr__(self):
        spans = ", ".join(f"{s.start}–{s.end - 1}@{s.worker}" for s in self.placement.stages)
        where = "attached to the swarm's spans" if self.attached else "own spans"
        return f"<DistributedModelForCausalLM {self.name_or_path} [{spans}] ({where})>"

    def _repr_html_(self):
        rows = "".join(f"<tr><td>{i}</td><td><code>{html.escape(s.worker)}</code></td><td>{s.start}–{s.end - 1}</td>"
                       f"<td>{s.n_layers}</td></tr>" for i, s in enumerate(self.placement.stages))
        return (f"<div><b>DistributedModelForCausalLM</b> {html.escape(str(self.name_or_path))} "
                f"({self.config.model_type}, {self.config.num_hidden_layers} layers, {self.dtype}; "
                f"{'attached to the swarm: these spans are hosted for every client' if self.attached else 'its own spans: loaded for this client, freed by close()'})"
                f"<table><tr><th>stage</th><th>worker</th><th>layers</th><th>#</th></tr>{rows}</table></div>")


def _attach(cluster, path: str, n_layers: int, dtype: str, swarm: bool | str, chain_kwargs: dict):
    """The swarm's chain for the model (None: not covered and ``swarm="auto"``)."""
    from ..cluster.swarm import attach_chain, missing_layers

    try:
        chain = attach_chain(cluster, path, n_layers, dtype=dtype, **_swarm_kwargs(chain_kwargs))
    except SwarmError:
        if swarm is True:
            raise
        return None  # "auto" on a scheduler without the swarm's registry: nothing can be hosted there anyway
    if chain is None and swarm is True:
        raise SwarmError(f"the swarm does not host layers {_ranges(missing_layers(cluster, path, n_layers))} of {path} "
                         f"in {dtype}: host them first (bb.host(...) or `bloombee-nb worker SCHEDULER --host MODEL`), "
                         "or load private spans with swarm=False")
    return chain


#: How often a swarm client's slow call checks its stages' workers: failing over is only a re-route
#: to a replica that already holds the weights, so finding the loss fast is most of the pause.
SWARM_LIVENESS_INTERVAL_S = 0.2


def _swarm_kwargs(chain_kwargs: dict) -> dict:
    if chain_kwargs.get("liveness_interval_s") == DEFAULT_LIVENESS_INTERVAL_S:  # the user left the default
        return {**chain_kwargs, "liveness_interval_s": SWARM_LIVENESS_INTERVAL_S}
    return chain_kwargs


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    out, start = [], None
    for i, x in enumerate(layers):
        start = x if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}–{x}" if x > start else str(x))
            start = None
    return ", ".join(out)


def _micro_batch(setting: int | str | None, plan: Plan | None) -> int | None:
    if setting == "plan":
        return plan.micro_batch if plan is not None else None
    if setting is not None and (not isinstance(setting, int) or setting < 1):
        raise ValueError(f"micro_batch must be a positive number of rows, \"plan\" or None, got {setting!r}")
    return setting


def _plan_offloads(plan: Plan | None, placement: Placement, stage_kwargs: dict) -> list[dict] | None:
    """Each stage's offload fractions from ``plan`` (when it places exactly ``placement``'s spans),
    except those given for every stage explicitly."""
    if plan is None or [(s.address, s.start, s.end) for s in plan.stages] != [
            (s.worker, s.start, s.end) for s in placement.stages]:
        return None
    return [{k: v for k, v in dict(weight_offload=s.weight_offload, kv_offload=s.kv_offload).items()
             if k not in stage_kwargs} for s in plan.stages]


def _plan_formats(plan: Plan | None, n_stages: int, stage_kwargs: dict) -> list[str | None]:
    """Each stage's quantization format from ``plan`` (its stages' ``quantize``) unless one was given for all."""
    formats = [getattr(s, "quantize", None) for s in plan.stages] if plan is not None else []
    return formats if len(formats) == n_stages and "quantize" not in stage_kwargs else [None] * n_stages


def _offloads(plan: Plan | None, placement: Placement) -> list[tuple[float, float]]:
    per = _plan_offloads(plan, placement, {}) or [{}] * len(placement.stages)
    return [(d.get("weight_offload", 0.0), d.get("kv_offload", 0.0)) for d in per]


@contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _generation_config(path: Path, config) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(config)


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


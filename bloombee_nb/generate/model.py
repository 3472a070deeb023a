"""``DistributedModelForCausalLM``: a transformers model whose decoder layers live on Dask workers.

The client holds the token embeddings, the final norm and the LM head; the layers run on the
chain of stages. ``forward`` returns logits and takes an :class:`InferenceSession` as its
``cache``, so transformers' own ``generate`` (greedy, sampling, top-k/p, streamers, stopping
criteria, left-padded batches) drives it unchanged.
"""

from __future__ import annotations

import html
import weakref
from pathlib import Path

import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..cluster import BloombeeCluster
from ..model.checkpoint import resolve_checkpoint
from ..model.family import ClientMath, client_math, load_client_parts, load_config
from ..plan import ClusterProfile, Plan, Workload
from .deployment import Deployment, worker_path
from .options import DeployConfig
from .session import InferenceSession
from .speculative import check_draft, speculative_decoding
from .threads import torch_threads
from .tree_size import MAX_NODES, TreePolicy, tree_size


def _of_deployment(attr: str, doc: str | None = None, settable: bool = False) -> property:
    """The model's attribute that is its deployment's ``attr``."""
    setter = (lambda self, value: setattr(self.deployment, attr, value)) if settable else None
    return property(lambda self: getattr(self.deployment, attr), setter, doc=doc)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PreTrainedConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True  # the stages run sdpa; the client itself has no attention

    def __init__(self, config, embed_tokens, norm, lm_head, deployment: Deployment):
        super().__init__(config)
        self.embed_tokens, self.norm, self.lm_head = embed_tokens, norm, lm_head
        self.deployment = deployment
        cluster = deployment.cluster
        threads = deployment.options.client_threads
        self.client_threads = (1 if cluster.shares_host() else None) if threads == "auto" else threads
        #: draft model -> the acceptance measured by the last speculative generation with it: the next
        #: one starts from it instead of from the prior (a pair's acceptance changes with the text, not the call)
        self.acceptance: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, cluster: BloombeeCluster | None = None,
                        **options) -> "DistributedModelForCausalLM":
        """Load the client parts here and place the decoder layers on the cluster's workers.

        ``options`` are the fields of :class:`~bloombee_nb.generate.options.DeployConfig` (where the
        layers go, what the stages run, how steps travel, what happens on a failure), each with its
        default and a comment there. ``cluster=None`` starts an embedded LocalCluster that this model
        owns and closes in :meth:`close`. When the cluster's swarm hosts every layer of the model
        (``bb.host``, ``bloombee-nb worker --host``) the model attaches to those spans (``repr`` says
        which), otherwise each worker reads only its own span from its own copy of the checkpoint (a
        local path that exists there, or a Hub id).
        """
        opts = DeployConfig.of(options)
        path = resolve_checkpoint(name_or_path)
        config = load_config(path, opts.allow_unverified_architecture)
        config, embed, norm, head, dtype = load_client_parts(path, config, opts.torch_dtype)
        deployment = Deployment.start(cluster, opts, str(name_or_path), worker_path(name_or_path, path),
                                      config.num_hidden_layers, dtype, embed)
        config._name_or_path = str(name_or_path)
        model = cls(config, embed, norm, head, deployment)
        model.generation_config = _generation_config(path, config)
        return model.eval()

    # the layers' whereabouts: the deployment's (placement, plan, recovery); kept here as the names users know
    chain = _of_deployment("chain", "The current chain of stages (a session keeps its own).")
    placement = _of_deployment("placement")
    cluster = _of_deployment("cluster")
    events = _of_deployment("events", "RecoveryEvents, oldest first.")
    attached = _of_deployment("attached", "Whether the layers run on the swarm's hosted spans (shared) rather than "
                                          "this model's own.")
    plan = _of_deployment("plan", settable=True)
    profile = _of_deployment("profile", settable=True)
    auto_recover = _of_deployment("recover", "Sessions replay onto live workers when a stage is lost (session.py); "
                                             "False: the error is raised.", settable=True)
    micro_batch = property(lambda self: self.chain.micro_batch,
                           doc="Rows per forward on a stage and per micro-batch (None: no limit).")

    def replan(self, workload: Workload | None = None, *, profile: ClusterProfile | None = None,
               plan: Plan | None = None) -> Plan:
        """Measure the cluster again (or take ``profile``), re-solve, and move the spans.

        Open sessions are not disturbed: each finishes on the chain it was opened on, whose
        actors are freed when its last session closes. New sessions use the new placement.
        """
        return self.deployment.replan(workload, profile=profile, plan=plan)

    def link_codecs(self, client_name: str | None = None) -> dict[tuple[str, str], str]:
        """``(sender, receiver) -> codec`` for every link the hidden states cross, by worker name."""
        return self.deployment.link_codecs(client_name)

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
        with torch_threads(self.client_threads):
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
        check_draft(self, assistant_model, kwargs.get("tokenizer"), kwargs.get("assistant_tokenizer"))
        if (kwargs.get("num_beams") or 1) > 1:
            raise ValueError("speculative decoding works with greedy decoding and sampling, not beam search "
                             "(num_beams=1)")
        policy = TreePolicy(widths=tuple(tree_widths) if tree_widths != "auto" else "auto")
        room = MAX_NODES if policy.widths == "auto" else tree_size(policy.widths)
        return self._generate(inputs, session, room, dict(kwargs, assistant_model=assistant_model), policy)

    def _generate(self, inputs, session, tree_room: int | None, kwargs, policy: TreePolicy | None = None):
        session = session if session is not None else kwargs.get("cache")
        if session is not None:
            kwargs["cache"] = session
            return _on(session, policy, lambda: super(DistributedModelForCausalLM, self).generate(inputs, **kwargs))
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_len = ids.shape[-1] if ids is not None else kwargs["inputs_embeds"].shape[1]
        cfg = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", cfg.max_new_tokens)
        max_length = prompt_len + new if new is not None else kwargs.get("max_length", cfg.max_length)
        if tree_room is not None:  # the tree's tokens, and (batch > 1) room for rows that run ahead
            batch = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
            max_length += tree_room + (max_length - prompt_len if batch > 1 else 0)
        with self.inference_session(max_length=max_length) as s:
            return _on(s, policy, lambda: super(DistributedModelForCausalLM, self).generate(inputs, cache=s, **kwargs))

    def _assisted_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                           synced_gpus=False, streamer=None, inputs_tensor=None, assistant_model=None,
                           assistant_tokenizer=None, tokenizer=None, **model_kwargs):
        """Where transformers' ``generate`` dispatches assisted generation: our token-tree speculation."""
        return speculative_decoding(self, input_ids, logits_processor, stopping_criteria, generation_config,
                                    draft=assistant_model, streamer=streamer, **model_kwargs)

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Free the spans on the workers (and stop the embedded cluster if this model started it)."""
        self.deployment.close()

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


def _on(session: InferenceSession, policy: TreePolicy | None, generate):
    """``generate()`` with ``session`` carrying the speculation's tree policy for this call only
    (transformers hands our decoding loop the session, not extra arguments: ``_assisted_decoding``)."""
    session.tree_policy = policy
    try:
        return generate()
    finally:
        session.tree_policy = None


def _generation_config(path: Path, config) -> GenerationConfig:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(config)

"""``DeployConfig``: every option of ``from_pretrained``, one field each.

``DistributedModelForCausalLM.from_pretrained(path, cluster=..., **options)`` builds one of these
from its keywords (an unknown keyword is a ``TypeError`` naming the fields), and the model's
:class:`~bloombee_nb.generate.deployment.Deployment` keeps it: a replacement chain after a lost
worker, or a re-plan, is made with the same options. Read it top to bottom as the list of what a
user can choose; the defaults are what the README's first command runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..cluster.chain import DEFAULT_CALL_TIMEOUT_S, DEFAULT_LIVENESS_INTERVAL_S, DEFAULT_PING_TIMEOUT_S, DEFAULT_PREFILL_CHUNK
from ..model.quantize import canonical
from ..plan import Plan, Workload

#: How often a swarm client's slow call checks its stages' workers: failing over is only a re-route
#: to a replica that already holds the weights, so finding the loss fast is most of the pause.
SWARM_LIVENESS_INTERVAL_S = 0.2


@dataclass
class DeployConfig:
    # ---- where the layers go ---------------------------------------------------------------------
    spans: list[tuple[int, int]] | None = None  # layer ranges per stage; None: an even split over `workers`
    workers: list[str] | None = None            # worker addresses, one per stage; None: every worker
    plan: "str | Plan | None" = None            # "auto": profile the cluster, place what the DP planner
                                                # chooses for `workload`; a Plan: applied as given
    workload: Workload | None = None            # what plan="auto" optimizes (None: one sequence, latency)
    swarm: bool | str = "auto"                  # attach to the swarm's hosted spans: "auto" when they cover
                                                # the model (and nothing is placed by hand), True insists
                                                # (SwarmError naming the missing layers), False never
    # ---- what the stages run ---------------------------------------------------------------------
    dtype: torch.dtype | str | None = None      # weights and activations (None: the checkpoint's)
    quantize: str | list | None = None          # linear weights in "int8" or "nf4"/"int4": one format, or
                                                # one per stage (None: float); a plan's formats otherwise
    formats: list[str] | None = None            # with plan="auto": the quantized formats the planner may
                                                # choose per stage besides float (e.g. ["int8", "nf4"]),
                                                # each measured on every worker first
    num_threads: int = 1                        # torch threads of each stage
    allow_unverified_architecture: bool = False  # run a family the adapter table has not verified
    weight_offload: float | None = None         # fraction of each stage's weights streamed from disk
                                                # (None: the plan's fraction, else 0)
    kv_offload: float | None = None             # fraction of each stage's KV cache kept in host memory
    max_kv_bytes: int | None = None             # a stage refuses sessions past this much KV (None: no cap)
    max_sessions: int | None = None             # a stage refuses sessions past this many (None: no cap)
    device: str | None = None                   # the stages' device: "cpu", "cuda[:i]", "auto" (None: cpu)
    inline_decode: bool = True                  # small decode steps run on the stage's event loop
    # ---- how steps travel ------------------------------------------------------------------------
    relay: str = "chain"                        # "chain": stage to stage; "star": the client relays every
                                                # hop (the Petals-style baseline)
    compression: str | None = None              # "auto": per link and frame size, the codec that pays on
                                                # the measured bandwidth; a blosc2 label such as
                                                # "zstd-1+shuffle": that codec for frames >= 64 KiB; None: raw
    micro_batch: int | str | None = "plan"      # rows per forward and per micro-batch ("plan": the plan's)
    merge: bool = True                          # steps of different sessions reaching a stage together run
                                                # as one forward (False: one at a time, as Petals does)
    group: bool | None = None                   # this client's concurrent decode steps travel the chain
                                                # together (None: on for a throughput plan)
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK  # prompts longer than this go in chunks (None: whole)
    client_threads: int | str | None = "auto"   # torch threads for the client's embeddings and LM head
                                                # ("auto": 1 when workers share this machine)
    # ---- failures --------------------------------------------------------------------------------
    call_timeout_s: float = DEFAULT_CALL_TIMEOUT_S  # a call fails after this long at the latest
    ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S  # a stage silent this long counts as hung
    liveness_interval_s: float | None = DEFAULT_LIVENESS_INTERVAL_S  # how often a waiting call checks
                                                # the stages' workers (a swarm client: 0.2 s by default)
    recover: bool = True                        # a session that loses a stage re-places the spans (or
                                                # re-routes) and replays its history; False: raise
    swarm_heal_s: float = 30.0                  # a swarm client whose route lost layers no one else hosts
                                                # waits this long for a lender to host them again (a
                                                # replica moving there: bb.rebalance) before RecoveryError
    swarm_reroute_s: float | None = 1.0         # a swarm client's new sessions check at most this often
                                                # whether another route through the replicas is much less
                                                # loaded, and open there (None: stay on the attached route)
    replay_logs: bool = True                    # a swarm session's stages (all but the last) keep their
                                                # outputs, so a lost stage's replacement alone replays the
                                                # history (generate/replay.py); False: no logs (hidden_size
                                                # values per position less on each stage), every stage replays

    @classmethod
    def of(cls, options: dict) -> "DeployConfig":
        """From ``from_pretrained``'s keywords, checked."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"from_pretrained got unknown option(s) {', '.join(unknown)}; the options are the "
                            f"fields of bloombee_nb.DeployConfig: {', '.join(sorted(names))}")
        out = cls(**options)
        out.check()
        return out

    def check(self) -> None:
        if self.relay not in ("chain", "star"):
            raise ValueError(f'relay must be "chain" or "star", got {self.relay!r}')
        if self.swarm not in (True, False, "auto"):
            raise ValueError(f'swarm must be True, False or "auto", got {self.swarm!r}')
        if self.micro_batch not in ("plan", None) and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ValueError(f'micro_batch must be a positive number of rows, "plan" or None, got {self.micro_batch!r}')
        if self.formats is not None:
            if isinstance(self.formats, str):
                self.formats = [self.formats]
            for fmt in self.formats:
                canonical(fmt)  # an unknown format: QuantizationError naming the known ones
            if self.plan != "auto":
                raise ValueError('formats= lists what plan="auto" may choose; with a Plan or spans by hand, give '
                                 'quantize="int8" | "nf4" or one format per stage instead')
            if self.quantize is not None:
                raise ValueError(f"quantize={self.quantize!r} fixes the formats and formats={self.formats!r} lets the "
                                 "planner choose them: give one of the two")

    @property
    def plan_formats(self) -> tuple:
        """The weight formats the planner may choose from (float always)."""
        return (None, *(canonical(f) for f in self.formats or ()))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype

    @property
    def per_stage_formats(self) -> bool:
        """``quantize`` lists one format per stage."""
        return isinstance(self.quantize, (list, tuple))

    @property
    def places_by_hand(self) -> bool:
        """Layers placed by the user (spans, workers, a plan, per-stage formats): never attached to a swarm."""
        return self.plan is not None or self.spans is not None or self.workers is not None or self.per_stage_formats

    def stage_options(self, dtype: torch.dtype) -> dict:
        """What every stage actor is made with (``StageActor``'s keywords); the offload fractions and
        one quantization format only where given, so a plan's own per-stage values apply otherwise."""
        out = dict(num_threads=self.num_threads, allow_unverified_architecture=self.allow_unverified_architecture,
                   dtype=str(dtype).removeprefix("torch."), merge=self.merge, inline_decode=self.inline_decode)
        given = dict(weight_offload=self.weight_offload, kv_offload=self.kv_offload, max_kv_bytes=self.max_kv_bytes,
                     max_sessions=self.max_sessions, device=self.device)
        out.update({k: v for k, v in given.items() if v is not None})
        if not self.per_stage_formats and canonical(self.quantize):
            out["quantize"] = canonical(self.quantize)  # every stage, replacements after a recovery too
        return out

    def micro_batch_for(self, plan: Plan | None) -> int | None:
        """Rows per forward on a stage with ``plan`` (the plan's when following plans)."""
        if self.micro_batch == "plan":
            return plan.micro_batch if plan is not None else None
        return self.micro_batch

    def chain_options(self, plan: Plan | None) -> dict:
        """``RemoteChain.create``'s keywords for a chain placed by ``plan`` (None: by hand or attached)."""
        group = (self.merge and plan is not None and plan.objective == "throughput") if self.group is None else self.group
        return dict(timeout_s=self.call_timeout_s, relay=self.relay, compression=self.compression,
                    liveness_interval_s=self.liveness_interval_s, ping_timeout_s=self.ping_timeout_s,
                    prefill_chunk=self.prefill_chunk, micro_batch=self.micro_batch_for(plan), group=group)

    def swarm_chain_options(self) -> dict:
        """For a chain through the swarm's replicas: a loss is found faster (:data:`SWARM_LIVENESS_INTERVAL_S`)
        unless the user chose the interval."""
        out = self.chain_options(None)
        if self.liveness_interval_s == DEFAULT_LIVENESS_INTERVAL_S:
            out["liveness_interval_s"] = SWARM_LIVENESS_INTERVAL_S
        return out

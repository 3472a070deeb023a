"""The notebook's active session: one cluster, the model placed on it, its tokenizer and profile.

The magics read and change it; so can Python code in the same kernel::

    from bloombee_nb.notebook import session
    s = session()
    s.connect(n_workers=2)                  # embedded LocalCluster + the shipped tiny model
    s.model.generate(...); s.profile; s.plan
    s.disconnect()

Errors are typed (:class:`NotebookError`, or the library's own); only the magics turn them into
``UsageError``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from ..errors import BloombeeError


class NotebookError(BloombeeError, RuntimeError):
    """A notebook command cannot run in the session's current state (e.g. nothing is connected)."""


@dataclass
class NotebookSession:
    """What ``%bloombee`` is connected to. ``model``/``tokenizer`` are None after ``--no-model``."""

    cluster: object = None          # BloombeeCluster
    model: object = None            # DistributedModelForCausalLM
    tokenizer: object = None
    model_path: str | None = None
    profile: object = None          # ClusterProfile, once measured
    plan_widget: object = None      # the last PlanWidget shown
    last_generation: object = None  # the last GenerationResult

    # ---- lifecycle ------------------------------------------------------------------------
    def connect(self, address: str | None = None, *, n_workers: int = 3, direct_to_workers: bool = True,
                model_path: str | None = None, load_model: bool = True, **model_kwargs):
        """Start an embedded cluster (``address=None``) or join a scheduler, and place the model on it.

        ``model_kwargs`` go to ``DistributedModelForCausalLM.from_pretrained`` (e.g. ``relay="star"``,
        ``compression="zstd-1+shuffle"``). ``direct_to_workers=False`` reaches workers through the
        scheduler, for a client behind NAT (Colab).

        An earlier connection is closed first. If the model cannot be placed, the new cluster is
        closed again and the error raised: a session is either fully connected or not at all.
        """
        import bloombee_nb as bb

        self.disconnect()
        try:
            cluster = (bb.connect(address, direct_to_workers=direct_to_workers) if address
                       else bb.connect(n_workers=n_workers, direct_to_workers=direct_to_workers))
        except (OSError, TimeoutError) as exc:
            raise NotebookError(f"could not reach the Dask scheduler at {address}: {exc}; check the address "
                                "and that `dask scheduler` runs there") from None
        try:
            if load_model:
                self._load_model(cluster, model_path, **model_kwargs)
        except BaseException:
            cluster.close()
            raise
        self.cluster = cluster
        return cluster

    def _load_model(self, cluster, model_path: str | None, **model_kwargs) -> None:
        import bloombee_nb as bb
        from transformers import AutoTokenizer

        from ..shipped import default_model_path

        path = model_path or default_model_path()
        if not cluster.workers():
            cluster.wait_for_workers(1, timeout_s=30)
        self.model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, **model_kwargs)
        self.model_path = path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            self.tokenizer = None  # generation then says what is missing

    def disconnect(self) -> bool:
        """Free the model's spans and close the cluster (stopping it if it is embedded). False if idle."""
        was = self.cluster is not None
        if self.model is not None:
            self.model.close()
        if self.cluster is not None:
            self.cluster.close()
        self.cluster = self.model = self.tokenizer = self.model_path = self.profile = None
        self.plan_widget = self.last_generation = None
        return was

    # ---- what commands need ------------------------------------------------------------------
    def require_cluster(self):
        if self.cluster is None:
            raise NotebookError("not connected: run `%bloombee connect local` (or `%bloombee connect tcp://host:8786`)")
        return self.cluster

    def require_model(self):
        self.require_cluster()
        if self.model is None:
            raise NotebookError("no model is placed on the cluster: run `%bloombee connect … --model PATH`")
        return self.model

    def require_tokenizer(self):
        self.require_model()
        if self.tokenizer is None:
            raise NotebookError(f"no tokenizer found with the model at {self.model_path}; "
                                "save one there with tokenizer.save_pretrained(path)")
        return self.tokenizer

    def measure(self, progress: bool = True):
        """Profile the cluster with the session's model (every worker and link; a progress bar)."""
        from ..cluster.profiling import profile_cluster

        model = self.require_model()
        self.profile = profile_cluster(self.cluster, model._worker_path, progress=progress,
                                       num_threads=model._stage_kwargs.get("num_threads", 1))
        return self.profile

    def ensure_profile(self, progress: bool = True):
        """The measured profile, measuring it first if this session has none yet."""
        return self.profile if self.profile is not None else self.measure(progress)

    @property
    def plan(self):
        """The plan the model is placed by (None for the default even split)."""
        return getattr(self.model, "plan", None)

    # ---- display ----------------------------------------------------------------------------
    def __repr__(self):
        if self.cluster is None:
            return "<bloombee_nb notebook session: not connected>"
        spans = (", ".join(f"{s.start}–{s.end - 1}@{s.worker}" for s in self.model.placement.stages)
                 if self.model is not None else "no model")
        return (f"<bloombee_nb notebook session: {self.cluster.address}, {len(self.cluster.workers())} workers; "
                f"{self.model_path}: {spans}; profile {'measured' if self.profile is not None else 'not measured'}>")

    def _repr_html_(self):
        if self.cluster is None:
            return "<div><b>bloombee_nb</b>: not connected — <code>%bloombee connect local</code></div>"
        parts = [self.cluster._repr_html_()]
        if self.model is not None:
            parts.append(self.model._repr_html_())
        plan = self.plan
        parts.append("<div>" + (f"placed by a plan: predicted {plan.latency_s * 1e3:.2f} ms per token, "
                                f"{plan.tokens_per_s:.3g} tokens/s ({html.escape(plan.method)})" if plan
                                else "placed by an even split") + " · profile: "
                     + ("measured" if self.profile is not None else "not measured (<code>%bloombee profile</code>)")
                     + "</div>")
        return "<div class='bloombee-status'>" + "".join(parts) + "</div>"


_SESSION = NotebookSession()


def session() -> NotebookSession:
    """The kernel's one notebook session."""
    return _SESSION

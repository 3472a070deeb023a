"""The notebook's active session: one cluster, the model placed on it, its tokenizer and profile.

The magics read and change it; so can Python code in the same kernel::

    from bloombee_nb.notebook import session
    s = session()
    s.connect(n_workers=2)                  # embedded LocalCluster + the shipped tiny model
    s.model.generate(...); s.profile; s.plan
    s.stage_status()                        # per stage: sessions, queued steps, micro-batch, memory per tier
    s.disconnect()

Errors are typed (:class:`NotebookError`, or the library's own); only the magics turn them into
``UsageError``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

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
    chat: object = None             # the conversation of `%%bloombee chat` (generate/chat.py)
    servers: dict = field(default_factory=dict)  # port -> serve.Server of `%bloombee serve`, until stopped

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

        from ..model.checkpoint import resolve_checkpoint
        from ..shipped import default_model_path

        path = model_path or default_model_path()
        if not cluster.workers():
            cluster.wait_for_workers(1, timeout_s=30)
        self.model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, **model_kwargs)
        self.model_path = path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(path))  # a .gguf: its converted folder
        except (OSError, ValueError):
            self.tokenizer = None  # generation then says what is missing

    def disconnect(self) -> bool:
        """Free the model's spans and close the cluster (stopping it if it is embedded). False if idle."""
        was = self.cluster is not None
        self.stop_servers()  # a server must not outlive the model it serves
        if self.chat is not None:
            self.chat.close()
        if self.model is not None:
            self.model.close()
        if self.cluster is not None:
            self.cluster.close()
        self.cluster = self.model = self.tokenizer = self.model_path = self.profile = None
        self.plan_widget = self.last_generation = self.chat = None
        return was

    # ---- serving over HTTP (`%bloombee serve`) -------------------------------------------------
    def serve(self, **kwargs):
        """Serve the session's model over HTTP in the kernel's background (``bloombee_nb.serve.serve``'s
        keywords); the session keeps the server until :meth:`stop_servers` or :meth:`disconnect`."""
        from .. import serve as http

        server = http.serve(self.require_model(), self.require_tokenizer(), **kwargs)
        self.servers[server.port] = server
        return server

    def running_servers(self) -> dict:
        """The session's servers still up, by port (stopped ones are forgotten)."""
        self.servers = {p: s for p, s in self.servers.items() if s.running}
        return dict(self.servers)

    def stop_servers(self, port: int | None = None) -> list[int]:
        """Stop the server on ``port`` (None: every one); the ports stopped."""
        ports = [p for p in self.running_servers() if port is None or p == port]
        for p in ports:
            self.servers.pop(p).stop()
        return ports

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
        self.profile = profile_cluster(self.cluster, model.deployment.worker_path, progress=progress,
                                       num_threads=model.deployment.options.num_threads)
        return self.profile

    def ensure_profile(self, progress: bool = True):
        """The measured profile, measuring it first if this session has none yet."""
        return self.profile if self.profile is not None else self.measure(progress)

    @property
    def plan(self):
        """The plan the model is placed by (None for the default even split)."""
        return getattr(self.model, "plan", None)

    def stage_status(self, workers: dict | None = None) -> "StageStatus | None":
        """What each stage of the model's chain holds now (one remote call to every stage; a lost
        worker makes the rows say "unreachable" instead of raising). ``None`` without a model."""
        if self.model is None:
            return None
        return stage_status(self.model, workers if workers is not None else self.cluster.workers())

    # ---- display ----------------------------------------------------------------------------
    def _text(self, workers: dict, status: "StageStatus | None") -> str:
        spans = (", ".join(f"{s.start}–{s.end - 1}@{s.worker}" for s in self.model.placement.stages)
                 if self.model is not None else "no model")
        head = (f"<bloombee_nb notebook session: {self.cluster.address}, {len(workers)} workers; "
                f"{self.model_path}: {spans}; profile {'measured' if self.profile is not None else 'not measured'}>")
        serving = "".join(f"\nserving {srv.snapshot().text()}" for srv in self.running_servers().values())
        return head + ("\n" + status.text() if status is not None else "") + serving

    def _html(self, status: "StageStatus | None") -> str:
        parts = [self.cluster._repr_html_()]
        if self.model is not None:
            parts.append(self.model._repr_html_())
        if status is not None:
            parts.append(status.html())
        plan = self.plan
        parts.append("<div>" + (f"placed by a plan: predicted {plan.latency_s * 1e3:.2f} ms per token, "
                                f"{plan.tokens_per_s:.3g} tokens/s ({html.escape(plan.method)})" if plan
                                else "placed by an even split") + " · profile: "
                     + ("measured" if self.profile is not None else "not measured (<code>%bloombee profile</code>)")
                     + "</div>")
        parts.append(self._serving_html())
        return "<div class='bloombee-status'>" + "".join(parts) + "</div>"

    def _serving_html(self) -> str:
        """The requests `%bloombee serve` servers are answering, and their Dask dashboard page."""
        servers = list(self.running_servers().values())
        if not servers:
            return ""
        from ..serve.activity import snapshots_html

        link = servers[0].dashboard_link
        more = (f"<div>also on the Dask dashboard: <a href='{html.escape(link)}' target='_blank'>"
                f"{html.escape(link)}</a></div>" if link else "")
        return snapshots_html([s.snapshot() for s in servers], "serving over HTTP") + more

    def __repr__(self):
        if self.cluster is None:
            return "<bloombee_nb notebook session: not connected>"
        workers = self.cluster.workers()
        return self._text(workers, self.stage_status(workers))

    def _repr_html_(self):
        if self.cluster is None:
            return NOT_CONNECTED_HTML
        return self._html(self.stage_status())

    def _repr_mimebundle_(self, include=None, exclude=None):
        """Text and HTML from one round of remote calls (``display`` would otherwise make two)."""
        if self.cluster is None:
            return {"text/plain": repr(self), "text/html": NOT_CONNECTED_HTML}
        workers = self.cluster.workers()
        status = self.stage_status(workers)
        return {"text/plain": self._text(workers, status), "text/html": self._html(status)}


NOT_CONNECTED_HTML = "<div><b>bloombee_nb</b>: not connected — <code>%bloombee connect local</code></div>"


# ---- what the stages hold now ------------------------------------------------------------------

STATUS_HEADER = ["stage", "worker", "layers", "sessions", "queued", "micro-batch", "fast tier", "resident weights",
                 "reserved KV", "offload buffer", "offloaded weights (RAM/disk)", "cold KV (disk)"]


@dataclass(frozen=True)
class StageStatus:
    """Per stage of a model's chain: layers, open sessions, queued steps, micro-batch and memory
    per tier, as table cells (:data:`STATUS_HEADER`); ``error`` says why stages did not answer."""

    rows: tuple[tuple[str, ...], ...]
    error: str | None = None

    def text(self) -> str:
        """An aligned plain-text table (terminals, the magic's text output)."""
        table = [STATUS_HEADER, *self.rows]
        widths = [max(len(r[j]) for r in table if j < len(r)) for j in range(len(STATUS_HEADER))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        return "\n".join(["stages now:", *lines] + ([f"  ! {self.error}"] if self.error else []))

    def html(self) -> str:
        """A compact table: the fast tier (accelerator, else RAM) and what was offloaded out of it."""
        e = html.escape
        head = ("<tr><th rowspan=2>stage</th><th rowspan=2>worker</th><th rowspan=2>layers</th>"
                "<th rowspan=2>sessions</th><th rowspan=2>queued</th><th rowspan=2>micro-batch</th>"
                "<th colspan=4>fast tier</th><th colspan=2>offloaded</th></tr>"
                "<tr><th>total</th><th>weights</th><th>KV</th><th>buffer</th>"
                "<th>weights (RAM/disk)</th><th>cold KV (disk)</th></tr>")
        body = "".join(
            "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r[:3])
            + ("".join(f"<td>{e(c)}</td>" for c in r[3:]) if len(r) == len(STATUS_HEADER)
               else f"<td colspan={len(STATUS_HEADER) - 3}><i>{e(r[3])}</i></td>") + "</tr>"
            for r in self.rows)
        note = f"<div style='color:#c0392b'>{e(self.error)}</div>" if self.error else ""
        return (f"<div class='bloombee-stages'><b>stages now</b><table>{head}{body}</table>{note}</div>")


def stage_status(model, workers: dict) -> StageStatus:
    """Ask every stage of ``model.chain`` what it holds (``workers``: address → Dask info, for names)."""
    from ..plan._format import fmt_bytes  # lazily: loading the extension stays cheap

    names = {**getattr(getattr(model, "deployment", None), "worker_names", {}), **{a: str(w.get("name", a)) for a, w in workers.items()}}
    stages = model.placement.stages
    infos, error, lost = [None] * len(stages), None, set()
    try:
        infos = model.chain.info()
    except BloombeeError as exc:  # a lost or hung worker, or a chain released by a recovery
        error, lost = f"unreachable: {exc}", set(getattr(exc, "workers", ()))
    rows = []
    for i, (st, d) in enumerate(zip(stages, infos)):
        who = [str(i + 1), names.get(st.worker, st.worker), f"{st.start}–{st.end - 1}"]
        if d is None:
            why = "unreachable" if not lost or st.worker in lost else "unknown (another stage failed)"
            rows.append((*who, why))
            continue
        offloaded, buffer = d.get("offloaded_weight_bytes", 0), d.get("offload_buffer_bytes", 0)
        resident = d.get("resident_weight_bytes", d.get("weight_bytes", 0) - offloaded)
        kv = d.get("reserved_kv_bytes", 0)
        micro = d["micro_batch"] if "micro_batch" in d else getattr(model, "micro_batch", None)
        rows.append((*who, str(d.get("sessions", 0)), str(d["queued"]) if "queued" in d else "—",
                     "whole batch" if micro is None else str(micro),
                     f"{_tier_name(d.get('fast_tier'))} {fmt_bytes(resident + kv + buffer)}", fmt_bytes(resident),
                     fmt_bytes(kv), fmt_bytes(buffer),
                     f"{fmt_bytes(offloaded)} ({d.get('weight_offload', 0.0):.0%})",
                     f"{fmt_bytes(d.get('cold_kv_bytes', 0))} ({d.get('kv_offload', 0.0):.0%})"))
    return StageStatus(tuple(rows), error)


def _tier_name(device: str | None) -> str:
    """The fast tier as a person calls it: RAM for a CPU stage, else the device (``cuda:0``)."""
    return "RAM" if device in (None, "cpu") else str(device)


_SESSION = NotebookSession()


def session() -> NotebookSession:
    """The kernel's one notebook session."""
    return _SESSION

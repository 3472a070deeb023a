"""The plan widget: edit the measured profile, watch the planner re-solve, apply the plan.

Every control is seeded from the measured :class:`~bloombee_nb.plan.ClusterProfile`; a control
the user has not touched leaves the measurement exactly as it was. Each change builds an edited
profile, solves it (a few ms for a handful of workers) and redraws the figures in place::

    w = PlanWidget(profile, model=model)            # what %bloombee plan shows
    w.workers["0"].speed.value = 4.0                 # "what if worker 0 were 4× faster?"
    w.plan                                           # the re-solved Plan
    w.apply()                                        # model.replan(plan=w.plan): spans move

Under the status line a table gives what the planner chose besides the spans: the micro-batch
(m rows × n micro-batches) and, per stage, the fraction of weights and of KV moved out of the
fast tier and where the bytes then live (accelerator / RAM / disk); the "memory" figure draws it.

An infeasible edit (say a memory budget of 0) shows the planner's message and keeps the widget
alive; "apply" is disabled until the plan is feasible again.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as W

from ..errors import BloombeeError
from ..plan import ClusterProfile, InfeasiblePlanError, Plan, ProfileError, Workload, solve
from ..plan._format import fmt_s, html_table
from . import figures
from .state import NotebookError

GIB = 2 ** 30
PLANNERS = {"runtime": "runtime (priced as the chain relays)", "full": "full DP (raw profile, view only)"}
NOT_YET = ("<span style='color:#888'>not enabled yet: compression priced per link in the planner "
           "(it arrives with its issue)</span>")


@dataclass
class WorkerControls:
    include: W.Checkbox
    speed: W.FloatLogSlider       # compute_speed_factor
    memory_gib: W.BoundedFloatText  # fast-tier budget: accelerator memory, else RAM


@dataclass
class LinkControls:
    bandwidth_mbit: W.FloatLogSlider
    rtt_ms: W.BoundedFloatText


def _slider(value: float, lo: int, hi: int, description: str = "") -> W.FloatLogSlider:
    return W.FloatLogSlider(value=value, base=10, min=lo, max=hi, step=0.05, description=description,
                            continuous_update=False, readout_format=".3g", layout=W.Layout(width="300px"))


class PlanWidget:
    """Live what-if planner over a measured profile; ``model`` (optional) is what "apply" re-places."""

    def __init__(self, profile: ClusterProfile, workload: Workload | None = None, *, model=None,
                 planner: str = "runtime"):
        if planner not in PLANNERS:
            raise ValueError(f"planner must be one of {list(PLANNERS)}, got {planner!r}")
        workload = workload or Workload()
        self.measured, self.model = profile, model
        self.profile, self.workload, self.plan, self.error = profile, workload, None, None
        self._seed: dict[int, object] = {}  # id(control) -> seeded value: untouched controls change nothing
        self.workers = {w.name: self._worker_controls(w) for w in profile.workers}
        self.links = {(ln.src, ln.dst): self._link_controls(ln) for ln in profile.links}
        self.objective = W.ToggleButtons(options=["latency", "throughput"], value=workload.objective,
                                         description="objective", style={"button_width": "auto"})
        self.batch = W.BoundedIntText(workload.batch, min=1, max=4096, description="batch")
        self.prompt_len = W.BoundedIntText(workload.prompt_len, min=1, max=1 << 20, description="prompt")
        self.new_tokens = W.BoundedIntText(workload.new_tokens, min=1, max=1 << 20, description="new tokens")
        self.planner = W.ToggleButtons(options=[(v, k) for k, v in PLANNERS.items()], value=planner,
                                       description="planner", style={"button_width": "auto"})
        self.apply_button = W.Button(description="apply", button_style="primary", icon="check",
                                     tooltip="move the spans on the cluster to this plan (model.replan)")
        self.reset_button = W.Button(description="reset to measured", icon="undo")
        self.status = W.HTML()
        self.stages_view = W.HTML()  # micro-batch and per-stage offloading, always visible
        self.details = W.HTML()
        self.link_view = W.ToggleButtons(options=["graph", "heatmap"], value="graph", description="link map")
        self.figures = {name: figures.live(build(profile, None)) for name, build in self._builders().items()}
        self.widget = self._layout()
        for c in self._controls():
            c.observe(self._changed, names="value")
        self.link_view.observe(self._show_link_view, names="value")
        self.apply_button.on_click(self._apply_clicked)
        self.reset_button.on_click(lambda _b: self.reset())
        self._show_link_view()
        self.update()

    # ---- controls -------------------------------------------------------------------------
    def _seeded(self, control):
        self._seed[id(control)] = control.value
        return control

    def _worker_controls(self, w) -> WorkerControls:
        budget = w.accel_bytes if w.has_accel else w.ram_bytes
        return WorkerControls(
            self._seeded(W.Checkbox(value=w.include, description="include", indent=False,
                                    layout=W.Layout(width="90px"))),
            self._seeded(_slider(w.compute_speed_factor, -1, 1)),
            self._seeded(W.BoundedFloatText(value=round(budget / GIB, 3), min=0, max=1e6, step=0.5,
                                            layout=W.Layout(width="110px"))))

    def _link_controls(self, ln) -> LinkControls:
        return LinkControls(self._seeded(_slider(ln.bandwidth_bytes_per_s * 8 / 1e6, -1, 5)),
                            self._seeded(W.BoundedFloatText(value=round(ln.rtt_s * 1e3, 4), min=0, max=1e5, step=1,
                                                            layout=W.Layout(width="110px"))))

    def _controls(self) -> list:
        out = [self.objective, self.batch, self.prompt_len, self.new_tokens, self.planner]
        for c in self.workers.values():
            out += [c.include, c.speed, c.memory_gib]
        for c in self.links.values():
            out += [c.bandwidth_mbit, c.rtt_ms]
        return out

    def _touched(self, control) -> bool:
        return control.value != self._seed[id(control)]

    # ---- the model: controls -> profile -> plan ------------------------------------------------
    def edited_profile(self) -> ClusterProfile:
        """The measured profile with every control the user changed applied to it."""
        p = self.measured
        for name, c in self.workers.items():
            changes = {}
            if self._touched(c.include):
                changes["include"] = c.include.value
            if self._touched(c.speed):
                changes["compute_speed_factor"] = c.speed.value
            if self._touched(c.memory_gib):
                changes["accel_bytes" if p.worker(name).has_accel else "ram_bytes"] = int(c.memory_gib.value * GIB)
            if changes:
                p = p.with_worker(name, **changes)
        for (src, dst), c in self.links.items():
            changes = {}
            if self._touched(c.bandwidth_mbit):
                changes["bandwidth_bytes_per_s"] = c.bandwidth_mbit.value * 1e6 / 8
            if self._touched(c.rtt_ms):
                changes["rtt_s"] = c.rtt_ms.value / 1e3
            if changes:
                p = p.with_link(src, dst, **changes)
        return p

    def current_workload(self) -> Workload:
        return Workload(batch=self.batch.value, prompt_len=self.prompt_len.value, new_tokens=self.new_tokens.value,
                        objective=self.objective.value)

    def solve(self, profile: ClusterProfile, workload: Workload) -> Plan:
        """The runtime's plan (priced as the model's chain relays) or the DP's on the raw profile."""
        if self.planner.value == "runtime":
            from ..cluster.planning import runtime_plan

            return runtime_plan(profile, workload, relay=self.relay)
        return solve(profile, workload)

    @property
    def relay(self) -> str:
        """How the model's chain moves hidden states ("chain" without a model)."""
        return getattr(getattr(self.model, "chain", None), "relay", "chain")

    def update(self) -> Plan | None:
        """Re-solve from the controls and redraw; an infeasible edit is shown, not raised."""
        try:
            self.workload = self.current_workload()
            self.profile = self.edited_profile()
            self.plan, self.error = self.solve(self.profile, self.workload), None
        except (InfeasiblePlanError, ProfileError) as exc:
            self.plan, self.error = None, str(exc)
        self._redraw()
        return self.plan

    def _changed(self, _change) -> None:
        self.update()

    def reset(self) -> None:
        """Every control back to its measured value (one re-solve)."""
        for c in self._controls():
            if id(c) in self._seed:
                c.unobserve(self._changed, names="value")
                c.value = self._seed[id(c)]
                c.observe(self._changed, names="value")
        self.update()

    # ---- applying -------------------------------------------------------------------------
    def apply(self) -> Plan:
        """Move the model's spans to the current plan (``model.replan(plan=…)``)."""
        why = self._cannot_apply()
        if why:
            raise NotebookError(why)
        self.apply_button.disabled, self.apply_button.description = True, "applying…"
        try:
            self.model.replan(plan=self.plan, profile=self.measured)
        except BloombeeError as exc:
            self._say(f"<b style='color:#c0392b'>apply failed:</b> {html.escape(str(exc))}")
            raise
        finally:
            self.apply_button.description = "apply"
            self.apply_button.disabled = bool(self._cannot_apply())
        spans = ", ".join(f"layers {s.start}–{s.end - 1} on {s.worker}" for s in self.plan.stages)
        self._say(f"<b style='color:#2a9d8f'>applied:</b> {html.escape(spans)}")
        return self.plan

    def _apply_clicked(self, _button) -> None:
        try:
            self.apply()
        except BloombeeError:
            pass  # already shown in the status line; a button has no cell to raise into

    def _cannot_apply(self) -> str | None:
        if self.model is None:
            return "no model to apply the plan to: connect with a model first"
        if self.plan is None:
            return self.error or "no feasible plan"
        if self.planner.value != "runtime":
            return ("the full DP prices the raw profile, not the way the model's chain relays hidden states; "
                    "choose the runtime planner to apply")
        return None

    # ---- drawing --------------------------------------------------------------------------
    def _builders(self) -> dict:
        return {"assignment": figures.assignment,
                "stage_times": lambda p, plan: figures.stage_times(plan),
                "memory": lambda p, plan: figures.memory_tiers(plan),
                "cost_table": figures.cost_table,
                "link_map": lambda p, plan: figures.link_map(p, plan, self._codecs()),
                "link_heatmap": lambda p, plan: figures.link_heatmap(p, plan, self._codecs())}

    def _codecs(self) -> dict | None:
        """The codec each link of the running chain uses (the link map labels the chain's hops)."""
        codecs = getattr(self.model, "link_codecs", None)
        return codecs() if codecs is not None else None

    def _redraw(self) -> None:
        for name, build in self._builders().items():
            figures.refresh(self.figures[name], build(self.profile, self.plan))
        self.apply_button.disabled = bool(self._cannot_apply())
        self.apply_button.tooltip = self._cannot_apply() or "move the spans on the cluster to this plan (model.replan)"
        p = self.plan
        if p is None:
            self.status.value = f"<b style='color:#c0392b'>infeasible:</b> {html.escape(self.error or '')}"
            self.stages_view.value = self.details.value = ""
        else:
            self.status.value = (f"<b>{html.escape(figures.chain_title(self.profile, p))}</b> — "
                                 f"{p.latency_s * 1e3:.3f} ms per step, {p.tokens_per_s:.4g} tokens/s, "
                                 f"micro-batch {p.micro_batch} × {p.n_micro}, {html.escape(p.method)} "
                                 f"(solved in {p.planning_s * 1e3:.1f} ms)")
            self.stages_view.value = stages_html(p)
            self.details.value = p._repr_html_()

    def _say(self, message_html: str) -> None:
        self.status.value = message_html + "<br>" + self.status.value.split("<br>")[-1]

    def _show_link_view(self, _change=None) -> None:
        graph = self.link_view.value == "graph"
        self._link_boxes[0].layout.display = None if graph else "none"
        self._link_boxes[1].layout.display = "none" if graph else None

    def _layout(self) -> W.VBox:
        cell = W.Layout(width="auto")
        worker_rows = [W.HTML("<b>worker</b>"), W.HTML("<b>use</b>"), W.HTML("<b>compute speed ×</b>"),
                       W.HTML("<b>memory budget (GiB)</b>")]
        for name, c in self.workers.items():
            worker_rows += [W.Label(name, layout=cell), c.include, c.speed, c.memory_gib]
        link_rows = [W.HTML("<b>link</b>"), W.HTML("<b>bandwidth (Mbit/s)</b>"), W.HTML("<b>RTT (ms)</b>")]
        for (src, dst), c in self.links.items():
            link_rows += [W.Label(f"{src} → {dst}", layout=cell), c.bandwidth_mbit, c.rtt_ms]
        grid = lambda rows, cols: W.GridBox(rows, layout=W.Layout(grid_template_columns=cols, grid_gap="2px 12px"))
        controls = W.Accordion(children=[grid(worker_rows, "max-content max-content 310px 120px"),
                                         grid(link_rows, "max-content 310px 120px")], selected_index=0)
        controls.set_title(0, f"workers ({len(self.workers)})")
        controls.set_title(1, f"links ({len(self.links)}, measured)")
        self._link_boxes = (W.Box([self.figures["link_map"]]), W.Box([self.figures["link_heatmap"]]))
        wrap = W.Layout(display="flex", flex_flow="row wrap")
        plots = W.Box([self.figures["assignment"], self.figures["stage_times"], self.figures["memory"],
                       self.figures["cost_table"],
                       W.VBox([self.link_view, *self._link_boxes])], layout=wrap)
        more = W.Accordion(children=[self.details])
        more.set_title(0, "plan details (every stage and why each worker is used or not)")
        return W.VBox([W.HTML("<b>bloombee_nb plan</b> — edit the measured profile; the planner re-solves live"),
                       W.HBox([self.objective, self.planner]), W.HBox([self.batch, self.prompt_len, self.new_tokens]),
                       controls, W.HBox([self.apply_button, self.reset_button]), self.status, self.stages_view,
                       plots, more,
                       W.HTML(NOT_YET)], layout=W.Layout(width="100%")).add_class("bloombee-plan")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self):
        state = figures.chain_title(self.profile, self.plan) if self.plan else f"infeasible: {self.error}"
        return f"<PlanWidget {self.workload.objective}, {state}>"


# ---- what the plan chose, as a table ----------------------------------------------------------

STAGE_HEADER = ["stage", "worker", "layers", "weights offloaded", "weights acc/RAM/disk", "KV offloaded",
                "KV acc/RAM/disk", "stage time"]


def micro_batch_line(plan: Plan) -> str:
    """``micro-batch 2 × 4 (batch 8: 4 micro-batches of 2 rows, pipelined through the chain)``."""
    m, n, b = plan.micro_batch, plan.n_micro, plan.workload.batch
    last = b - (n - 1) * m
    how = ("the whole batch in one pass" if n == 1 else
           f"{n} micro-batches of {m} row{'s' * (m != 1)}{f', the last {last}' if last != m else ''}, "
           "pipelined through the chain")
    return f"micro-batch {m} × {n} (batch {b}: {how})"


def stage_rows(plan: Plan) -> list[list[str]]:
    """One row per stage under :data:`STAGE_HEADER`: offloaded fractions and where the bytes live."""
    tiers = lambda f: "/".join(f"{x:.0%}" for x in f)
    return [[str(i + 1), s.worker, f"{s.start}–{s.end - 1}" + (f" {s.quantize}" if s.quantize else ""),  # weight format
             f"{s.weight_offload:.0%}", tiers(s.weight_fractions),
             f"{s.kv_offload:.0%}", tiers(s.kv_fractions), fmt_s(s.stage_s)] for i, s in enumerate(plan.stages)]


def stages_html(plan: Plan) -> str:
    """The micro-batch and the per-stage offloading (what the widget shows under its status line)."""
    return html_table(micro_batch_line(plan), STAGE_HEADER, stage_rows(plan)).replace(
        "<table>", "<table class='bloombee-plan-stages'>", 1)


def stages_text(plan: Plan) -> str:
    """The same as aligned plain text (terminals)."""
    rows = [STAGE_HEADER, *stage_rows(plan)]
    widths = [max(len(r[j]) for r in rows) for j in range(len(STAGE_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([micro_batch_line(plan), *lines])


def static_plan(profile: ClusterProfile, workload: Workload, planner: str = "runtime", relay: str = "chain") -> Plan:
    """Where live widgets cannot render (Colab, a terminal): solve once and show static figures."""
    from IPython.display import display

    from .frontend import show_figure

    if planner == "runtime":
        from ..cluster.planning import runtime_plan

        plan = runtime_plan(profile, workload, relay=relay)
    else:
        plan = solve(profile, workload)
    display({"text/plain": f"{figures.chain_title(profile, plan)}: {plan.latency_s * 1e3:.3f} ms per step, "
                           f"{plan.tokens_per_s:.4g} tokens/s ({plan.method})\n{stages_text(plan)}",
             "text/html": plan._repr_html_()}, raw=True)
    for fig in (figures.assignment(profile, plan), figures.stage_times(plan), figures.memory_tiers(plan),
                figures.cost_table(profile, plan), figures.link_map(profile, plan)):
        show_figure(fig)
    return plan

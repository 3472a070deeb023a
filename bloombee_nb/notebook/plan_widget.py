"""The plan widget: edit the measured profile, watch the planner re-solve, apply the plan.

Every control is seeded from the measured :class:`~bloombee_nb.plan.ClusterProfile`; a control
the user has not touched leaves the measurement exactly as it was. Each change builds an edited
profile, solves it (a few ms for a handful of workers) and redraws the figures in place::

    w = PlanWidget(profile, model=model)            # what %bloombee plan shows
    w.workers["0"].speed.value = 4.0                 # "what if worker 0 were 4× faster?"
    w.plan                                           # the re-solved Plan
    w.apply()                                        # model.replan(plan=w.plan): spans move

An infeasible edit (say a memory budget of 0) shows the planner's message and keeps the widget
alive; "apply" is disabled until the plan is feasible again.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets as W

from ..errors import BloombeeError
from ..plan import ClusterProfile, InfeasiblePlanError, Plan, ProfileError, Workload, solve
from . import figures
from .state import NotebookError

GIB = 2 ** 30
PLANNERS = {"runtime": "runtime (what runs today)", "full": "full DP (not executable yet)"}
NOT_YET = ("<span style='color:#888'>not enabled yet: compression priced per link in the planner · micro-batching "
           "and offloading in the runtime (the full DP plans them, the runtime planner does not) — each arrives "
           "with its issue</span>")


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
        """The runtime's plan (what apply can execute today) or the unrestricted DP's."""
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
            return ("the runtime cannot execute the full DP's plans yet (micro-batches, offloading, forwarding); "
                    "choose the runtime planner to apply")
        return None

    # ---- drawing --------------------------------------------------------------------------
    def _builders(self) -> dict:
        offload = "offload" if self.planner.value == "full" else "offload (not enabled yet)"
        return {"assignment": figures.assignment,
                "stage_times": lambda p, plan: figures.stage_times(plan, offload),
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
            self.details.value = ""
        else:
            self.status.value = (f"<b>{html.escape(figures.chain_title(self.profile, p))}</b> — "
                                 f"{p.latency_s * 1e3:.3f} ms per step, {p.tokens_per_s:.4g} tokens/s, "
                                 f"micro-batch {p.micro_batch}, {html.escape(p.method)} "
                                 f"(solved in {p.planning_s * 1e3:.1f} ms)")
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
        plots = W.Box([self.figures["assignment"], self.figures["stage_times"], self.figures["cost_table"],
                       W.VBox([self.link_view, *self._link_boxes])], layout=wrap)
        more = W.Accordion(children=[self.details])
        more.set_title(0, "plan details (every stage and why each worker is used or not)")
        return W.VBox([W.HTML("<b>bloombee_nb plan</b> — edit the measured profile; the planner re-solves live"),
                       W.HBox([self.objective, self.planner]), W.HBox([self.batch, self.prompt_len, self.new_tokens]),
                       controls, W.HBox([self.apply_button, self.reset_button]), self.status, plots, more,
                       W.HTML(NOT_YET)], layout=W.Layout(width="100%")).add_class("bloombee-plan")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self):
        state = figures.chain_title(self.profile, self.plan) if self.plan else f"infeasible: {self.error}"
        return f"<PlanWidget {self.workload.objective}, {state}>"


def static_plan(profile: ClusterProfile, workload: Workload, planner: str = "runtime", relay: str = "chain") -> Plan:
    """Where live widgets cannot render (Colab, a terminal): solve once and show static figures."""
    from .frontend import show, show_figure

    if planner == "runtime":
        from ..cluster.planning import runtime_plan

        plan = runtime_plan(profile, workload, relay=relay)
    else:
        plan = solve(profile, workload)
    show(plan)
    offload = "offload" if planner == "full" else "offload (not enabled yet)"
    for fig in (figures.assignment(profile, plan), figures.stage_times(plan, offload),
                figures.cost_table(profile, plan), figures.link_map(profile, plan)):
        show_figure(fig)
    return plan

"""Plotly figures of plans, profiles and generation traces: values in, ``go.Figure`` out.

The live widgets and the static fallback draw with the same builders; a ``FigureWidget`` is
brought up to date in place with :func:`refresh`, so a widget never rebuilds its front-end view::

    from bloombee_nb.notebook import figures
    fig = figures.link_map(profile, plan)          # a plain go.Figure (static, Colab-safe)
    figures.refresh(live_widget, fig)              # copy it into a FigureWidget shown earlier

Times are drawn in milliseconds, bandwidths in Mbit/s (links are sold in bits).
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from ..plan import ClusterProfile, Plan

WIDTH, HEIGHT = 520, 320
BANDWIDTH_SCALE = "Viridis"
CHAIN_COLOR = "#e4572e"


def _base_layout(title: str, **overrides) -> dict:
    return {**dict(title=dict(text=title, font=dict(size=13)), width=WIDTH, height=HEIGHT, annotations=[],
                   margin=dict(l=60, r=20, t=50, b=45)), **overrides}


def finite_or_none(a) -> list:
    """A nested list with NaN/∞ as None: widget state must be strict JSON (plotly leaves gaps for None)."""
    return [finite_or_none(x) for x in a] if np.ndim(a) else (float(a) if np.isfinite(a) else None)


def worker_colors(profile: ClusterProfile) -> dict[str, str]:
    """A stable colour per worker (by its position in the profile), shared by every figure."""
    return {w.name: qualitative.Plotly[i % len(qualitative.Plotly)] for i, w in enumerate(profile.workers)}


def chain_names(profile: ClusterProfile, plan: Plan | None) -> list[str]:
    """``[client, stage 1 worker, …, client]``, or ``[]`` without a plan."""
    return [profile.client, *[s.worker for s in plan.stages], profile.client] if plan else []


def offload_note(stage) -> str:
    """`` · offload W 50% KV 25%`` for a stage that moves bytes out of its fast tier, else ``""``."""
    if not (stage.weight_offload or stage.kv_offload):
        return ""
    return f" · offload W {stage.weight_offload:.0%} KV {stage.kv_offload:.0%}"


def chain_title(profile: ClusterProfile, plan: Plan | None) -> str:
    return " → ".join(chain_names(profile, plan)) if plan else "no plan"


# ---- the plan --------------------------------------------------------------------------------

def assignment(profile: ClusterProfile, plan: Plan | None) -> go.Figure:
    """Which layers each worker hosts, along the chain (a Gantt over layer indices).

    One bar trace per worker of the profile, always, so a live widget updates them in place.
    """
    colors, n = worker_colors(profile), profile.model.n_layers
    fig = go.Figure()
    stages = list(enumerate(plan.stages)) if plan else []
    for w in profile.workers:
        mine = [(i, s) for i, s in stages if s.worker == w.name]
        fig.add_bar(y=[w.name] * len(mine), x=[s.n_layers for _, s in mine], base=[s.start for _, s in mine],
                    orientation="h", name=w.name, marker_color=colors[w.name],
                    text=[f"stage {i + 1}: layers {s.start}–{s.end - 1}{offload_note(s)}" for i, s in mine],
                    textposition="inside",
                    hovertemplate=f"{w.name}: %{{text}}<extra></extra>")
    used = [s.worker for _, s in stages]
    order = used + [w.name for w in profile.workers if w.name not in used]
    fig.update_layout(**_base_layout(f"layers along the chain: {chain_title(profile, plan)}"), showlegend=False,
                      barmode="overlay", xaxis=dict(title="layer", range=[0, n], dtick=max(1, n // 10)),
                      yaxis=dict(categoryorder="array", categoryarray=order[::-1], type="category"))
    return fig


def stage_times(plan: Plan | None, offload_label: str = "offload") -> go.Figure:
    """Each stage's predicted decode-step time, stacked: link in, compute, offload (ms)."""
    labels, transfer, compute, offload = [], [], [], []
    if plan:
        for i, s in enumerate(plan.stages):
            labels.append(f"{i + 1} · {s.worker}")
            transfer.append(s.transfer_in_s * 1e3)
            compute.append(s.compute_s * 1e3)
            offload.append(s.offload_s * 1e3)
        labels.append("→ client")
        transfer.append(plan.return_transfer_s * 1e3)
        compute.append(0.0)
        offload.append(0.0)
    fig = go.Figure()
    for name, ys, color in (("link in", transfer, "#8c9fb3"), ("compute", compute, "#2a9d8f"),
                            (offload_label, offload, "#e9c46a")):
        fig.add_bar(x=labels, y=ys, name=name, marker_color=color,
                    hovertemplate="%{x}: %{y:.3f} ms<extra>" + name + "</extra>")
    title = (f"predicted step: {plan.latency_s * 1e3:.2f} ms round trip, {plan.tokens_per_s:.3g} tokens/s"
             if plan else "predicted step: no plan")
    fig.update_layout(**_base_layout(title), barmode="stack", yaxis=dict(title="ms"),
                      legend=dict(orientation="h", y=-0.2))
    return fig


TIERS = (("accelerator", "#264653"), ("RAM", "#e9c46a"), ("disk", "#e76f51"))


def memory_tiers(plan: Plan | None) -> go.Figure:
    """Where each stage keeps its weights and its KV cache: the share in accelerator memory, CPU
    RAM and on disk (stacked, %), the offloaded fraction the plan chose under each bar; the title
    carries the micro-batch (m rows × n micro-batches)."""
    outer, inner, hover = [], [], []
    shares = {tier: [] for tier, _ in TIERS}
    for i, s in enumerate(plan.stages if plan else ()):
        for kind, fractions, off in (("weights", s.weight_fractions, s.weight_offload),
                                     ("KV", s.kv_fractions, s.kv_offload)):
            outer.append(f"{i + 1} · {s.worker}")
            inner.append(f"{kind}<br>{off:.0%} off")
            hover.append(f"stage {i + 1} ({s.worker}, layers {s.start}–{s.end - 1}) {kind}: "
                         f"{off:.0%} offloaded out of the fast tier")
            for (tier, _), x in zip(TIERS, fractions):
                shares[tier].append(100 * x)
    fig = go.Figure()
    for tier, color in TIERS:
        ys = shares[tier]
        fig.add_bar(x=[outer, inner], y=ys, name=tier, marker_color=color, customdata=hover,
                    text=[f"{y:.0f}%" if y >= 0.5 else "" for y in ys], textposition="inside",
                    hovertemplate="%{customdata}<br>" + tier + ": %{y:.0f}%<extra></extra>")
    title = (f"memory per stage · micro-batch {plan.micro_batch} × {plan.n_micro} "
             f"(batch {plan.workload.batch})" if plan else "memory per stage: no plan")
    fig.update_layout(**_base_layout(title), barmode="stack", yaxis=dict(title="% in tier", range=[0, 100]),
                      legend=dict(orientation="h", y=-0.3))
    return fig


def cost_table(profile: ClusterProfile, plan: Plan | None) -> go.Figure:
    """The DP's table: least Σ time to cover layers [0, b) with a chain ending on each worker (ms)."""
    names = [w.name for w in profile.workers]
    z = np.full((len(names), profile.model.n_layers), np.nan)
    if plan is not None and plan.cost_table_s is not None:
        z = plan.cost_table_s.T * 1e3                                  # [worker, layers covered]; ∞: impossible
    fig = go.Figure(go.Heatmap(z=finite_or_none(z),
                               x=list(range(1, profile.model.n_layers + 1)), y=names, colorscale="Magma",
                               colorbar=dict(title="ms"),
                               hovertemplate="layers 0–%{x}, last stage on %{y}: %{z:.3f} ms<extra></extra>"))
    fig.update_layout(**_base_layout("DP cost table: least Σ time covering layers [0, b), by last worker"),
                      xaxis=dict(title="b (layers covered)", dtick=max(1, profile.model.n_layers // 10)),
                      yaxis=dict(title="last worker", type="category"))
    return fig


# ---- the links -------------------------------------------------------------------------------

def _node_positions(names: list[str]) -> dict[str, tuple[float, float]]:
    """The client on the left, the workers around a circle."""
    k = len(names)
    return {n: (math.cos(math.pi + 2 * math.pi * i / k), math.sin(math.pi + 2 * math.pi * i / k))
            for i, n in enumerate(names)}


def _mbit(bytes_per_s: float) -> float:
    return bytes_per_s * 8 / 1e6


def _codec_note(codecs: dict | None, src: str, dst: str) -> str:
    label = (codecs or {}).get((src, dst))
    return f", codec {label}" if label else ""


def link_map(profile: ClusterProfile, plan: Plan | None = None, codecs: dict[tuple[str, str], str] | None = None) -> go.Figure:
    """Participants as nodes, links as edges coloured and sized by bandwidth, the chain highlighted.

    An edge joins two participants when a link is measured either way; its colour and width show
    the slower direction. Hover an edge's midpoint for both directions' bandwidth and RTT, and
    (given ``codecs``, ``(src, dst) -> label`` as from ``model.link_codecs()``) the codec the
    sender chose for that link.
    """
    names = [profile.client, *[w.name for w in profile.workers]]
    pos = _node_positions(names)
    fig = go.Figure()
    _add_link_edges(fig, profile, names, pos, codecs)
    chain = chain_names(profile, plan)
    fig.add_scatter(x=[pos[n][0] for n in chain], y=[pos[n][1] for n in chain], mode="lines", name="chain",
                    line=dict(color=CHAIN_COLOR, width=3, dash="dot"), hoverinfo="skip", showlegend=bool(chain))
    fig.add_scatter(x=[pos[n][0] for n in names], y=[pos[n][1] for n in names], mode="markers+text", text=names,
                    textposition="top center", showlegend=False, hovertext=names, hoverinfo="text",
                    marker=dict(size=[22] + [16] * (len(names) - 1), symbol=["square"] + ["circle"] * (len(names) - 1),
                                color=["#264653"] + [worker_colors(profile)[n] for n in names[1:]]))
    arrows = [dict(x=pos[b][0] * 0.85 + pos[a][0] * 0.15, y=pos[b][1] * 0.85 + pos[a][1] * 0.15,
                   ax=pos[a][0], ay=pos[a][1], xref="x", yref="y", axref="x", ayref="y", text="",
                   showarrow=True, arrowhead=3, arrowsize=1.2, arrowcolor=CHAIN_COLOR)
              for a, b in zip(chain, chain[1:]) if a != b]
    arrows += [dict(x=pos[a][0] * 0.45 + pos[b][0] * 0.55, y=pos[a][1] * 0.45 + pos[b][1] * 0.55, xref="x", yref="y",
                    text=f"<i>{html.escape(codecs[(a, b)])}</i>", showarrow=False, font=dict(size=9, color=CHAIN_COLOR),
                    bgcolor="rgba(255,255,255,0.7)")
               for a, b in zip(chain, chain[1:]) if a != b and (codecs or {}).get((a, b))]
    axis = dict(visible=False, range=[-1.4, 1.4])
    fig.update_layout(**_base_layout(f"links (measured) · chain: {chain_title(profile, plan)}"),
                      xaxis=axis, yaxis=dict(axis, scaleanchor="x"), legend=dict(orientation="h", y=-0.05))
    fig.layout.annotations = arrows
    return fig


def _add_link_edges(fig: go.Figure, profile: ClusterProfile, names: list[str], pos: dict, codecs: dict | None) -> None:
    """One edge per pair of participants with a measured link, coloured and sized by the slower
    direction's bandwidth (log scale), and a hover marker at its midpoint with both directions."""
    pairs = {}
    for ln in profile.links:
        pairs.setdefault(tuple(sorted((ln.src, ln.dst), key=names.index)), []).append(ln)
    logs = [math.log10(_mbit(min(x.bandwidth_bytes_per_s for x in lns))) for lns in pairs.values()]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 1.0)
    span = max(hi - lo, 1e-9)
    mid_x, mid_y, mid_text, mid_val = [], [], [], []
    for (a, b), lns in pairs.items():
        v = math.log10(_mbit(min(x.bandwidth_bytes_per_s for x in lns)))
        rel = (v - lo) / span                                   # 0: the slowest edge, 1: the fastest
        (x0, y0), (x1, y1) = pos[a], pos[b]
        fig.add_scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="skip", showlegend=False,
                        line=dict(color=sample_colorscale(BANDWIDTH_SCALE, rel)[0], width=2 + 8 * rel))
        mid_x.append((x0 + x1) / 2)
        mid_y.append((y0 + y1) / 2)
        mid_val.append(v)
        mid_text.append("<br>".join(f"{x.src} → {x.dst}: {_mbit(x.bandwidth_bytes_per_s):.4g} Mbit/s, "
                                    f"RTT {x.rtt_s * 1e3:.3g} ms{_codec_note(codecs, x.src, x.dst)}" for x in lns))
    fig.add_scatter(x=mid_x, y=mid_y, mode="markers", text=mid_text, hovertemplate="%{text}<extra></extra>",
                    showlegend=False, marker=dict(size=9, color=mid_val, colorscale=BANDWIDTH_SCALE, cmin=lo, cmax=hi,
                                                  showscale=True, colorbar=_log_colorbar(lo, hi)))


def _log_colorbar(lo: float, hi: float) -> dict:
    """A colour bar over log₁₀ values, labelled in the values themselves."""
    ticks = np.linspace(lo, hi, 4) if hi > lo else np.array([lo])
    label = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:.3g}"
    return dict(title="Mbit/s", tickvals=ticks.tolist(), ticktext=[label(10 ** v) for v in ticks])


def link_heatmap(profile: ClusterProfile, plan: Plan | None = None,
                 codecs: dict[tuple[str, str], str] | None = None) -> go.Figure:
    """The same links as matrices: bandwidth (colour on a log scale) and RTT; chain hops marked ●,
    with the codec chosen for the link in the hover text when ``codecs`` is given."""
    names = [profile.client, *[w.name for w in profile.workers]]
    hops = set(zip(chain_names(profile, plan), chain_names(profile, plan)[1:]))
    bw = np.full((len(names), len(names)), np.nan)
    rtt = np.full_like(bw, np.nan)
    for ln in profile.links:
        i, j = names.index(ln.src), names.index(ln.dst)
        bw[i, j], rtt[i, j] = _mbit(ln.bandwidth_bytes_per_s), ln.rtt_s * 1e3
    mark = [["●" if (a, b) in hops else "" for b in names] for a in names]
    fig = make_subplots(1, 2, subplot_titles=("bandwidth (Mbit/s, log colour)", "RTT (ms)"), horizontal_spacing=0.18)
    codec = [[_codec_note(codecs, a, b) for b in names] for a in names]
    fig.add_heatmap(z=finite_or_none(np.log10(bw)), x=names, y=names, customdata=finite_or_none(bw), text=mark,
                    texttemplate="%{text}", hovertext=codec,
                    colorscale=BANDWIDTH_SCALE, showscale=False,
                    hovertemplate="%{y} → %{x}: %{customdata:.4g} Mbit/s%{hovertext}<extra></extra>", row=1, col=1)
    fig.add_heatmap(z=finite_or_none(rtt), x=names, y=names, text=mark, texttemplate="%{text}", colorscale="Reds",
                    showscale=False,
                    hovertemplate="%{y} → %{x}: %{z:.3g} ms<extra></extra>", row=1, col=2)
    layout = _base_layout(f"links as matrices (row → column) · chain hops ●: {chain_title(profile, plan)}")
    annotations = list(fig.layout.annotations)  # the subplot titles
    fig.update_layout(**layout)
    fig.layout.annotations = annotations
    fig.update_xaxes(type="category", title="to")
    fig.update_yaxes(type="category", autorange="reversed", title="from")
    return fig


# ---- generation ------------------------------------------------------------------------------

def stage_step_times(stage_names: list[str], compute_s, stage_wall_s, step_wall_s: float,
                     title: str = "measured decode step") -> go.Figure:
    """Per-stage compute (worker clock) and, for the whole step, the client's wall time (ms).

    ``stage_wall_s`` gives per-stage round trips when the client relays every hop (star); with
    chain forwarding (empty) only the whole step is timed by the client.
    """
    labels = [f"{i + 1} · {n}" for i, n in enumerate(stage_names)] + ["whole step"]
    ms = lambda xs: [x * 1e3 for x in xs]
    walls = ms(stage_wall_s) if stage_wall_s else [None] * len(stage_names)
    fig = go.Figure()
    fig.add_bar(x=labels, y=ms(compute_s) + [sum(compute_s) * 1e3], name="compute (worker clock)",
                marker_color="#2a9d8f")
    fig.add_bar(x=labels, y=walls + [step_wall_s * 1e3], name="round trip (client clock)", marker_color="#8c9fb3")
    fig.update_layout(**_base_layout(title, height=260), barmode="group", yaxis=dict(title="ms"),
                      legend=dict(orientation="h", y=-0.25))
    return fig


# ---- live updates ----------------------------------------------------------------------------

def refresh(widget: go.FigureWidget, fig: go.Figure) -> go.FigureWidget:
    """Make ``widget`` show ``fig``: traces updated in place when their kinds match, else replaced."""
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)  # the widget keeps its own; no need to resend it on every change
    with widget.batch_update():
        same = len(widget.data) == len(fig.data) and all(type(a) is type(b) for a, b in zip(widget.data, fig.data))
        if same:
            for old, new in zip(widget.data, fig.data):
                old.update(new.to_plotly_json(), overwrite=True)
        else:
            widget.data = ()
            widget.add_traces(list(fig.data))
        widget.update_layout(layout, overwrite=True)
    return widget


def live(fig: go.Figure) -> go.FigureWidget:
    """A ``FigureWidget`` showing ``fig`` (needs a front end with live widgets; see ``frontend``)."""
    return go.FigureWidget(fig)

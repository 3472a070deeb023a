"""The plan widget, the link map and the generation panel, checked on the widget objects themselves."""

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import bloombee_nb as bb
from bloombee_nb.notebook import figures
from bloombee_nb.notebook.frontend import display_mode, why_static
from bloombee_nb.notebook.generation import GenerationPanel
from bloombee_nb.notebook.plan_widget import PlanWidget
from bloombee_nb.notebook.state import NotebookError
from bloombee_nb.plan import ClusterProfile, LinkProfile, ModelProfile, WorkerProfile, Workload
from bloombee_nb.shipped import default_model_path
from tests.helpers import distributed

MIB = 2 ** 20


def three_alike(disk_bytes: int = 2 ** 30) -> ClusterProfile:
    """Three identical CPU workers (1 ms per layer, 1 GiB RAM), every pair linked at 1 Gbit/s, 1 ms RTT."""
    model = ModelProfile("toy", n_layers=8, layer_weight_bytes=10 * MIB, kv_bytes_per_token_per_layer=1024,
                         hidden_bytes_per_token=2048)
    workers = [WorkerProfile(n, f"tcp://{n}:1", {1: 1e-3}, ram_bytes=2 ** 30, disk_bytes=disk_bytes) for n in "abc"]
    names = ["client", "a", "b", "c"]
    links = [ln for i, x in enumerate(names) for y in names[i + 1:] for ln in LinkProfile.both_ways(x, y, 125e6, 1e-3)]
    return ClusterProfile(model, tuple(workers), tuple(links))


def hosted(widget: PlanWidget) -> dict[str, tuple]:
    """worker -> (base, length) of its bars, read off the assignment FigureWidget."""
    return {t.name: tuple(zip(t.base, t.x)) for t in widget.figures["assignment"].data if t.x}


def test_controls_resolve_and_redraw():
    w = PlanWidget(three_alike())
    assert hosted(w) == {"a": ((0, 8),)} and w.plan.workers == ["tcp://a:1"]   # one worker: fewest relayed hops
    w.workers["b"].speed.value = 4.0                                            # what if b were 4× faster?
    assert hosted(w) == {"b": ((0, 8),)} and w.profile.worker("b").compute_speed_factor == 4.0
    assert "client → b → client" in w.status.value
    assert "client → b → client" in w.figures["assignment"].layout.title.text
    w.workers["b"].memory_gib.value = 0.05                                      # 50 MiB: 5 layers, not their KV too
    b = w.plan.stages[0]                                                        # b takes what fits, a the rest:
    assert len(w.plan.stages) == 2 and b.worker == "b" and hosted(w)["b"][0][1] == 5   # 5 layers, with a share
    assert b.weight_offload == 0 and b.kv_offload > 0 and b.kv_fractions[2] > 0         # of their KV on disk
    assert sum(n for bars in hosted(w).values() for _, n in bars) == 8
    for src in ("client", "a", "c"):                                            # b behind 100 kbit/s links
        w.links[(src, "b")].bandwidth_mbit.value = 0.1
    assert "b" not in hosted(w)
    heat = w.figures["cost_table"].data[0]
    assert np.asarray(heat.z, dtype=float).shape == (3, 8)                     # [worker, layers covered]


def test_widget_state_is_strict_json():
    """Front ends reject NaN/∞ in widget messages; impossible DP cells and missing links are None."""
    w = PlanWidget(three_alike().with_worker("c", include=False))   # c's DP cells are ∞
    for fig in w.figures.values():
        json.dumps(fig.to_plotly_json(), allow_nan=False, default=lambda a: np.asarray(a).tolist())
    z = w.figures["cost_table"].data[0].z
    assert all(v is None for v in z[2]) and all(v is not None for v in z[0])


def test_display_mode_detection(monkeypatch):
    assert display_mode("static") == "static" and display_mode("widgets") == "widgets"
    assert display_mode() == "static" and "no Jupyter kernel" in why_static()      # pytest: no kernel
    monkeypatch.setenv("BLOOMBEE_NB_DISPLAY", "widgets")
    assert display_mode() == "widgets"
    monkeypatch.delenv("BLOOMBEE_NB_DISPLAY")
    monkeypatch.setitem(sys.modules, "google.colab", sys)
    assert "Colab" in why_static()
    with pytest.raises(ValueError, match="display mode"):
        display_mode("hologram")


def test_untouched_controls_keep_the_measurement_exactly():
    p = three_alike().with_link("client", "a", rtt_s=1.23456789e-7)   # below what the RTT box shows
    w = PlanWidget(p)
    assert w.edited_profile() == p
    w.workers["c"].include.value = False
    assert w.edited_profile() == p.with_worker("c", include=False)


def test_infeasible_edit_is_shown_not_raised():
    w = PlanWidget(three_alike(disk_bytes=0), model=object())    # no disk: nothing can be offloaded
    assert not w.apply_button.disabled
    for c in w.workers.values():
        c.memory_gib.value = 0.001
    assert w.plan is None and "infeasible" in w.status.value and "memory" in w.error.lower()
    assert w.apply_button.disabled and w.figures["stage_times"].layout.title.text.endswith("no plan")
    assert w.stages_view.value == "" and w.figures["memory"].layout.title.text.endswith("no plan")
    with pytest.raises(NotebookError, match="does not fit"):
        w.apply()
    w.reset()
    assert w.plan is not None and w.edited_profile() == three_alike(disk_bytes=0) and not w.apply_button.disabled
    assert "micro-batch 1 × 1" in w.stages_view.value


def test_objective_workload_and_planner():
    w = PlanWidget(three_alike(), Workload(batch=8), model=object())
    w.objective.value = "throughput"
    assert w.plan.objective == "throughput" and w.plan.workload.batch == 8
    assert "tokens/s" in w.figures["stage_times"].layout.title.text
    w.batch.value = 32
    assert w.plan.workload.batch == 32
    w.planner.value = "full"                  # the DP on the raw profile: view only, apply refuses it
    assert w.apply_button.disabled and "full DP" in w.apply_button.tooltip
    assert [t.name for t in w.figures["stage_times"].data] == ["link in", "compute", "offload"]
    w.planner.value = "runtime"
    assert w.figures["stage_times"].data[2].name == "offload" and not w.apply_button.disabled


def tight() -> ClusterProfile:
    """Two accelerator workers with 30 MiB each (and 1 GiB RAM) for 80 MiB of layers: a plan must
    move weights out of the fast tier; decode time grows with the rows, so pipelining pays."""
    model = ModelProfile("toy", n_layers=8, layer_weight_bytes=10 * MIB, kv_bytes_per_token_per_layer=1024,
                         hidden_bytes_per_token=2048)
    workers = [WorkerProfile(n, f"tcp://{n}:1", {1: 1e-3, 8: 8e-3}, accel_bytes=30 * MIB, ram_bytes=2 ** 30,
                             disk_bytes=2 ** 30, ram_read_bytes_per_s=50e9) for n in ("g1", "g2")]
    names = ["client", "g1", "g2"]
    links = [ln for i, x in enumerate(names) for y in names[i + 1:] for ln in LinkProfile.both_ways(x, y, 125e6, 1e-3)]
    return ClusterProfile(model, tuple(workers), tuple(links))


def test_widget_shows_micro_batch_and_offloading():
    w = PlanWidget(tight(), Workload(batch=8, objective="throughput"))
    p = w.plan
    assert p.micro_batch < 8 and p.n_micro == -(-8 // p.micro_batch)          # pipelined micro-batches
    assert all(s.weight_offload > 0 for s in p.stages)                          # 80 MiB > 2 × 30 MiB
    shown = f"micro-batch {p.micro_batch} × {p.n_micro}"
    assert shown in w.status.value and shown in w.stages_view.value and shown in w.figures["memory"].layout.title.text
    table = w.stages_view.value
    for i, s in enumerate(p.stages):                                            # one row per stage, in chain order
        tiers = lambda f: "/".join(f"{x:.0%}" for x in f)
        row = (f"<tr><td>{i + 1}</td><td>{s.worker}</td><td>{s.start}–{s.end - 1}</td><td>{s.weight_offload:.0%}</td>"
               f"<td>{tiers(s.weight_fractions)}</td><td>{s.kv_offload:.0%}</td><td>{tiers(s.kv_fractions)}</td>")
        assert row in table
    acc, ram, disk = w.figures["memory"].data                                  # stacked % per (stage, weights|KV)
    assert (acc.name, ram.name, disk.name) == ("accelerator", "RAM", "disk")
    want = [f for s in p.stages for f in (s.weight_fractions, s.kv_fractions)]
    assert np.allclose(np.c_[acc.y, ram.y, disk.y], 100 * np.asarray(want))
    assert list(acc.x[1][::2]) == [f"weights<br>{s.weight_offload:.0%} off" for s in p.stages]
    assert list(acc.x[1][1::2]) == [f"KV<br>{s.kv_offload:.0%} off" for s in p.stages]
    bars = " ".join(t for tr in w.figures["assignment"].data for t in tr.text)
    assert all(f"offload W {s.weight_offload:.0%}" in bars for s in p.stages)

    w.batch.value = 1                                                           # re-solved: one row, one pass
    assert "micro-batch 1 × 1 (batch 1: the whole batch in one pass)" in w.stages_view.value
    assert "micro-batch 1 × 1" in w.figures["memory"].layout.title.text
    for c in w.workers.values():                                                # room for everything: no offload
        c.memory_gib.value = 1.0
    assert all(s.weight_offload == 0 and s.kv_offload == 0 for s in w.plan.stages)
    assert "offload W" not in " ".join(t for tr in w.figures["assignment"].data for t in tr.text)
    assert set(w.figures["memory"].data[0].y) == {100.0}                        # all in the accelerator


def test_static_plan_prints_micro_batch_and_offloading(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from bloombee_nb.notebook.plan_widget import static_plan

    InteractiveShell.instance()                 # display() prints text/plain in a plain shell
    plan = static_plan(tight(), Workload(batch=8, objective="throughput"))
    out = capsys.readouterr().out
    assert f"micro-batch {plan.micro_batch} × {plan.n_micro}" in out and "weights offloaded" in out
    assert "<figure: memory per stage" in out
    row = next(line for line in out.splitlines() if line.startswith("1 "))
    assert f"{plan.stages[0].weight_offload:.0%}" in row.split()


def test_link_map_highlights_the_chain():
    p = three_alike()
    w = PlanWidget(p)
    fig = w.figures["link_map"]
    chain = next(t for t in fig.data if t.name == "chain")
    pos = figures._node_positions(["client", "a", "b", "c"])
    assert list(zip(chain.x, chain.y)) == [pos["client"], pos["a"], pos["client"]]
    assert len([t for t in fig.data if t.mode == "lines"]) == 6 + 1            # 6 pairs + the chain
    assert len(fig.layout.annotations) == 2                                     # arrows client→a, a→client
    w.workers["a"].include.value = False
    chain = next(t for t in fig.data if t.name == "chain")
    assert list(zip(chain.x, chain.y)) == [pos["client"], pos["b"], pos["client"]]
    marks = np.asarray(w.figures["link_heatmap"].data[0].text)
    assert marks[0, 2] == "●" and marks[2, 0] == "●" and marks[0, 1] == ""      # client→b, b→client
    w.link_view.value = "heatmap"
    assert w._link_boxes[0].layout.display == "none" and w._link_boxes[1].layout.display is None


# ---- on a real cluster -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    """One 2-worker cluster for the module, the shipped model placed on it, and its profile."""
    from bloombee_nb.cluster.profiling import profile_cluster

    with bb.connect(n_workers=2) as cluster:
        with distributed(default_model_path(), cluster) as m:
            m.profile = profile_cluster(cluster, m.deployment.worker_path, progress=False)
            yield m


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def reference_text(tokenizer, prompt: str, n: int) -> str:
    ref = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_apply_moves_the_spans(model, tokenizer):
    w = PlanWidget(model.profile, model=model)
    first = w.plan.stages[0].worker
    w.workers[first].include.value = False          # the planner must use the other worker
    assert first not in [s.worker for s in w.plan.stages]
    w.apply()
    assert model.placement.spans == w.plan.layer_spans
    assert [s.worker for s in model.placement.stages] == w.plan.workers and model.plan is w.plan
    assert model.profile is w.measured and "applied" in w.status.value
    out = GenerationPanel(live=False).run(model, tokenizer, "import os", max_new_tokens=6)
    assert out.text == reference_text(tokenizer, "import os", 6)


def test_generation_panel_streams_in_batches(model, tokenizer, capsys):
    prompt = "def fibonacci(n):"
    live = GenerationPanel(live=True, interval_s=0.0)      # redraw on every streamed piece
    result = live.run(model, tokenizer, prompt, max_new_tokens=10)
    assert result.text == reference_text(tokenizer, prompt, 10) and live.text == result.text
    assert live.updates >= 3 and result.text.strip().split()[0] in live.text_view.value
    assert "tokens/s" in live.stats_view.value and "acceptance rate: — (plain decoding" in live.stats_view.value
    compute, wall = live.figure.data                        # per stage + the whole step
    assert len(compute.x) == len(model.placement.stages) + 1 and min(compute.y) > 0 and wall.y[-1] >= compute.y[-1]
    batched = GenerationPanel(live=True, interval_s=60.0)  # no redraw until the stream ends
    batched.run(model, tokenizer, prompt, max_new_tokens=10)
    assert batched.updates == 1 and batched.text == result.text
    GenerationPanel(live=False).run(model, tokenizer, prompt, max_new_tokens=4)
    assert capsys.readouterr().out.startswith(prompt + result.text[:3])     # plain streamed text


def test_generation_panel_shows_speculation(model, tokenizer):
    prompt = "def fibonacci(n):"
    live = GenerationPanel(live=True, interval_s=0.0)
    result = live.run(model, tokenizer, prompt, max_new_tokens=12, speculative=True, tree_widths=(2, 2, 1))
    assert result.text == reference_text(tokenizer, prompt, 12)
    spec = result.speculation
    assert spec.rounds < 12 and spec.tokens_per_traversal > 1 and 0 < spec.acceptance_rate <= 1
    assert f"{spec.tokens_per_traversal:.2f} tokens per traversal" in live.stats_view.value
    assert "acceptance rate: <b>" in live.stats_view.value and spec.last_widths[0] == 2
    assert f"last tree: {','.join(map(str, spec.last_widths))}" in live.stats_view.value


def test_link_map_labels_the_codec_chosen_per_link():
    p = three_alike()
    plan = PlanWidget(p).plan
    chain = figures.chain_names(p, plan)
    codecs = {(a, b): f"codec-{a}-{b}" for a, b in zip(chain, chain[1:])}
    fig = figures.link_map(p, plan, codecs)
    labels = [a.text for a in fig.layout.annotations if a.text]
    assert sorted(labels) == sorted(f"<i>{c}</i>" for c in codecs.values())
    hover = " ".join(next(t for t in fig.data if t.mode == "markers").text)
    assert all(f"codec {c}" in hover for c in codecs.values())
    heat = figures.link_heatmap(p, plan, codecs).data[0]
    names = ["client", "a", "b", "c"]
    a, b = chain[0], chain[1]
    assert heat.hovertext[names.index(a)][names.index(b)] == f", codec {codecs[(a, b)]}"

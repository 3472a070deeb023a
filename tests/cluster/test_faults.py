"""Workers die, hang and leave in the middle of a generation: nothing is lost, the output is exact.

Real processes, no mocks of our own parts: a scheduler and four ``bloombee-nb worker`` processes
(w0..w3); each test loads the 5-layer test checkpoint over three of them and, while ``generate``
streams, SIGKILLs, SIGSTOPs or SIGTERMs the worker hosting the middle span. The greedy output must
equal plain transformers' token for token, and the recovery must be recorded and lie between two
streamed tokens (no wall-clock bounds here: the times are measured in
``benchmarks/results/recovery.md``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import bloombee_nb as bb
from bloombee_nb.errors import RecoveryError
from bloombee_nb.generate.recovery import GONE, HUNG, LEAVING, UNREACHABLE
from tests.conftest import BIN, padded_batch, start_process
from tests.helpers import wait_for

NEW_TOKENS = 8
FAULT_AT = 3  # tokens streamed before the fault


class Swarm:
    """A scheduler and named worker processes; ``procs[name]`` is the worker's Popen, ``logs[name]``
    the file its output goes to."""

    def __init__(self, log_dir: Path, names=("w0", "w1", "w2", "w3")):
        self.sched, self.address = start_process([BIN, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                           "--dashboard-address", ":0"], r"scheduler at (tcp://\S+)")
        self.log_dir, self.logs, self.procs = log_dir, {}, {}
        for n in names:
            self.spawn(n)
        self.cluster = bb.connect(self.address)
        self.cluster.wait_for_workers(len(names), 120)

    def spawn(self, name: str) -> None:
        """Start worker ``name`` (a replacement joining, when the cluster already runs)."""
        self.logs[name] = self.log_dir / f"{name}.log"
        self.procs[name] = subprocess.Popen([BIN, "worker", self.address, "--name", name, "--listen", "127.0.0.1",
                                             "--leave-grace-s", "20"], stdout=open(self.logs[name], "w"),
                                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))

    def wait_for(self, name: str, timeout_s: float = 120) -> None:
        wait_for(lambda: name in {str(w["name"]) for w in self.cluster.workers().values()}, timeout_s,
                 f"worker {name} to join")

    def addresses(self, *names: str) -> list[str]:
        by_name = {str(w["name"]): a for a, w in self.cluster.workers().items()}
        return [by_name[n] for n in names]

    def close(self):
        self.cluster.close()
        for p in [*self.procs.values(), self.sched]:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = Swarm(tmp_path_factory.mktemp("swarm"))
    yield s
    s.close()


class FaultAt(BaseStreamer):
    """Streams tokens with their arrival times; calls ``fault()`` once ``at`` new tokens arrived."""

    def __init__(self, at: int, fault):
        self.at, self.fault, self.times, self.prompt_seen = at, fault, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        if len(self.times) == self.at:
            self.fault()

    def end(self):
        pass

    @property
    def longest_gap_s(self) -> float:
        return max(b - a for a, b in zip(self.times, self.times[1:]))


def check_timeline(event, streamer) -> None:
    """The recovery was measured, and it happened between two streamed tokens: the stream's longest
    gap holds the whole pause (orderings on one clock, true however slow the machine is)."""
    assert 0 <= event.detect_s <= event.pause_s and event.replay_s > 0, event
    assert streamer.longest_gap_s >= event.pause_s, (streamer.longest_gap_s, event)


def record(event, streamer) -> None:
    """Print the measured recovery (pytest -s shows it; benchmarks/bench_recovery.py measures it properly)."""
    print(f"\n{event.describe()} | detect {event.detect_s:.2f} s, rebuild {event.rebuild_s:.2f} s, "
          f"replay {event.replay_s:.2f} s, longest gap between tokens {streamer.longest_gap_s:.2f} s")


def _generate_through(swarm, checkpoints, reference, workers, fault, **load):
    """Load over ``workers`` (spans 0–1, 2–3, 4), generate with ``fault`` after FAULT_AT tokens,
    check exactness; returns (model, streamer)."""
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=swarm.cluster,
                                                           workers=swarm.addresses(*workers),
                                                           spans=[(0, 2), (2, 4), (4, 5)], **load)
    ids, _ = padded_batch([6], seed=4)
    want = reference["llama"].generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    streamer = FaultAt(FAULT_AT, fault)
    got = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, streamer=streamer)
    assert torch.equal(got, want)
    return model, streamer


@pytest.mark.slow
def test_a_killed_worker_is_replaced_by_a_spare_and_the_output_is_exact(swarm, checkpoints, reference):
    victim = swarm.procs["w1"]
    model, streamer = _generate_through(swarm, checkpoints, reference, ("w0", "w1", "w2"),
                                        lambda: victim.send_signal(signal.SIGKILL))
    (event,) = model.events
    record(event, streamer)
    assert [(w.name, w.why) for w in event.lost] == [("w1", GONE)]
    assert event.new_spans == (("w0", 0, 2), ("w3", 2, 4), ("w2", 4, 5))  # the spare takes the lost span
    assert event.replayed_steps == FAULT_AT  # prefill + the decode steps before the fault
    check_timeline(event, streamer)
    html = swarm.cluster._repr_html_()
    assert "lost w1 (gone)" in html and "w3" in html
    model.close()


@pytest.mark.slow
def test_a_hung_worker_is_noticed_by_ping_and_its_span_moves(swarm, checkpoints, reference):
    victim = swarm.procs["w2"]
    try:
        model, streamer = _generate_through(swarm, checkpoints, reference, ("w0", "w2", "w3"),
                                            lambda: victim.send_signal(signal.SIGSTOP),
                                            call_timeout_s=20, ping_timeout_s=2)
    finally:
        victim.send_signal(signal.SIGCONT)
    (event,) = model.events
    record(event, streamer)
    assert [(w.name, w.why) for w in event.lost] == [("w2", HUNG)]
    assert {w for w, _, _ in event.new_spans} == {"w0", "w3"}  # no spare left: even split over the live ones
    check_timeline(event, streamer)
    model.close()


@pytest.mark.slow
def test_a_worker_asked_to_leave_hands_its_span_over_and_exits(swarm, checkpoints, reference):
    victim = swarm.procs["w3"]
    model, streamer = _generate_through(swarm, checkpoints, reference, ("w0", "w3", "w2"),
                                        lambda: victim.send_signal(signal.SIGTERM))
    (event,) = model.events
    record(event, streamer)
    assert [(w.name, w.why) for w in event.lost] == [("w3", LEAVING)]
    assert "w3" not in {w for w, _, _ in event.new_spans}
    check_timeline(event, streamer)
    assert victim.wait(30) == 0  # it left once its sessions had moved, well within its grace period
    log = swarm.logs["w3"].read_text()
    assert "leaving: 1 sessions open" in log and " left" in log and "still open" not in log, log
    model.close()


@pytest.mark.slow
def test_speculative_batches_replay_their_trees_and_kept_paths_exactly(swarm):
    """Token trees, kept paths riding on the next step and -1-padded rows of a batch, replayed after
    the worker of the *last* stage is killed (its ``collect`` connection closes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.generate.speculative import load_draft
    from bloombee_nb.shipped import DRAFT_PATH, default_model_path

    swarm.spawn("w4")  # a replacement joins while the cluster runs
    swarm.wait_for("w4")
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    ids = tok(["def fibonacci(n):", "import os\nclass", "    return self."], return_tensors="pt", padding=True)
    want = AutoModelForCausalLM.from_pretrained(path).eval().generate(**ids, max_new_tokens=16, do_sample=False,
                                                                       pad_token_id=1)
    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=swarm.cluster,
                                                           workers=swarm.addresses("w0", "w2", "w4"))
    victim = swarm.procs["w4"]
    streamer = FaultAt(2, lambda: victim.send_signal(signal.SIGKILL))
    got = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=1, assistant_model=load_draft(
        str(DRAFT_PATH)), tree_widths=(2, 2, 1), streamer=streamer)
    assert torch.equal(got, want)
    (event,) = model.events
    record(event, streamer)
    assert [w.name for w in event.lost] == ["w4"] and event.lost[0].why in (GONE, UNREACHABLE)  # a race: which first
    assert {w for w, _, _ in event.new_spans} == {"w0", "w2"}
    model.close()


@pytest.mark.slow
def test_history_is_what_the_stages_hold_after_rollbacks(swarm, checkpoints):
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=swarm.cluster,
                                                           workers=swarm.addresses("w0"))
    ids, _ = padded_batch([6], seed=1)
    with model.inference_session(max_length=20) as s:
        out = model.generate(ids, session=s, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert [(c.kind, c.base, c.after) for c in s.history][:2] == [("step", 0, 6), ("step", 6, 7)]
        s.rollback(9)   # inside the steps: the steps before stay whole
        assert [c.after for c in s.history] == [6, 7, 8, 9]
        s.rollback(6)   # exactly at a step's start: it goes
        assert [(c.kind, c.after) for c in s.history] == [("step", 6)]
        s.rollback(3)   # inside the prompt's step: kept whole, then rolled back when replayed
        assert [(c.kind, c.after) for c in s.history] == [("step", 6), ("rollback", 3)]
        again = model.generate(out[:, :9], session=s, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert sum(c.args[0].shape[1] for c in s.history if c.kind == "step") <= s.max_length
    model.close()
    assert torch.equal(again, out)  # continued exactly from the 3 positions the stages still held


def test_without_live_workers_the_error_says_what_to_do():
    from bloombee_nb.cluster.placement import place
    from bloombee_nb.generate.recovery import LostWorker, replacement_placement

    old = place(["tcp://a:1", "tcp://b:1"], 4)
    lost = {"tcp://b:1": LostWorker("tcp://b:1", "b", GONE)}
    with pytest.raises(RecoveryError, match="bloombee-nb worker"):
        replacement_placement(old, {**lost, "tcp://a:1": LostWorker("tcp://a:1", "a", GONE)}, [], 4)
    placement, plan = replacement_placement(old, lost, ["tcp://a:1"], 4)
    assert placement.spans == [(0, 4)] and plan is None


def test_a_planned_model_re_solves_without_the_lost_worker():
    from bloombee_nb.cluster.placement import place
    from bloombee_nb.cluster.planning import runtime_plan
    from bloombee_nb.generate.recovery import LostWorker, replacement_placement
    from bloombee_nb.plan import Workload
    from bloombee_nb.plan.synthetic import random_cluster

    profile = random_cluster(5, seed=1)
    plan = runtime_plan(profile, Workload())
    old = place(plan.workers, 80, plan.layer_spans)
    gpu = next(w for w in profile.workers if w.accel_bytes)            # the plan's fast worker, lost
    names = {w.address: w.name for w in profile.workers}
    moved = {"w-3": "tcp://10.0.0.33:9999"}                             # w-3 came back at a new address
    names.update({a: n for n, a in moved.items()})
    live = [moved.get(w.name, w.address) for w in profile.workers if w is not gpu and w.name != "w-3"] + \
        list(moved.values())
    placement, new_plan = replacement_placement(old, {gpu.address: LostWorker(gpu.address, gpu.name, GONE)}, live,
                                                80, profile=profile, names=names)
    assert gpu.address not in placement.workers and set(placement.workers) <= set(live)
    assert placement.n_layers == 80 and new_plan.workers == placement.workers


@pytest.mark.slow
def test_the_generation_panel_shows_the_pause_and_the_recovery(swarm, capsys):
    from transformers import AutoTokenizer

    from bloombee_nb.notebook.generation import GenerationPanel, _Summary
    from bloombee_nb.shipped import default_model_path

    swarm.spawn("w5")
    swarm.wait_for("w5")
    path = default_model_path()
    model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=swarm.cluster,
                                                           workers=swarm.addresses("w0", "w5"))
    panel = GenerationPanel(live=False)
    push, victim = panel.push, swarm.procs["w5"]

    def push_then_kill(*args, **kwargs):  # the panel's own push; the worker is killed after the first text
        push(*args, **kwargs)
        if victim.poll() is None and not kwargs.get("done"):
            victim.send_signal(signal.SIGKILL)
            victim.wait()

    panel.push = push_then_kill
    result = panel.run(model, AutoTokenizer.from_pretrained(path), "def fibonacci(n):", max_new_tokens=24)
    assert result.new_tokens == 24 and len(result.recoveries) == 1
    assert "⏸ lost w5" in capsys.readouterr().err                      # said while streaming
    assert "recovered in" in result._repr_html_() and "⏸ lost w5" in repr(_Summary(result))
    assert result.stage_names[0] == "w0" and result.stage_names[1] not in ("w0", "w5")  # a spare took w5's span
    model.close()


@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_even_with_a_session_open(swarm, checkpoints):
    swarm.spawn("w6")
    swarm.wait_for("w6")
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=swarm.cluster,
                                                           workers=swarm.addresses("w6"))
    victim = swarm.procs["w6"]
    with model.inference_session(max_length=16) as s:
        model(torch.tensor([[5, 6, 7]]), cache=s)        # a session stays open on w6: it would wait 20 s
        victim.send_signal(signal.SIGTERM)
        wait_for(lambda: "leaving: 1 sessions open" in swarm.logs["w6"].read_text(), 20, "w6 to start leaving",
                 explain=swarm.logs["w6"].read_text)
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(15) == 0  # a timeout, not a measurement: the grace it skipped is 20 s
    log = swarm.logs["w6"].read_text()
    assert "second signal, closing now" in log and " left" not in log, log  # closed, not handed over
    model.close()

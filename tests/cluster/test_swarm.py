"""The swarm: spans hosted once, used by every client, routed through replicas.

Two real setups: an embedded LocalCluster whose spans are hosted by one client and used by others
(in-process Dask clients: each is its own Dask client, with its own id), and real
``bloombee-nb scheduler`` / ``bloombee-nb worker --host MODEL`` processes that pick their own spans.
Exactness against plain transformers first, always.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import pytest
import torch

import bloombee_nb as bb
from bloombee_nb import transport
from bloombee_nb.cluster.routing import actors, hosted, model_key
from bloombee_nb.errors import SessionOwnerError, StageUnavailableError, SwarmError
from bloombee_nb.plan.swarm import better_span, choose_span, coverage, route
from tests.cluster.test_faults import FaultAt, Swarm
from tests.conftest import BIN, padded_batch
from tests.helpers import distributed, wait_for

NEW = 6


def greedy(model_or_ref, ids, mask=None, **kw):
    return model_or_ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)


def open_sessions(cluster) -> dict:
    """worker -> sessions open on its stages, where there are any."""
    def count(dask_worker):
        from bloombee_nb.cluster.stage import open_sessions

        return open_sessions(dask_worker)
    return {w: n for w, n in cluster.client.run(count, on_error="ignore").items() if n}


def stage_actors(cluster) -> int:
    """Stage actors alive on the cluster's workers."""
    def count(dask_worker):
        from bloombee_nb.cluster.stage import hosted_stages

        return len(hosted_stages(dask_worker))
    return sum(cluster.client.run(count).values())


def unhost_now(cluster, path, worker) -> None:
    """Unhost ``worker``'s spans of ``path`` and wait until its stages are gone (the next step through
    them fails), so a fault injected mid-generation lands before the generation ends."""
    bb.unhost(cluster, path, workers=[worker])

    def stages(dask_worker):
        from bloombee_nb.cluster.stage import hosted_stages

        return len(hosted_stages(dask_worker))
    # (a client still wanting the key would keep it: host() once left one to the garbage collector)
    wait_for(lambda: not cluster.client.run(stages, workers=[worker])[worker], 10, f"{worker} to stop its stage",
             poll_s=0.02)


# ---- pure functions ------------------------------------------------------------------------------
def test_joining_workers_fill_gaps_first_then_replicate_the_least_served_aligned_span():
    have: list[tuple[int, int]] = []
    for cap in (2, 2, 2):
        have.append(choose_span(5, have, cap))
    assert have == [(0, 2), (2, 4), (4, 5)]
    assert choose_span(5, have, 2) == (0, 2)          # everything once: the first aligned span again
    assert choose_span(5, have + [(0, 2)], 3) == (2, 5)  # two aligned segments fit: both replicated
    assert choose_span(5, [], 10) == (0, 5)
    with pytest.raises(ValueError, match="capacity"):
        choose_span(5, [], 0)


def test_a_hosting_worker_moves_only_when_that_raises_the_least_replicated_layer():
    assert better_span(5, [(0, 2), (0, 2)], (0, 2), 3) == (2, 5)          # a gap: a replica fills it
    assert better_span(5, [(0, 2), (2, 5)], (0, 2), 3) is None            # a last copy never moves
    assert better_span(5, [(0, 2), (0, 2), (2, 5)], (0, 2), 3) is None    # min stays 1: no move for a tie
    assert better_span(4, [(0, 2)] * 3 + [(2, 4)], (0, 2), 2) == (2, 4)   # lopsided: min 1 -> 2
    assert better_span(4, [(0, 2)] * 2 + [(2, 4)] * 2, (0, 2), 2) is None  # even: settled


def test_with_measured_speeds_a_fast_lender_moves_to_where_only_slow_ones_serve():
    """Replica counts are even (two per span), but layers 2-3 are served by two slow lenders (10 s
    per layer, a laptop) and 0-1 by two fast ones: the swarm's tokens/s is set by 2-3. A fast lender
    of 0-1 moves there; a slow one moving would not help; afterwards nothing moves (settled)."""
    hosted, layer_s = [(0, 2), (2, 4), (2, 4), (0, 2)], [1.0, 10.0, 10.0, 1.0]
    assert all(better_span(4, hosted, i, 2) is None for i in range(4))   # counted in replicas: balanced
    assert better_span(4, hosted, 1, 2, layer_s) is None                  # slow: stays
    assert better_span(4, hosted, 3, 2, layer_s) == (2, 4)                # fast: 0.1 -> 0.5 tokens/s at the bottleneck
    moved = [(0, 2), (2, 4), (2, 4), (2, 4)]
    assert all(better_span(4, moved, i, 2, layer_s) is None for i in range(4))
    assert coverage(4, moved, layer_s) == pytest.approx([0.5, 0.5, 0.6, 0.6])


def test_route_takes_the_cheapest_chain_through_replicas_and_none_when_uncovered():
    spans = [(0, 2), (2, 5), (0, 2), (2, 4), (4, 5)]
    cost = [1.0, 5.0, 0.5, 1.0, 1.0]
    assert route(spans, 5, cost, lambda p, i: 0.1) == [2, 3, 4]        # 0.5+1+1 + 4 hops beats 0.5+5 + 3
    assert route(spans, 5, cost, lambda p, i: 10.0) == [2, 1]          # slow links: fewer hops win
    assert route([(0, 2), (3, 5)], 5, [1, 1], lambda p, i: 0.0) is None


# ---- an embedded cluster: hosting, attaching, sharing, ownership -------------------------------------
@pytest.fixture(scope="module")
def local():
    with bb.connect(n_workers=3) as c:
        yield c


def test_a_client_routes_by_measured_speed_and_a_re_route_keeps_the_stages_its_sessions_are_on():
    from bloombee_nb.cluster.routing import HostedSpan, StageLoad, choose_route

    def span(name, a, b, layer_s):
        return HostedSpan("m", f"tcp://{name}", name, a, b, 4, "float32", name, layer_s)

    spans = [span("fast", 0, 2, 1e-3), span("slow", 0, 2, 4e-3), span("b", 2, 4, 1e-3), span("c", 2, 4, 1.5e-3)]
    idle = {s.key: StageLoad(1e-4, 0, 0, 0, False) for s in spans}
    assert [s.name for s in choose_route(spans, idle, 4)] == ["fast", "b"]        # the measured speeds
    # re-routing sessions open on fast -> c: keep c (b would be a little faster, but a replay costs more)
    assert [s.name for s in choose_route(spans, idle, 4, prefer={"fast", "c"})] == ["fast", "c"]
    # unknown speeds (0): every layer priced the same, and the nearer replica wins
    unknown = [span("x", 0, 2, 0.0), span("b", 2, 4, 0.0), span("c", 2, 4, 0.0)]
    near = {"x": idle["fast"], "b": StageLoad(1e-5, 0, 0, 0, False), "c": idle["c"]}
    assert [s.name for s in choose_route(unknown, near, 4)] == ["x", "b"]


def test_new_sessions_move_off_a_much_busier_route_and_only_then():
    from bloombee_nb.cluster.routing import HostedSpan, StageLoad, lighter_route

    spans = [HostedSpan("m", f"tcp://{n}", n, 0, 4, 4, "float32", n, 1e-3) for n in ("a", "b")]

    def loads(a_sessions, a_queued=0, a_answers=True, a_leaving=False):
        return {"a": StageLoad(1e-4, a_sessions, a_queued, 1, a_leaving) if a_answers else None,
                "b": StageLoad(1e-4, 0, 0, 0, False)}

    assert lighter_route(spans, loads(0), 4, ["a"]) is None            # equal: stay
    assert lighter_route(spans, loads(2), 4, ["a"]) is None            # 1.5x the other: within the margin
    assert [s.name for s in lighter_route(spans, loads(3), 4, ["a"])] == ["b"]     # 1.75x: move
    assert [s.name for s in lighter_route(spans, loads(0, a_queued=1), 4, ["a"])] == ["b"]  # steps wait there
    assert [s.name for s in lighter_route(spans, loads(0, a_answers=False), 4, ["a"])] == ["b"]
    assert [s.name for s in lighter_route(spans, loads(0, a_leaving=True), 4, ["a"])] == ["b"]
    assert lighter_route(spans, loads(3), 4, ["b"]) is None            # already on the best route


def test_a_clients_new_sessions_move_to_a_less_loaded_replica_and_the_route_left_is_freed(local, checkpoints,
                                                                                         reference):
    """Two replicas of the whole model, priced as slow lenders (their stage time outweighs the round
    trips): sessions the client keeps open load the replica it attached to, so after a few its new
    sessions open on the other one. Sessions already open stay where they are and every output equals
    transformers'; the chain left behind is released when its last session closes."""
    path = checkpoints["llama"]
    w = local.worker_addresses()
    bb.host(path, local, workers=w[:2], spans=[(0, 5), (0, 5)], layer_s=0.05)
    try:
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user, swarm_reroute_s=0)
            ids, mask = padded_batch([5], seed=4)
            want = reference["llama"](ids).logits[:, -1]
            sessions, first = [], model.chain
            for _ in range(6):
                s = model.inference_session(max_length=16)
                torch.testing.assert_close(model(ids, attention_mask=mask, cache=s).logits[:, -1], want)
                sessions.append(s)
            routes = [s.chain.refs[0].worker for s in sessions]
            assert len(set(routes)) == 2 and routes[:3] == [first.refs[0].worker] * 3, routes  # 3 sessions: 1.75x
            assert model.deployment.load_reroutes == 1 and first.retired and not first.released
            assert open_sessions(local) == {w[0]: 3, w[1]: 3}
            assert torch.equal(greedy(model, ids, mask), greedy(reference["llama"], ids, mask))
            for s in sessions:
                s.close()
            assert first.released and not model.chain.released
            model.close()
        assert not open_sessions(local)
    finally:
        bb.unhost(local, path)


def test_a_call_that_runs_after_its_chain_was_released_raises_a_typed_error(local, checkpoints):
    """A stage call is made in the caller's thread and runs later on the event loop; a chain released
    in between (a retire when its last session closed, another session's recovery) must give the
    StageUnavailableError a session recovers from. The 10-minute churn soak found an IndexError here
    (9 failed generations), once new sessions moved between routes every second."""
    path = checkpoints["llama"]
    bb.host(path, local)
    try:
        with bb.connect(local.address) as user, distributed(path, user) as model:
            chain = model.chain
            call = chain._call(0, "ping")     # made, not yet run
            chain.retire()                     # no session open on it: released at once
            assert chain.released
            with pytest.raises(StageUnavailableError, match="released"):
                user.client.sync(lambda: call)
    finally:
        bb.unhost(local, path)


def test_hosted_spans_outlive_their_host_and_clients_attach_without_loading(local, checkpoints, reference):
    path = checkpoints["llama"]
    with bb.connect(local.address) as lender:
        spans = bb.host(path, lender)
    assert [(s.start, s.end) for s in spans] == [(0, 2), (2, 4), (4, 5)]
    assert stage_actors(local) == 3                          # the lender left; its spans did not
    view = bb.swarm(local)
    assert view.replicas(path) == [1, 1, 1, 1, 1]
    assert "layers 2–3" in repr(view) and "<table" in view._repr_html_()

    ids, mask = padded_batch([7, 4], seed=1)
    with bb.connect(local.address) as user:
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user)
        assert model.attached and "attached to the swarm" in repr(model)
        assert stage_actors(local) == 3                      # nothing loaded on its behalf
        assert torch.equal(greedy(model, ids, mask), greedy(reference["llama"], ids, mask))
        model.close()
    assert stage_actors(local) == 3                          # closing a user frees nothing hosted
    bb.unhost(local, path)


def test_clients_share_the_stages_and_each_stays_exact(local, checkpoints, reference):
    path = checkpoints["qwen2"]
    bb.host(path, local)
    users = [bb.connect(local.address) for _ in range(2)]
    try:
        models = [bb.DistributedModelForCausalLM.from_pretrained(path, cluster=u) for u in users]
        prompts = [padded_batch([5], seed=s) for s in (2, 3)]
        got, errors = [None, None], []

        def run(i):
            try:
                got[i] = greedy(models[i], *prompts[i])
            except Exception as exc:  # noqa: BLE001 — asserted below
                errors.append(exc)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for i in range(2):
            assert torch.equal(got[i], greedy(reference["qwen2"], *prompts[i]))
        assert stage_actors(local) == 3                      # one copy of the model for both clients
        for m in models:
            m.close()
    finally:
        for u in users:
            u.close()
        bb.unhost(local, path)


def test_a_session_on_a_released_swarm_chain_still_closes_on_the_hosted_stages(local, checkpoints):
    """A re-route releases the client's chain while other sessions are open on it; their closes must
    still reach the hosted stages (which live on). Releasing used to drop the Futures Dask binds to
    the hosted stages' handles, after which every call on them failed ("Worker holding Actor was
    lost") and the closes were skipped: in the churn soak a leaving worker waited out its grace."""
    path = checkpoints["llama"]
    bb.host(path, local)
    try:
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user, micro_batch=2)
            sessions = [model.inference_session(max_length=16) for _ in range(2)]
            for s, lengths in zip(sessions, ([5, 3, 4, 5], [5])):  # the first goes as 2 micro-batches
                ids, mask = padded_batch(lengths, seed=8)
                model(ids, attention_mask=mask, cache=s)
            chain = model.chain
            chain.release()         # what a re-route does to the chain these sessions are open on
            time.sleep(0.5)         # Dask drops released keys on its event loop
            # a close that finds its chain released (before or while it runs: the soak left 2 sessions
            # when a release landed between the session's check and the chain's call) raises; the
            # session holds what it goes by there, so it can still close it on the stages left behind
            with pytest.raises(StageUnavailableError, match="released"):
                chain.close_session(sessions[0].stages)
            assert len(sessions[0].stages.ids) == 2
            for s in sessions:
                s.close()
            wait_for(lambda: not open_sessions(local), 10, "the hosted stages' sessions to close",
                     lambda: str(open_sessions(local)), poll_s=0.1)
            model.close()
    finally:
        bb.unhost(local, path)


@pytest.mark.slow  # a fault: a host lost, the swarm heals
def test_a_replica_moves_to_layers_whose_only_host_was_lost_and_generation_goes_on_exactly(local, checkpoints,
                                                                                            reference):
    """Rebalancing after a loss: the only host of layers 2–4 stops hosting mid-generation; the client
    waits for the swarm to heal, a replica of layers 0–1 moves there (the other copy of 0–1 stays),
    and the session replays on the new route: the output equals transformers'."""
    path = checkpoints["llama"]
    w = local.worker_addresses()
    bb.host(path, local, workers=w, spans=[(0, 2), (2, 5), (0, 2)])
    key = model_key(path)
    try:
        assert bb.rebalance(local, path, capacity=3) == []           # every layer hosted: nothing moves
        moves = []

        def lose_and_heal():
            bb.unhost(local, path, workers=[w[1]])
            threading.Thread(target=lambda: moves.extend(bb.rebalance(local, path, capacity=3)), daemon=True).start()

        ids, _ = padded_batch([6], seed=5)
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user)
            got = greedy(model, ids, streamer=FaultAt(3, lose_and_heal))
            assert model.events                                       # it re-routed (and waited)
            model.close()
        assert torch.equal(got, greedy(reference["llama"], ids))
        ((old, new),) = moves
        assert old.span == (0, 2) and new.span == (2, 5) and new.worker == old.worker
        assert sorted(s.span for s in hosted(local, key)) == [(0, 2), (2, 5)]
        assert bb.rebalance(local, path, capacity=3) == []           # settled: the last copies stay
    finally:
        bb.unhost(local, path)


@pytest.mark.parametrize("lost, kw", [("middle", {}), ("middle", {"micro_batch": 1, "prefill_chunk": 3}),
                                      ("first", {})])
def test_a_lost_replica_is_replaced_by_replaying_only_its_span(local, checkpoints, reference, lost, kw):
    """A stage of the route stops mid-generation and another replica of its span takes its place:
    only that replica replays the session's history — from the logged outputs of the stage before
    it (or the client's own for the first stage) — while the stages that hold the session keep it.
    With micro-batches and prompt chunks too; the output equals transformers'."""
    path = checkpoints["llama"]
    w = local.worker_addresses()
    spans = {"middle": [(0, 2), (2, 4), (2, 4), (4, 5)], "first": [(0, 2), (0, 2), (2, 5)]}[lost]
    bb.host(path, local, workers={"middle": [w[0], w[1], w[2], w[0]], "first": [w[0], w[1], w[2]]}[lost], spans=spans)
    try:
        ids, mask = padded_batch([7, 5], seed=6)
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user, **kw)
            i = 1 if lost == "middle" else 0
            victim = model.placement.stages[i].worker

            def steps_run():  # stage actor -> steps it ran so far (the queue's counter)
                return {r.key: x["steps"] for r, x in zip(model.chain.refs, model.chain.info())}

            before = steps_run()
            want = greedy(model, ids, mask)
            once = {k: n - before[k] for k, n in steps_run().items()}   # one whole generation, per stage
            before = steps_run()
            got = greedy(model, ids, mask, streamer=FaultAt(3, lambda: unhost_now(local, path, victim)))
            (event,) = model.events
            assert event.replayed_on == 1 and model.placement.stages[i].worker != victim
            assert "on 1 stage)" in event.describe()
            # the stages that kept the session ran the generation's steps once (and maybe the failed one
            # again, one step of every micro-batch), never its history a second time
            parts = 2 if kw.get("micro_batch") == 1 else 1
            kept = {k: n - before[k] for k, n in steps_run().items() if k in before}
            assert len(kept) == len(model.chain.refs) - 1
            assert all(once[k] <= n <= once[k] + parts for k, n in kept.items()), (once, kept)
            assert torch.equal(got, want)
            model.close()
        assert torch.equal(got, greedy(reference["llama"], ids, mask))
    finally:
        bb.unhost(local, path)


def test_a_speculating_session_replays_only_the_lost_span_and_stays_exact(local):
    """The same with speculative decoding: the history holds token trees, kept paths riding on the
    next step and kept paths sent alone; the replica replays them all from the logged outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.generate.speculative import load_draft
    from bloombee_nb.shipped import DRAFT_PATH, default_model_path

    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    ids = tok(["def fibonacci(n):", "import os\nclass"], return_tensors="pt", padding=True)
    want = AutoModelForCausalLM.from_pretrained(path).eval().generate(**ids, max_new_tokens=32, do_sample=False,
                                                                      pad_token_id=1)
    w = local.worker_addresses()
    bb.host(path, local, workers=[w[0], w[1], w[2], w[0]], spans=[(0, 2), (2, 4), (2, 4), (4, 6)])
    try:
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user)
            victim = model.placement.stages[1].worker
            got = model.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=1,
                                 assistant_model=load_draft(str(DRAFT_PATH)), tree_widths=(2, 2, 1),
                                 streamer=FaultAt(3, lambda: unhost_now(local, path, victim)))
            (event,) = model.events
            assert event.replayed_on == 1 and event.replayed_steps > 2
            model.close()
        assert torch.equal(got, want)
    finally:
        bb.unhost(local, path)


def test_rebalancing_weighs_spans_by_their_measured_speed(local, checkpoints, reference):
    """Each hosted stage measures its speed when it loads; with layers 2-4 on a lender ten times
    slower than the two hosts of 0-1 (given here: one machine cannot make a slow worker),
    rebalancing by speed moves a replica of 0-1 to 2-4 — by replicas (2 and 1, no layer without a
    host) it stays."""
    path = checkpoints["llama"]
    w = local.worker_addresses()
    (measured,) = bb.host(path, local, workers=[w[0]], spans=[(0, 2)])
    assert 0 < measured.layer_s < 1                           # seconds per layer of a decode step, measured
    try:
        bb.host(path, local, workers=[w[1]], spans=[(2, 5)], layer_s=measured.layer_s * 10)
        bb.host(path, local, workers=[w[2]], spans=[(0, 2)], layer_s=measured.layer_s)
        assert bb.rebalance(local, path, capacity=3) == []       # in replicas: nothing to do
        ((old, new),) = bb.rebalance(local, path, capacity=3, by="speed")
        assert old.worker in (w[0], w[2]) and (old.span, new.span) == ((0, 2), (2, 5))
        assert new.worker == old.worker and new.layer_s == measured.layer_s  # a move keeps the worker's speed
        assert bb.rebalance(local, path, capacity=3, by="speed") == []   # settled
        ids, _ = padded_batch([6], seed=7)
        with bb.connect(local.address) as user:
            model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=user)
            assert model.placement.stages[1].worker == new.worker  # routed through the fast host of 2-4
            assert torch.equal(greedy(model, ids), greedy(reference["llama"], ids))
            model.close()
    finally:
        bb.unhost(local, path)


def test_a_client_cannot_close_or_roll_back_another_clients_session(local, checkpoints):
    path = checkpoints["llama"]
    bb.host(path, local)
    a, b = bb.connect(local.address), bb.connect(local.address)
    try:
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=a)
        with model.inference_session(max_length=16) as s:
            ids, mask = padded_batch([4])
            model(ids, attention_mask=mask, cache=s)              # a prefill: 4 positions on every stage
            first = hosted(b, model_key(path))[0]
            (stage,) = actors(b, [first])                         # client b's handle on a shared stage
            with pytest.raises(SessionOwnerError, match="another client"):
                stage.close_session(s.session_id, b.client.id).result()
            with pytest.raises(SessionOwnerError, match="another client"):
                stage.rollback(s.session_id, 1, b.client.id).result()
            h = model.embed_tokens(ids[:, -1:]).detach()
            frames = [transport.encode(t.contiguous()) for t in (h, torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.long))]
            for someone in (b.client.id, None):   # a step into another client's session, named or not
                with pytest.raises(SessionOwnerError, match="another client"):
                    stage.forward(s.session_id, *frames, None, None, None, someone).result()
            assert s.length == 4 and bb.swarm(b).loads[first.key].sessions == 1  # untouched
            assert s.session_id not in repr(bb.swarm(b)) + bb.swarm(b)._repr_html_()
        model.close()
    finally:
        a.close()
        b.close()
        bb.unhost(local, path)


def test_attaching_to_a_model_the_swarm_does_not_cover_says_which_layers(local, checkpoints):
    path = checkpoints["mistral"]
    bb.host(path, local, workers=local.worker_addresses()[:1], spans=[(0, 2)])
    try:
        with pytest.raises(SwarmError, match=r"layers 2–4 .*bb.host"):
            bb.DistributedModelForCausalLM.from_pretrained(path, cluster=local, swarm=True)
        model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=local)  # "auto": its own spans
        assert not model.attached and "own spans" in repr(model)
        model.close()
    finally:
        bb.unhost(local, path)


# ---- real worker processes lent with --host --------------------------------------------------------
@pytest.fixture(scope="module")
def lent(tmp_path_factory, checkpoints):
    """A scheduler and four `bloombee-nb worker --host <llama> --layers 2` processes: they pick
    (0, 2), (2, 4), (4, 5) and a replica of (0, 2) themselves."""
    s = Swarm(tmp_path_factory.mktemp("lent"), names=("spare",))   # a worker lent to no one
    for name in ("w0", "w1", "w2", "w3"):
        s.logs[name] = s.log_dir / f"{name}.log"
        s.procs[name] = subprocess.Popen(
            [BIN, "worker", s.address, "--name", name, "--listen", "127.0.0.1", "--host", checkpoints["llama"],
             "--layers", "2"], stdout=open(s.logs[name], "w"), stderr=subprocess.STDOUT)
    s.cluster.wait_for_workers(5, 120)
    wait_for(lambda: len(hosted(s.cluster)) >= 4, 120, "4 hosted spans",
             lambda: str({n: p.read_text()[-2000:] for n, p in s.logs.items()}), poll_s=0.3)
    yield s
    s.close()


@pytest.mark.slow  # real worker processes
def test_lent_workers_pick_their_spans_and_the_cli_shows_them(lent, checkpoints):
    assert sorted(sp.span for sp in hosted(lent.cluster)) == [(0, 2), (0, 2), (2, 4), (4, 5)]
    out = subprocess.run([BIN, "swarm", lent.address], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "layers 0–1" in out and "layers 4–4" in out and "replicas per layer min 1 max 2" in out


@pytest.mark.slow  # real worker processes
def test_a_lent_worker_hosts_only_the_models_its_owner_allowed(lent, checkpoints):
    with pytest.raises(SwarmError, match="hosts only"):
        bb.host(checkpoints["qwen3"], lent.cluster, workers=lent.addresses("w1"), spans=[(0, 5)])
    with pytest.raises(SwarmError, match="hosts only"):   # claims layers 0-1 for w1, then fails to load them
        bb.host(checkpoints["qwen3"], lent.cluster, workers=lent.addresses("w1"), layers_per_worker=2)
    (given,) = bb.host(checkpoints["qwen3"], lent.cluster, workers=lent.addresses("spare"), layers_per_worker=2)
    assert given.span == (0, 2)                           # the failed claim was given back
    bb.unhost(lent.cluster, checkpoints["qwen3"])
    with pytest.raises(SwarmError, match="hosts only"):
        bb.DistributedModelForCausalLM.from_pretrained(checkpoints["qwen3"], cluster=lent.cluster,
                                                       workers=lent.addresses("w1"), spans=[(0, 5)])


@pytest.mark.slow  # real worker processes
def test_killing_a_replica_on_the_route_reroutes_without_reloading(lent, checkpoints, reference):
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=lent.cluster)
    assert model.attached
    first = model.placement.stages[0].worker
    by_address = {a: str(w["name"]) for a, w in lent.cluster.workers().items()}
    victim = lent.procs[by_address[first]]
    ids, _ = padded_batch([6], seed=4)
    idle = model.inference_session(max_length=16)   # another session of this client, open on the same chain
    model(ids, cache=idle)
    streamer = FaultAt(3, lambda: victim.send_signal(signal.SIGKILL))
    got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, streamer=streamer)
    assert torch.equal(got, reference["llama"].generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
    (event,) = model.events
    assert [w.name for w in event.lost] == [by_address[first]]
    assert model.placement.stages[0].worker != first and model.attached   # the other replica, hosted all along
    assert event.replayed_on == 1                                           # it alone replayed the history
    print(f"\nre-route: detect {event.detect_s:.2f} s, rebuild {event.rebuild_s:.2f} s, replay {event.replay_s:.2f} s,"
          f" longest gap {streamer.longest_gap_s:.2f} s")
    # the re-route released the chain the idle session is open on; closing it still frees it on the
    # hosted stages that chain crossed (they live on: a leaving worker would wait for it forever)
    assert idle._opened_on.released
    idle.close()
    wait_for(lambda: not open_sessions(lent.cluster), 10, "the stages' sessions to close after every session closed",
             lambda: str(open_sessions(lent.cluster)), poll_s=0.1)
    model.close()


@pytest.mark.slow  # real worker processes
def test_a_lent_worker_leaving_hands_its_span_over_first(lent, checkpoints, reference):
    holder = next(s for s in hosted(lent.cluster) if s.span == (2, 4))
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=lent.cluster)
    ids, _ = padded_batch([5], seed=6)
    streamer = FaultAt(3, lambda: lent.procs[holder.name].send_signal(signal.SIGTERM))
    got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, streamer=streamer)
    assert torch.equal(got, reference["llama"].generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
    lent.procs[holder.name].wait(60)   # it handed its span over, then left once no session was open on it
    assert [(s.name, s.span) for s in hosted(lent.cluster) if s.span == (2, 4) and s.worker != holder.worker] == [
        ("spare", (2, 4))], lent.logs[holder.name].read_text()[-3000:]
    assert "handed layers 2–3" in lent.logs[holder.name].read_text()
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), got)
    assert model.attached and holder.worker not in model.placement.workers   # routed through the spare's span
    model.close()


@pytest.mark.slow  # real worker processes
def test_a_lent_replica_moves_by_itself_to_layers_whose_only_host_was_killed(lent, checkpoints, reference):
    """``--host`` lenders rebalance: a new lender joins (it replicates the least served span), then
    the only host of layer 4 is SIGKILLed; within seconds a host of the span now held twice moves
    there by itself (``--rebalance-every``, 5 s), and clients attach and generate exactly again."""
    lent.logs["w4"] = lent.log_dir / "w4.log"
    lent.procs["w4"] = subprocess.Popen(
        [BIN, "worker", lent.address, "--name", "w4", "--listen", "127.0.0.1", "--host", checkpoints["llama"],
         "--layers", "2"], stdout=open(lent.logs["w4"], "w"), stderr=subprocess.STDOUT)
    wait_for(lambda: "w4" in {s.name for s in hosted(lent.cluster)}, 120, "w4 to host a span",
             lambda: lent.logs["w4"].read_text()[-2000:], poll_s=0.3)
    before = [s.span for s in hosted(lent.cluster)]   # (4, 5) once, another span twice (w4's replica)
    (last,) = [s for s in hosted(lent.cluster) if s.span == (4, 5)]
    assert max(map(before.count, before)) == 2
    lent.procs[last.name].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    while (now := [s.span for s in hosted(lent.cluster)]).count((4, 5)) != 1 or len(now) != len(before) - 1:
        assert time.monotonic() < t0 + 60, {n: p.read_text()[-1500:] for n, p in lent.logs.items()}
        time.sleep(0.2)
    print(f"\nlayer 4 hosted again {time.monotonic() - t0:.1f} s after its only host was killed")
    mover = next(s for s in hosted(lent.cluster) if s.span == (4, 5))
    assert "to 4–4" in lent.logs[mover.name].read_text()
    ids, _ = padded_batch([5], seed=7)
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=lent.cluster)
    assert model.attached
    assert torch.equal(greedy(model, ids), greedy(reference["llama"], ids))
    model.close()


@pytest.mark.slow  # its own cluster (6 s)
def test_a_session_one_stage_refuses_is_not_left_open_on_the_others(checkpoints):
    """Opening a session is all or nothing: when one stage refuses it (its worker is leaving), the
    stages that took it close it again — a client moving elsewhere would otherwise leave it there."""
    from bloombee_nb.errors import StageLeavingError

    with bb.connect(n_workers=2) as c:
        model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=c, recover=False)

        def leave(dask_worker):
            from bloombee_nb.cluster.stage import begin_leaving

            begin_leaving(dask_worker)

        c.client.run(leave, workers=[model.placement.stages[-1].worker])
        with pytest.raises(StageLeavingError):
            model(padded_batch([5], seed=1)[0])
        assert open_sessions(c) == {}
        model.close()

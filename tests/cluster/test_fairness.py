"""A stage's fair share per client: one client's flood does not starve another (real StageActor,
real span, driven on an asyncio loop as its worker's event loop would)."""

from __future__ import annotations

import asyncio

import pytest

from bloombee_nb import transport
from bloombee_nb.cluster.fairness import FairShare
from bloombee_nb.cluster.stage import StageActor
from tests.conftest import padded_batch


def test_fair_share_orders_by_work_served_and_newcomers_bank_no_credit():
    fs = FairShare()
    jobs = [("a", 1), ("a", 2), ("b", 3)]
    assert fs.order(jobs, lambda j: j[0]) == jobs          # equals: arrival order
    fs.charge("a", 8)
    assert [j[0] for j in fs.order(jobs, lambda j: j[0])] == ["b", "a", "a"]
    fs.charge("b", 8)
    fs.charge("a", 8)   # a: 16, b: 8, now: 8
    assert fs.order([("c", 0), ("a", 1)], lambda j: j[0])[0] == ("c", 0)
    assert fs.vtime["c"] == fs.now                         # starts at the stage's virtual time, not 0


@pytest.mark.parametrize("merge", [False, True])
def test_a_flooding_client_does_not_starve_another(checkpoints, reference, merge):
    """Client A queues six 8-token prompts, then client B one: B's runs second, not seventh."""
    async def scenario():
        stage = StageActor(checkpoints["llama"], 0, 5, merge=merge, micro_batch=1)
        ids, mask = padded_batch([8], seed=3)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        frames = [transport.encode(t.contiguous()) for t in (reference["llama"].model.embed_tokens(ids).detach(),
                                                             pos, mask)]
        sessions = [(f"a{i}", "client-A") for i in range(6)] + [("b0", "client-B")]
        for sid, owner in sessions:
            await stage.open_session(sid, 1, 16, owner)
        done: list[str] = []

        async def step(sid, owner):
            await stage.forward(sid, *frames, owner=owner)
            done.append(sid)
        await asyncio.gather(*(step(sid, owner) for sid, owner in sessions))
        return done

    loop = asyncio.new_event_loop()  # not asyncio.run: it would leave this thread without a current loop
    try:
        done = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert done.index("b0") <= 1, done

"""The step protocol: typed values that survive Dask's wire format, and a stage that is sent garbage
on its step handler keeps serving (real cluster, real stages)."""

from __future__ import annotations

import pytest
import torch
from distributed.protocol import dumps, loads

import bloombee_nb as bb
from bloombee_nb import transport
from bloombee_nb.cluster.protocol import Delivery, Entry, StageRef, Step
from bloombee_nb.errors import FrameError, StageUnavailableError
from tests.conftest import padded_batch


def _wire(msg: dict) -> dict:
    """``msg`` as the receiving side reads it after Dask serialised it."""
    return loads(dumps(msg))


def test_steps_and_deliveries_round_trip_through_dasks_wire_format():
    hops = (StageRef("tcp://a:1", "k0", 0, 3), StageRef("tcp://b:2", "k1", 3, 6))
    entry = Entry("s", b"hidden", b"pos", b"mask", seq=4, tree=b"tree", keep=(7, b"keep"), computes=((0.5, 10),))
    step = Step(12, "client-1", "client-1/abc", hops, (entry, Entry("t", b"h", b"p", b"m")))
    back = Step.from_msg(_wire(step.to_msg()))
    assert back == step and back.here == hops[0] and back.onwards(back.entries).hops == hops[1:]
    assert step.nbytes() == len(b"hidden") + 3 + 4 + 4 + 4 + 8 + 3 and back.entries[1].seq is None

    error = FrameError("frame truncated: 3 bytes missing")
    delivery = Delivery(12, (entry.failing(error), entry.done_by(b"out", 0.25)))
    got = Delivery.from_msg(_wire(delivery.to_msg()))
    assert isinstance(got.entries[0].error, FrameError) and "truncated" in str(got.entries[0].error)
    assert got.entries[0].hidden is None and got.entries[0].seq == 4      # a failure still moves the order
    assert entry.failing(error, keep_order=False).seq is None             # a refusal does not
    assert got.entries[1].hidden == b"out" and got.entries[1].computes == ((0.5, 10), (0.25, 3))
    lost = Delivery.from_msg(_wire(Delivery(3, error=StageUnavailableError("gone", workers=("tcp://b:2",))).to_msg()))
    assert isinstance(lost.error, StageUnavailableError) and lost.error.workers == ("tcp://b:2",)


def test_garbage_on_the_step_handler_leaves_every_session_served(cluster, checkpoints, reference):
    """Malformed messages straight to a stage's worker (no client relay in between): the stage
    ignores them and the running session still finishes exactly."""
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster, spans=[(0, 2), (2, 5)])
    try:
        ids, mask = padded_batch([5], seed=4)
        want = reference["llama"].generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, pad_token_id=0)
        worker = model.placement.stages[1].worker
        frame = transport.encode(torch.zeros(1, 1, 7))

        async def garbage():
            rpc = cluster.client.rpc(worker)
            for step in ({"nonsense": 1}, {"id": "x", "owner": 1, "reply_to": None, "hops": [[1]], "entries": 5},
                         Step(1, "nobody", "nobody/0", (StageRef(worker, "no-such-stage", 2, 5),),
                              (Entry("s", frame, b"", b""),)).to_msg(),
                         Step(2, "nobody", "nobody/0", (model.chain.refs[1],),
                              (Entry("s", b"\x80\x04pickle?" + bytes(40), b"", b""),)).to_msg()):
                await rpc.bloombee_step(step=step, reply=False)

        with model.inference_session(max_length=32) as s:
            out = model.generate(ids, attention_mask=mask, session=s, do_sample=False, max_new_tokens=3, pad_token_id=0)
            cluster.client.sync(garbage)
            out = model.generate(out, attention_mask=torch.ones_like(out), session=s, do_sample=False, max_new_tokens=3,
                                 pad_token_id=0)
        assert torch.equal(out, want)
        assert all(i["sessions"] == 0 for i in model.chain.info())
    finally:
        model.close()


@pytest.mark.parametrize("relay", ["chain", "star"])
def test_both_relays_are_routes_of_one_protocol(cluster, checkpoints, reference, relay):
    """Star sends one hop per step and gets each stage's output back, chain the whole route: the
    traces say so, and both are exact."""
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster,
                                                           spans=[(0, 1), (1, 3), (3, 5)], relay=relay)
    try:
        ids, mask = padded_batch([6], seed=8)
        want = reference["llama"].generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=4, pad_token_id=0)
        with model.inference_session(max_length=16) as s:
            out = model.generate(ids, attention_mask=mask, session=s, do_sample=False, max_new_tokens=4, pad_token_id=0)
            trace = list(s.traces)[-1]
        assert torch.equal(out, want)
        assert len(trace.stage_compute_s) == 3
        assert len(trace.hop_wire_bytes) == (4 if relay == "chain" else 6)
        assert len(trace.stage_wall_s) == (1 if relay == "chain" else 3)
    finally:
        model.close()

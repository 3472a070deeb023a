"""Errors that cross the wire keep their type; a stage fed garbage keeps serving; lost workers are named."""

import pytest
import torch
from distributed import LocalCluster

import bloombee_nb as bb
from bloombee_nb import transport
from bloombee_nb.errors import (CheckpointNotFoundError, FrameError, NotEnoughWorkersError, SpanError,
                                StageUnavailableError, UnknownSessionError)
from tests.conftest import padded_batch
from tests.helpers import distributed


@pytest.fixture(scope="module")
def model(cluster, checkpoints):
    with distributed(checkpoints["llama"], cluster, spans=[(0, 2), (2, 5)]) as m:
        yield m


def test_garbage_frames_and_unknown_sessions_are_typed_and_harmless(model, reference):
    ids, mask = padded_batch([5], seed=9)
    want = reference["llama"].generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0)
    stage = model.chain.actors[1]
    with model.inference_session(max_length=32) as s:
        out = model.generate(ids, session=s, do_sample=False, max_new_tokens=3, pad_token_id=0)
        frame = transport.encode(torch.zeros(1, 1, 64))
        pos, m = transport.encode(torch.zeros(1, 1, dtype=torch.long)), transport.encode(torch.ones(1, 1))
        with pytest.raises(FrameError, match="truncated"):
            stage.forward(s.session_id, frame[:-3], pos, m, owner=model.chain.owner).result(timeout=30)
        with pytest.raises(FrameError, match="not a bloombee frame"):
            stage.forward(s.session_id, b"\x80\x04pickle?" + bytes(40), pos, m, owner=model.chain.owner).result(timeout=30)
        with pytest.raises(UnknownSessionError, match="not open"):
            stage.forward("someone-elses-session", frame, pos, m).result(timeout=30)
        # the session that was interrupted by garbage still finishes exactly
        out = model.generate(out, session=s, do_sample=False, max_new_tokens=3, pad_token_id=0)
    assert torch.equal(out, want)


def test_bad_requests_at_load_time(cluster, checkpoints, tmp_path):
    with pytest.raises(SpanError, match="layers"):
        bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster, spans=[(0, 3), (3, 9)])
    with pytest.raises(CheckpointNotFoundError, match="save_pretrained"):
        bb.DistributedModelForCausalLM.from_pretrained(tmp_path / "missing", cluster=cluster)
    with pytest.raises(NotEnoughWorkersError, match="4 spans need 4 workers"):
        bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster,
                                                       spans=[(0, 1), (1, 2), (2, 3), (3, 5)])


@pytest.mark.slow  # kills a worker process and waits out its timeout
def test_a_worker_that_dies_is_named_within_the_timeout(checkpoints):
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            bb.connect(lc.scheduler_address) as c:
        model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=c, call_timeout_s=10,
                                                               recover=False)  # recovery: tests/cluster/test_faults.py
        ids, _ = padded_batch([4])
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        victim = model.placement.stages[1].worker
        nanny = next(w for w in lc.workers.values() if w.worker_address == victim)
        nanny.process.process.kill()  # the worker process, not a mock
        with pytest.raises(StageUnavailableError, match=f"{victim} hosting layers 3–4"):
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

"""plan="auto" profiles, plans and places; replan() moves spans without losing open sessions."""

import dataclasses

import pytest
import torch

from bloombee_nb.plan import Plan, Workload
from tests.conftest import padded_batch
from tests.helpers import distributed


@pytest.fixture(scope="module")
def model(cluster, checkpoints):
    with distributed(checkpoints["mistral"], cluster, plan="auto") as m:
        yield m


def test_auto_plan_is_applied_and_exact(model, reference):
    assert isinstance(model.plan, Plan) and model.profile is not None
    assert model.placement.spans == model.plan.layer_spans
    assert [s.worker for s in model.placement.stages] == model.plan.workers
    ids, mask = padded_batch([3, 9, 6], seed=5)
    want = reference["mistral"].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_replan_moves_spans_and_open_sessions_finish_on_the_old_chain(model, reference):
    ids, _ = padded_batch([7], seed=8)
    want = reference["mistral"].generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    first_worker = model.placement.stages[0].worker
    with model.inference_session(max_length=32) as s:
        half = model.generate(ids, session=s, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # what-if: the first worker of the current chain is gone from the plan
        name = next(w.name for w in model.profile.workers if w.address == first_worker)
        edited = model.profile.with_worker(name, include=False)
        plan = model.replan(Workload(), profile=edited)
        assert first_worker not in plan.workers and first_worker not in [st.worker for st in model.placement.stages]
        assert dict(plan.reasons)[name].startswith("excluded")
        rest = model.generate(half, session=s, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(rest, want)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0), want)  # new chain


def test_a_plans_micro_batch_and_offload_fractions_reach_the_stages(model, reference):
    """Each stage takes its own offload fractions from the plan and the chain its micro-batch;
    generation stays exact."""
    plan = model.plan
    stages = list(plan.stages)
    stages[0] = dataclasses.replace(stages[0], weight_offload=0.5)
    stages[-1] = dataclasses.replace(stages[-1], kv_offload=0.5)
    edited = dataclasses.replace(plan, stages=tuple(stages), micro_batch=2, workload=Workload(batch=3))
    model.replan(plan=edited)
    assert model.micro_batch == 2
    info = model.chain.info()
    assert [i["weight_offload"] for i in info] == [s.weight_offload for s in stages]
    assert [i["kv_offload"] for i in info] == [s.kv_offload for s in stages]
    assert info[0]["offloaded_weight_bytes"] > 0 and all(i["micro_batch"] == 2 for i in info)
    ids, mask = padded_batch([5, 8, 3], seed=2)
    want = reference["mistral"].generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0), want)

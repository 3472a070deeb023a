"""Throughput knobs of the runtime: merged decode steps of different sessions, micro-batches,
chunked prompts, the order of a session's steps on a stage — each exact against transformers."""

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from bloombee_nb import transport
from bloombee_nb.cluster.batching import Job
from bloombee_nb.cluster.stage import StageActor
from bloombee_nb.errors import ShapeMismatchError
from bloombee_nb.model.merge import forward_many
from bloombee_nb.model.span import SpanRunner
from tests.conftest import FAMILIES, padded_batch
from tests.helpers import distributed

SPANS = [(0, 2), (2, 4), (4, 5)]


def _generate_all(model, jobs, new_tokens):
    def run(i):
        ids, m = jobs[i]
        return model.generate(ids, attention_mask=m, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, range(len(jobs))))


@pytest.mark.parametrize("family, offload", [(f, {}) for f in FAMILIES]  # BLOOM (ALiBi) runs its steps alone
                         + [("llama", dict(weight_offload=0.5, kv_offload=0.5))])
def test_merged_steps_of_different_sessions_equal_separate_steps(checkpoints, reference, family, offload):
    """Sessions of different lengths and batch sizes, one forward: the same outputs as one forward
    each (to float rounding), also with streamed weights and cold KV, and a bad step fails alone
    while the others run."""
    a, b = SpanRunner(checkpoints[family], 1, 4, **offload), SpanRunner(checkpoints[family], 1, 4, **offload)
    D = a.hidden_size
    gen = torch.Generator().manual_seed(0)
    shapes = {"x": (1, 5), "y": (2, 9), "z": (1, 3)}
    for r in (a, b):
        for sid, (B, L) in shapes.items():
            r.open(sid, B, 32)
            r.forward(sid, torch.randn(B, L, D, generator=torch.Generator().manual_seed(L)),
                      torch.arange(L).expand(B, L), torch.ones(B, L, dtype=torch.long))
    for step in range(3):
        steps = [(sid, torch.randn(B, 1, D, generator=gen), torch.full((B, 1), L + step), torch.ones(B, 1, dtype=torch.long))
                 for sid, (B, L) in shapes.items()]
        for got, want in zip(forward_many(a, steps), [b.forward(*s) for s in steps]):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert all(a.sessions[s].length == b.sessions[s].length == L + 3 for s, (_, L) in shapes.items())
    bad = forward_many(a, [("x", torch.randn(1, 1, D + 1), torch.full((1, 1), 8), torch.ones(1, 1, dtype=torch.long)),
                           ("z", torch.randn(1, 1, D), torch.full((1, 1), 6), torch.ones(1, 1, dtype=torch.long))])
    assert isinstance(bad[0], ShapeMismatchError) and isinstance(bad[1], torch.Tensor)
    assert a.sessions["x"].length == 8 and a.sessions["z"].length == 7


@pytest.mark.parametrize("group", [pytest.param(False, marks=pytest.mark.slow), True])  # False: 8 s
def test_concurrent_decode_steps_merge_on_the_stages_and_stay_exact(cluster, checkpoints, reference, group):
    """Latency mode (steps go at once, stages merge what arrives together) and throughput mode
    (the client's concurrent decode steps travel as groups)."""
    with distributed(checkpoints["llama"], cluster, spans=SPANS, group=group, micro_batch=4) as model:
        jobs = [padded_batch([n], seed=n) for n in (3, 9, 14, 5, 21, 7)]
        want = [reference["llama"].generate(ids, attention_mask=m, max_new_tokens=8, do_sample=False, pad_token_id=0)
                for ids, m in jobs]
        for g, w in zip(_generate_all(model, jobs, 8), want):
            assert torch.equal(g, w)
        info = model.chain.info()
        assert sum(i["forwards"] for i in info) < sum(i["steps"] for i in info), info  # some steps ran merged
        assert all(i["sessions"] == 0 and i["queued"] == 0 for i in info)


def test_a_lone_sessions_decode_steps_skip_the_queue_and_stay_exact(cluster, checkpoints, reference):
    """One user: each stage runs a decode step as it arrives and sends it on from the handler
    (issue 18's latency path); its prompt still queues. The output is transformers'."""
    ids, m = padded_batch([7], seed=2)
    want = reference["llama"].generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with distributed(checkpoints["llama"], cluster, spans=SPANS) as model:
        got = model.generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0)
        info = model.chain.info()
    assert torch.equal(got, want)
    assert [i["at_once"] for i in info] == [5] * len(SPANS), info  # 5 decode steps after the prompt
    assert [i["steps"] for i in info] == [6] * len(SPANS), info


@pytest.mark.parametrize("micro_batch", [1, 2, 3])
def test_micro_batches_give_the_same_tokens(cluster, checkpoints, reference, micro_batch):
    ids, m = padded_batch([4, 11, 7, 9, 2], seed=3)
    want = reference["qwen2"].generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with distributed(checkpoints["qwen2"], cluster, spans=SPANS, micro_batch=micro_batch) as model:
        with model.inference_session(max_length=32) as s:
            got = model.generate(ids, attention_mask=m, max_new_tokens=6, do_sample=False, pad_token_id=0, cache=s)
            parts = s.stages.ids
            assert len(parts) == -(-5 // micro_batch)
            per_stage = model.chain.info()
            assert all(i["sessions"] == len(parts) and i["micro_batch"] == micro_batch for i in per_stage)
        assert torch.equal(got, want)


def test_long_prompts_go_in_chunks_and_stay_exact(cluster, checkpoints, reference):
    ids, m = padded_batch([23, 17], seed=5)
    want = reference["mistral"].generate(ids, attention_mask=m, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with distributed(checkpoints["mistral"], cluster, spans=SPANS, prefill_chunk=4) as model:
        got = model.generate(ids, attention_mask=m, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want)
        steps = sum(i["steps"] for i in model.chain.info()) // len(SPANS)
        assert steps >= 6 + 4  # 23 positions in chunks of 4, then 4 decode steps


def test_star_relay_with_micro_batches_and_chunks_is_exact(cluster, checkpoints, reference):
    ids, m = padded_batch([9, 6, 12], seed=8)
    want = reference["llama"].generate(ids, attention_mask=m, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with distributed(checkpoints["llama"], cluster, spans=SPANS, relay="star", micro_batch=2, prefill_chunk=5) as model:
        assert torch.equal(model.generate(ids, attention_mask=m, max_new_tokens=4, do_sample=False, pad_token_id=0),
                           want)


# ---- the stage's queue, without a cluster ---------------------------------------------------------

def _run_here(coro):
    """Run ``coro`` on a private loop (``asyncio.run`` would unset the main thread's event loop,
    which Dask's process handles in later tests still look up)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def _stage(checkpoints, **kw) -> StageActor:
    return StageActor(checkpoints["llama"], 0, 2, **kw)


def _frames(B, T, D, start, seed=0):
    h = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed))
    return (transport.encode(h), transport.encode(torch.arange(start, start + T).expand(B, T).contiguous()),
            transport.encode(torch.ones(B, T, dtype=torch.long)))


def test_a_sessions_steps_run_in_seq_order_whatever_order_they_arrive_in(checkpoints):
    async def go():
        st, ref = _stage(checkpoints), SpanRunner(checkpoints["llama"], 0, 2)
        D = ref.hidden_size
        await st.open_session("s", 1, 32)
        ref.open("s", 1, 32)
        chunks = [_frames(1, 4, D, 4 * k, seed=k) for k in range(3)]
        tasks = [asyncio.ensure_future(st.forward("s", *chunks[k], seq=k)) for k in (2, 0, 1)]  # out of order
        outs = dict(zip((2, 0, 1), await asyncio.gather(*tasks)))
        for k in range(3):
            want = ref.forward("s", *(transport.decode(f) for f in chunks[k]))
            assert torch.equal(transport.decode(outs[k][0]), want)

        # a step that failed upstream arrives as a skip: the next one does not wait for it
        later = asyncio.ensure_future(st.forward("s", *_frames(1, 1, D, 12), seq=4))
        await asyncio.sleep(0.05)
        assert not later.done()
        await st.skip("s", 3)
        assert transport.decode((await asyncio.wait_for(later, 10))[0]).shape == (1, 1, D)

    _run_here(go())


def test_decode_steps_take_turns_with_a_long_prompt(checkpoints):
    """The queue policy: decode steps of other sessions run between a long prompt's chunks,
    merged into one forward of at most micro_batch rows."""
    st = _stage(checkpoints, micro_batch=3)
    job = lambda sid, rows, tokens, seq=None: Job(sid, (), None, None, seq, rows, tokens)  # noqa: E731
    st.queue.jobs = [job("long", 1, 64, 0), job("long", 1, 64, 1), job("a", 1, 1), job("b", 2, 1), job("c", 1, 1)]
    st.queue.next_seq = {"long": 0}
    order = []
    while batch := st.queue.next_batch():
        order.append([j.session_id for j in batch])
        for j in batch:
            if j.seq is not None:
                st.queue.next_seq[j.session_id] = j.seq + 1
    assert order == [["long"], ["a", "b"], ["long"], ["c"]]

    st.set_batching(None, merge=False)  # Petals-style: one step at a time, in arrival order
    st.queue.jobs, st.queue.next_seq = [job("long", 1, 64), job("a", 1, 1), job("b", 2, 1)], {}
    assert [[j.session_id for j in b] for b in iter(st.queue.next_batch, [])] == [["long"], ["a"], ["b"]]


def test_a_group_of_steps_fails_only_where_a_step_is_bad(cluster, checkpoints):
    """Decode steps of several sessions travel as one group: an entry for a session the stages do
    not know fails alone (typed), the other entry's output is the same as when sent alone."""
    from bloombee_nb.errors import UnknownSessionError

    with distributed(checkpoints["llama"], cluster, spans=SPANS) as model:
        chain = model.chain
        chain.open_session("a", 1, 8)
        b = chain.open_session("b", 1, 8)
        h = model.embed_tokens(torch.tensor([[5]]))
        pos, mask = transport.encode(torch.zeros(1, 1, dtype=torch.long)), transport.encode(torch.ones(1, 1, dtype=torch.long))
        entries = [["a", transport.encode(h), pos, mask, 0, ()], ["nobody", transport.encode(h), pos, mask, 0, ()]]
        good, bad = cluster.client.sync(chain._relay_group, entries)
        assert isinstance(bad, UnknownSessionError)
        alone, _ = chain.forward(b, h, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long))
        assert torch.equal(transport.decode(good[0]), alone)
        assert len(good[2]) == len(SPANS)  # a compute time from every stage


@pytest.mark.parametrize("relay", ["chain", "star"])
def test_a_step_that_fails_on_the_first_stage_does_not_stall_the_next(cluster, checkpoints, reference, relay):
    """A bad step fails at the first stage, so the later stages never see its ``seq``; the next
    step of the same session must run at once (not wait for the missing one until a timeout)."""
    from bloombee_nb.errors import ShapeMismatchError

    with distributed(checkpoints["llama"], cluster, spans=SPANS, relay=relay, call_timeout_s=20) as model:
        chain = model.chain
        s = chain.open_session("s", 1, 8)
        h = model.embed_tokens(torch.tensor([[5]]))
        pos, ones = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)
        with pytest.raises(ShapeMismatchError):
            chain.forward(s, torch.zeros(1, 1, h.shape[-1] + 1), pos, ones)
        out, _ = chain.forward(s, h, pos, ones)  # a stall would end in the 20 s call timeout's error instead
        t = chain.open_session("t", 1, 8)
        assert torch.equal(out, chain.forward(t, h, pos, ones)[0])  # and it ran the step a fresh session runs

"""Chain forwarding (stage -> stage) and the Petals-style star give the same tokens; errors keep their type."""

import pytest
import torch

import bloombee_nb as bb
from bloombee_nb.errors import UnknownSessionError
from bloombee_nb.transport import Codec, CodecPolicy
from tests.conftest import padded_batch

SPANS = [(0, 1), (1, 4), (4, 5)]


@pytest.fixture(scope="module")
def models(cluster, checkpoints):
    ms = {r: bb.DistributedModelForCausalLM.from_pretrained(checkpoints["qwen3"], cluster=cluster, spans=SPANS, relay=r)
          for r in ("chain", "star")}
    yield ms
    for m in ms.values():
        m.close()


def test_chain_and_star_are_exact_and_chain_skips_the_client(models, reference):
    ids, mask = padded_batch([5, 2, 8], seed=21)
    want = reference["qwen3"].generate(ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    traces = {}
    for relay, model in models.items():
        with model.inference_session(max_length=32) as s:
            got = model.generate(ids, attention_mask=mask, session=s, max_new_tokens=7, do_sample=False, pad_token_id=0)
            traces[relay] = list(s.traces)
        assert torch.equal(got, want), relay
    chain, star = traces["chain"][-1], traces["star"][-1]
    assert chain.relay == "chain" and len(chain.stage_wall_s) == 1 and len(chain.stage_compute_s) == 3
    assert len(star.stage_wall_s) == 3
    # the client sends the hidden states once (not once per stage) and receives only the final output
    assert 3 * chain.bytes_sent == star.bytes_sent and chain.bytes_received == star.bytes_received


def test_an_error_in_the_middle_of_the_chain_reaches_the_client_typed(models):
    model = models["chain"]
    ids, _ = padded_batch([4])
    with model.inference_session(max_length=16) as s:
        model(ids, cache=s)
        model.chain.actors[1].close_session(s.session_id, model.chain.owner).result(timeout=30)  # the middle stage forgets it
        with pytest.raises(UnknownSessionError, match=r"layers \[1, 4\)"):
            model(ids[:, :1], cache=s)


@pytest.mark.parametrize("family, relay", [("llama", "chain"), ("llama", "star"),
                                           ("gemma2", "chain"), ("granite", "chain"), ("bloom", "chain")])
def test_compressed_links_are_lossless(cluster, checkpoints, reference, family, relay):
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints[family], cluster=cluster, spans=[(0, 2), (2, 5)],
                                                           relay=relay, compression="zstd-1+shuffle")
    every = CodecPolicy.fixed(Codec.parse("zstd-1+shuffle"))  # decode-sized frames too
    model.chain.set_policies([every] * 2, [every] * 2)
    ids, mask = padded_batch([30, 12], seed=4)
    want = reference[family].generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with model.inference_session(max_length=64) as s:
        got = model.generate(ids, attention_mask=mask, session=s, max_new_tokens=6, do_sample=False, pad_token_id=0)
        prefill = s.traces[0]
    model.close()
    assert torch.equal(got, want)
    assert prefill.bytes_received < prefill.hidden_bytes  # the last stage's output arrived compressed
    assert prefill.wire_bytes < prefill.raw_bytes and len(prefill.hop_wire_bytes) == (3 if relay == "chain" else 4)


def _late_attach(dask_worker, delay_s):
    """This worker registers delivery streams ``delay_s`` late (as after a slow handshake); 0 undoes it."""
    import asyncio

    from bloombee_nb.cluster.wire import StageWire

    wire = StageWire.of(dask_worker)

    async def late(comm, reply_to):
        await asyncio.sleep(delay_s)
        return await wire.on_attach(comm, reply_to)

    dask_worker.handlers["bloombee_attach"] = late if delay_s else wire.on_attach


@pytest.mark.parametrize("relay", ["chain", "star"])
def test_no_step_is_sent_before_the_worker_knows_where_to_deliver_it(cluster, checkpoints, reference, relay):
    """A client's delivery stream opens on a new connection, its steps go on pooled ones: a step
    that finishes before the worker registered the stream would be dropped and the call would wait
    for its timeout. The client waits for the worker's "attached" first."""
    ids, mask = padded_batch([1], seed=4)  # a one-token prompt: its first step runs as it arrives
    want = reference["llama"].generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints["llama"], cluster=cluster, spans=SPANS,
                                                           relay=relay, call_timeout_s=3, recover=False)
    cluster.client.run(_late_attach, delay_s=0.5)
    try:  # a dropped delivery would raise StageHungError after 3 s (no recovery to hide it)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        cluster.client.run(_late_attach, delay_s=0)
        model.close()
    assert torch.equal(got, want)

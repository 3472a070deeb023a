"""Offloading, compression, recovery and speculation stay exact on every decoder family.

``test_exactness.py`` checks plain greedy and prefill logits per family; the runtime's other paths
are checked here per family, against single-process transformers, token for token:

- one run per family with weights and KV offloaded on every stage, every frame compressed, and the
  worker of the middle stage SIGKILLed after 3 streamed tokens: the session replays its history on
  a spare (offloaded and compressed there too) and the output is still transformers' (a real Dask
  ``LocalCluster`` of 4 worker processes, its own: the nanny restarts the killed one for the next
  family);
- speculative greedy (token trees verified by the 3-stage chain) for the families
  ``test_exactness.py`` does not already cover.

Merged steps of different sessions are checked per family in ``tests/cluster/test_batching.py``,
offload bit-for-bit per family at the span level in ``tests/model/test_offload.py``. A fast subset
(one family per distinct path: ALiBi, per-layer-type rotary with sliding windows, mixture of
experts) runs by default; the sweep over the rest is marked ``slow`` (``pytest -m slow``).
"""

import os
import signal

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import bloombee_nb as bb
from bloombee_nb.transport import Codec, CodecPolicy
from tests.conftest import FAMILIES, padded_batch

SPANS = [(0, 2), (2, 4), (4, 5)]
NEW_TOKENS, FAULT_AT = 8, 3
FAST = ("bloom", "gemma3_text", "mixtral")
#: their experts are stored per expert and fused on load: weights cannot stream (KV still offloads)
CONVERTED = ("mixtral", "qwen3_moe")
#: test_exactness.py's speculative test covers these; BLOOM (ALiBi) refuses token trees, and
#: windows of 8 positions are outgrown by the trees of Mistral-sliding, Gemma 2 and Gemma 3
SPECULATED_ELSEWHERE = ("gemma", "granite", "cohere", "mixtral", "gpt_neox", "falcon")
NO_TREES = ("bloom", "mistral_sliding", "gemma2", "gemma3_text")


def sweep(families, fast=FAST):
    """``families`` as parameters, all but ``fast`` marked slow."""
    return [pytest.param(f, marks=() if f in fast else pytest.mark.slow) for f in families]


class FaultAt(BaseStreamer):
    """Calls ``fault()`` once ``at`` new tokens have streamed."""

    def __init__(self, at: int, fault):
        self.at, self.fault, self.seen, self.prompt_seen = at, fault, 0, False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.seen += 1
        if self.seen == self.at:
            self.fault()

    def end(self):
        pass


@pytest.fixture(scope="module")
def own_cluster():
    """4 worker processes (3 stages and a spare), apart from the session's shared cluster: workers
    are killed here."""
    with bb.connect(n_workers=4) as c:
        yield c


def kill_worker(cluster, address: str) -> None:
    """SIGKILL the worker process at ``address`` (a real loss: its connections drop, its stages go)."""
    pid = cluster.client.run(os.getpid, workers=[address])[address]
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("family", sweep(FAMILIES))
def test_offloaded_compressed_chain_recovers_from_a_killed_stage_exactly(own_cluster, checkpoints, reference, family):
    own_cluster.wait_for_workers(4, 120)  # the worker killed for the previous family is back
    weights = 0.0 if family in CONVERTED else 0.5
    model = bb.DistributedModelForCausalLM.from_pretrained(
        checkpoints[family], cluster=own_cluster, workers=own_cluster.worker_addresses()[:3], spans=SPANS,
        weight_offload=weights, kv_offload=0.5, compression="zstd-1+shuffle")
    try:
        every = CodecPolicy.fixed(Codec.parse("zstd-1+shuffle"))  # decode-sized frames too
        model.chain.set_policies([every] * 3, [every] * 3)
        info = model.chain.info()
        assert all(i["kv_offload"] == 0.5 and i["weight_offload"] == weights for i in info), info
        victim = model.placement.stages[1].worker
        ids, mask = padded_batch([4, 9], seed=7)
        want = reference[family].generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                          pad_token_id=0)
        with model.inference_session(max_length=32) as s:
            got = model.generate(ids, attention_mask=mask, session=s, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=0, streamer=FaultAt(FAULT_AT, lambda: kill_worker(own_cluster, victim)))
            prefill = s.traces[0]
        assert torch.equal(got, want), (family, got.tolist(), want.tolist())
        (event,) = model.events
        assert [w.address for w in event.lost] == [victim] and event.replayed_steps == FAULT_AT
        assert victim not in model.placement.workers
        assert prefill.wire_bytes < prefill.raw_bytes  # the frames really went compressed
    finally:
        model.close()


@pytest.mark.parametrize("family", sweep([f for f in FAMILIES if f not in SPECULATED_ELSEWHERE + NO_TREES], ()))
def test_speculative_greedy_equals_transformers(cluster, checkpoints, reference, family):
    """A wrong draft (another family's) and a perfect one (the family's own reference)."""
    model = bb.DistributedModelForCausalLM.from_pretrained(checkpoints[family], cluster=cluster, spans=SPANS)
    try:
        ids, mask = padded_batch([4, 11, 7], seed=5)
        want = reference[family].generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for draft in (reference["llama" if family != "llama" else "qwen2"], reference[family]):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                 assistant_model=draft, tree_widths=(2, 2, 1))
            assert torch.equal(got, want), (family, got.tolist(), want.tolist())
    finally:
        model.close()

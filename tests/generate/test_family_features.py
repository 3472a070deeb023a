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


@pytest.mark.parametrize("family", sweep(FAMILIES, fast=()))  # a fault test (11 s a family): not in the quick loop
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


# ---- bf16 on a GPU (skipped without one) ----------------------------------------------------------

def _bf16_client(path):
    """(embed, norm, head) on the GPU in bf16, with the family's client math, as the client applies them."""
    from pathlib import Path

    from bloombee_nb.model.family import client_math, load_client_parts, load_config

    config = load_config(Path(path))
    _, embed, norm, head, _ = load_client_parts(Path(path), config, dtype=torch.bfloat16)
    embed, norm, head, math = embed.cuda(), norm.cuda(), head.cuda(), client_math(config)
    return (lambda ids: math.inputs(embed(ids))), norm, (lambda h: math.logits(head(h)))


def _greedy(spans, embed, norm, head, ids, mask, n):
    """The client's greedy loop over SpanRunners: (prefill hidden [B, L, D], new tokens [B, n])."""
    B = ids.shape[0]
    for s in spans:
        s.open("g", B, ids.shape[1] + n)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    h = embed(ids)
    for s in spans:
        h = s.forward("g", h, pos, mask)
    first, toks = h, []
    for i in range(n):
        toks.append(head(norm(h[:, -1:])).argmax(-1))
        if i + 1 < n:
            pos, h = pos[:, -1:] + 1, embed(toks[-1])
            for s in spans:
                h = s.forward("g", h, pos, torch.ones(B, 1, dtype=torch.long, device=ids.device))
    for s in spans:
        s.close("g")
    return first, torch.cat(toks, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_on_the_gpu_equals_transformers_on_the_gpu(checkpoints, family):
    """bf16 on the GPU, two spans (the second with half its weights streamed, where the family's
    layout allows): greedy tokens equal transformers' bf16 on the same GPU; prefill hidden states
    within bf16 rounding."""
    from transformers import AutoModelForCausalLM

    from bloombee_nb.model.span import SpanRunner

    ref = AutoModelForCausalLM.from_pretrained(checkpoints[family], dtype=torch.bfloat16).cuda().eval()
    spans = [SpanRunner(checkpoints[family], 0, 3, dtype=torch.bfloat16, device="cuda"),
             SpanRunner(checkpoints[family], 3, 5, dtype=torch.bfloat16, device="cuda",
                        weight_offload=0.0 if family in CONVERTED else 0.5)]
    ids, mask = (t.cuda() for t in padded_batch([4, 11, 7], seed=5))
    with torch.inference_mode():
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        want_h = ref.base_model(ids, attention_mask=mask, position_ids=pos).last_hidden_state  # after the final norm
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        parts = _bf16_client(checkpoints[family])
        h, toks = _greedy(spans, *parts, ids, mask, 8)
        assert h.is_cuda and h.dtype == torch.bfloat16
        real = mask.bool()
        torch.testing.assert_close(parts[1](h)[real], want_h[real], rtol=2e-2, atol=2e-2)
    want = want[:, ids.shape[1]:]
    eos = (want == 2).long()  # transformers pads a row once it produced EOS (id 2); this loop does not stop
    after = (eos.cumsum(1) - eos) > 0
    assert torch.equal(toks.masked_fill(after, 0), want), (family, toks.tolist(), want.tolist())
    for s in spans:
        s.release()

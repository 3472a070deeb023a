"""Speculative decoding across a real chain: exact greedy, distribution-preserving sampling, KV kept
exactly on the accepted path, batches, streamers, HF's ``assistant_model`` convention, typed errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from bloombee_nb.errors import DraftModelError, SessionLengthError, TreeError
from bloombee_nb.generate.speculative import (SpeculationSummary, accept_greedy, accept_sampled, children_of,
                                              load_draft)
from bloombee_nb._kernels import branching_parents
from bloombee_nb.shipped import DRAFT_PATH, default_model_path
from tests.helpers import distributed

PROMPTS = ["def fibonacci(n):", "import os\nclass", "    return self."]


@pytest.fixture(scope="module")
def shipped():
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    return tok, AutoModelForCausalLM.from_pretrained(path).eval(), load_draft(str(DRAFT_PATH))


@pytest.fixture(scope="module")
def model(cluster):
    with distributed(default_model_path(), cluster) as m:
        yield m


def greedy(model, ids, **kw):
    return model.generate(**ids, do_sample=False, pad_token_id=1, **kw)


@pytest.mark.parametrize("widths", [(2, 2, 1), pytest.param((1, 1, 1, 1), marks=pytest.mark.slow),  # a chain
                                    pytest.param((4,), marks=pytest.mark.slow), "auto"])          # one level
def test_greedy_is_plain_greedy_token_for_token(model, shipped, widths):
    tok, ref, draft = shipped
    for prompts in (PROMPTS[:1], PROMPTS):          # one row, and a left-padded batch of 3
        ids = tok(prompts, return_tensors="pt", padding=True)
        want = greedy(ref, ids, max_new_tokens=24)
        with model.inference_session(max_length=256) as s:
            got = greedy(model, ids, max_new_tokens=24, assistant_model=draft, tree_widths=widths, session=s)
            summary = SpeculationSummary.of(s.rounds)
        assert torch.equal(got, want), (widths, prompts)
        if widths != "auto":  # fixed trees: the shipped draft does pay
            assert summary.tokens_per_traversal > 1.2 and summary.rounds < 24
        else:  # "auto" speculates only where its measured times say it pays: on a busy machine seldom (CI: 6 of 23 rounds)
            assert summary.rounds <= 24 and (summary.speculative_rounds == 0 or summary.acceptance_rate > 0)


def test_a_bad_draft_changes_nothing_but_speed(model, shipped):
    tok, ref, _ = shipped
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    noise = LlamaForCausalLM(cfg).eval()               # random init: proposes nonsense
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    want = greedy(ref, ids, max_new_tokens=24)
    for widths in [(3, 2, 2), "auto"]:
        with model.inference_session(max_length=256) as s:
            got = greedy(model, ids, max_new_tokens=24, assistant_model=noise, tree_widths=widths, session=s)
            summary = SpeculationSummary.of(s.rounds)
        assert torch.equal(got, want)
        assert summary.acceptance_rate < 0.1
    # "auto" measured that nothing is accepted and switched speculation off (probing now and then)
    assert summary.speculative_rounds < summary.rounds / 2 and s.rounds[-2].widths == ()


def test_stages_keep_exactly_the_accepted_path(model, shipped):
    """After a speculative turn the session holds the output's KV and nothing else: a second, plain
    turn on the same session equals transformers continuing its own cache."""
    tok, ref, draft = shipped
    ids = tok(PROMPTS[:1], return_tensors="pt")["input_ids"]
    follow = tok(" x = 1\n", return_tensors="pt")["input_ids"][:, 1:]  # no <s>
    with model.inference_session(max_length=256) as s:
        out1 = model.generate(ids, session=s, assistant_model=draft, tree_widths=(3, 2, 1), max_new_tokens=17,
                              do_sample=False, pad_token_id=1)
        assert s.get_seq_length() == out1.shape[1] - 1
        out2 = model.generate(torch.cat([out1, follow], 1), session=s, max_new_tokens=9, do_sample=False,
                              pad_token_id=1)
        out3 = model.generate(torch.cat([out2, follow], 1), session=s, assistant_model=draft, max_new_tokens=9,
                              do_sample=False, pad_token_id=1)
    cache = DynamicCache(config=ref.config)
    r1 = ref.generate(ids, cache=cache, max_new_tokens=17, do_sample=False, pad_token_id=1)
    r2 = ref.generate(torch.cat([r1, follow], 1), cache=cache, max_new_tokens=9, do_sample=False, pad_token_id=1)
    r3 = ref.generate(torch.cat([r2, follow], 1), cache=cache, max_new_tokens=9, do_sample=False, pad_token_id=1)
    assert torch.equal(out1, r1) and torch.equal(out2, r2) and torch.equal(out3, r3)


def test_a_batched_session_is_not_reused_by_mistake(model, shipped):
    tok, _, draft = shipped
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    with model.inference_session(max_length=256) as s:
        out = greedy(model, ids, max_new_tokens=8, assistant_model=draft, session=s)
        with pytest.raises(SessionLengthError, match="open a new session"):
            greedy(model, {"input_ids": out}, max_new_tokens=2, session=s)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_accepted_tokens_in_order(model, shipped):
    tok, _, draft = shipped
    for prompts in (PROMPTS[:1], PROMPTS):
        ids = tok(prompts, return_tensors="pt", padding=True)
        s = Collect()
        out = greedy(model, ids, max_new_tokens=20, assistant_model=draft, tree_widths=(2, 2, 1), streamer=s)
        assert s.ended and torch.equal(s.chunks[0], ids["input_ids"])
        steps = [c.reshape(len(prompts), -1) for c in s.chunks[1:]]
        assert torch.equal(torch.cat([ids["input_ids"], *steps], 1), out)
        assert any(c.shape[1] > 1 for c in steps)         # several tokens arrived per traversal


def test_eos_and_max_length_stop_like_plain_generate(model, shipped):
    tok, ref, draft = shipped
    ids = tok(PROMPTS, return_tensors="pt", padding=True)
    free = greedy(ref, ids, max_new_tokens=20)
    eos = int(free[0, ids["input_ids"].shape[1] + 5])     # a token row 0 emits as its 6th
    want = greedy(ref, ids, max_new_tokens=20, eos_token_id=eos)
    got = greedy(model, ids, max_new_tokens=20, eos_token_id=eos, assistant_model=draft, tree_widths=(3, 3, 2))
    assert torch.equal(got, want) and got.shape[1] <= free.shape[1]


def test_star_relay_and_return_dict(cluster, shipped):
    tok, ref, draft = shipped
    with distributed(default_model_path(), cluster, relay="star", spans=[(0, 2), (2, 6)]) as star:
        ids = tok(PROMPTS, return_tensors="pt", padding=True)
        out = greedy(star, ids, max_new_tokens=12, assistant_model=draft, tree_widths=(2, 2),
                     return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(ref, ids, max_new_tokens=12))


def test_wrong_drafts_and_options_raise_typed_errors(model, shipped, checkpoints):
    tok, _, draft = shipped
    ids = tok(PROMPTS[:1], return_tensors="pt")
    other_vocab = AutoModelForCausalLM.from_pretrained(checkpoints["llama"])   # 128 tokens
    with pytest.raises(DraftModelError, match=r"vocabulary \(128 tokens\) differs from the target's \(4096\)"):
        model.generate(**ids, assistant_model=other_vocab, max_new_tokens=3)
    with pytest.raises(DraftModelError, match="must be a causal LM"):
        model.generate(**ids, assistant_model="tiny-llama-draft", max_new_tokens=3)
    with pytest.raises(ValueError, match="pass assistant_model"):
        model.generate(**ids, tree_widths=(2, 1), max_new_tokens=3)
    with pytest.raises(ValueError, match="positive ints"):
        model.generate(**ids, assistant_model=draft, tree_widths=(2, 0), max_new_tokens=3)
    with pytest.raises(ValueError, match="not beam search"):
        model.generate(**ids, assistant_model=draft, num_beams=2, max_new_tokens=3)


def test_session_tree_bookkeeping(model):
    """keep_path rides on the next step; flush() sends it alone; misuse is a TreeError."""
    ids = torch.tensor([[0, 5, 6, 7]])
    parents = branching_parents((2, 1))
    with model.inference_session(max_length=32) as s:
        model(ids, cache=s)
        h = model.embed_tokens(torch.tensor([[8, 9, 10, 11, 12]]))
        pos = (4 + torch.tensor([0, 1, 1, 2, 2]))[None]
        s.step(h, pos, torch.ones(1, 5, dtype=torch.long), parents)
        with pytest.raises(TreeError, match="keep_path"):
            s.step(h[:, :1], pos[:, :1], torch.ones(1, 1, dtype=torch.long))
        with pytest.raises(TreeError, match="started at position 3"):
            s.keep_path(3, torch.tensor([[0, 1]]))
        s.keep_path(4, torch.tensor([[0, 2, 4]]))
        assert s.get_seq_length() == 7 and s._keep is not None
        s.flush()                                            # every stage compacts now
        assert s._keep is None
        with pytest.raises(TreeError):                       # the stages agree: the path was kept
            model.chain.keep_path(s.stages, 4, [0, 2, 4])
        model(torch.tensor([[13]]), cache=s)                 # and the session goes on
        assert s.get_seq_length() == 8


# ---- acceptance maths, on explicit distributions ------------------------------------------------
def chi_square_p(observed: torch.Tensor, expected_p: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test; cells expecting < 5 are pooled."""
    n = observed.sum()
    expected = expected_p * n
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]) if small.any() else observed
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def test_accept_greedy_walks_the_argmax():
    parents = branching_parents((2, 1))       # 0 -> (1, 2); 1 -> 3; 2 -> 4
    kids = children_of(parents)
    tokens = [9, 5, 7, 3, 4]
    v = accept_greedy([7, 0, 4, 0, 6], tokens, kids)   # argmax 7 = node 2; after node 2 argmax 4 = node 4
    assert v.path == (0, 2, 4) and v.token == 6 and v.tries == (2, 1) and v.accepted == 2
    v = accept_greedy([8, 0, 0, 0, 0], tokens, kids)
    assert v.path == (0,) and v.token == 8 and v.tries == (2,)


@pytest.mark.slow  # a statistical sweep (5 s)
def test_multi_candidate_sampling_keeps_the_target_distribution():
    """A two-token 'language' over 5 tokens: target P0(x1)·P1(x2 | x1), a quite different draft
    Q0, Q1. Children are drawn i.i.d. from the draft, tried in order with residuals (3 candidates at
    the root, 2 below each): the first two tokens out of the tree follow the target's joint."""
    g = torch.Generator().manual_seed(0)
    V, N = 5, 20000
    logits0, logits1 = torch.randn(V, generator=g) * 2, torch.randn(V, V, generator=g) * 2
    P0, P1 = logits0.softmax(-1).double(), logits1.softmax(-1).double()
    Q0 = (logits0 + torch.randn(V, generator=g)).softmax(-1).double()         # a draft that is often right
    Q1 = (logits1 + torch.randn(V, V, generator=g)).softmax(-1).double()
    parents = branching_parents((3, 2))
    kids = children_of(parents)
    counts, accepted = torch.zeros(V, V, dtype=torch.float64), 0
    for _ in range(N):
        tokens = [0] * parents.numel()
        for c in kids[0]:
            tokens[c] = int(torch.multinomial(Q0, 1, generator=g))
        for n in kids[0]:
            for c in kids[n]:
                tokens[c] = int(torch.multinomial(Q1[tokens[n]], 1, generator=g))
        p = torch.stack([P0, *(P1[tokens[n]] for n in range(1, parents.numel()))])  # depth 2: any p will do
        q = torch.stack([Q0, *(Q1[tokens[n]] for n in kids[0])])                    # nodes with children
        v = accept_sampled(p, q, tokens, kids, generator=g)
        seq = [tokens[n] for n in v.path[1:]] + [v.token]
        if len(seq) < 2:   # stopped at the root: the next round samples x2 from the target
            seq.append(int(torch.multinomial(P1[seq[0]], 1, generator=g)))
        counts[seq[0], seq[1]] += 1
        accepted += v.accepted
    assert accepted > N * 0.5                  # acceptance really happens, not only residual sampling
    target = P0[:, None] * P1                   # [x1, x2]
    assert chi_square_p(counts.flatten(), target.flatten()) > 1e-3
    # the test has power: the draft's own joint is rejected outright
    assert chi_square_p(counts.flatten(), (Q0[:, None] * Q1).flatten()) < 1e-12


# ---- sampling through the real chain: the output distribution is the target's ------------------
def tiny_vocab_checkpoint(path, seed: int, layers: int):
    """An 8-token Llama with peaked, context-dependent next-token distributions."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    return str(path)


def test_speculative_sampling_through_the_chain_matches_the_target(cluster, tmp_path):
    """3000 rows of one prompt, a (2, 2) tree from a draft that is the target with noisy weights: the
    joint of the first two new tokens is the target's p(x1)·p(x2 | x1), what plain sampling draws from."""
    target_path = tiny_vocab_checkpoint(tmp_path / "target", seed=1, layers=3)
    ref = AutoModelForCausalLM.from_pretrained(target_path).eval()
    draft = AutoModelForCausalLM.from_pretrained(target_path).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn(w.shape, generator=g) * 0.05)
    prompt = torch.tensor([[1, 3, 5, 2]])  # no 0: generate() masks the pad token out of prompts
    nxt = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], 1)
    with torch.no_grad():
        joint = lambda m: (m(prompt).logits[0, -1].double().softmax(-1)[:, None]  # noqa: E731
                           * m(nxt).logits[:, -1].double().softmax(-1)).flatten()   # [x1 * 8 + x2]
        want, drafts = joint(ref), joint(draft)
    N = 3000
    torch.manual_seed(0)
    with (distributed(target_path, cluster, spans=[(0, 1), (1, 3)]) as model,
          model.inference_session(max_length=24) as s):
        out = model.generate(prompt.expand(N, -1), session=s, assistant_model=draft, tree_widths=(2, 2),
                             do_sample=True, top_k=0, max_new_tokens=3)
        summary = SpeculationSummary.of(s.rounds)
    counts = torch.bincount(out[:, 4] * 8 + out[:, 5], minlength=64).double()
    assert s.rounds[0].widths == (2, 2) and 0.2 < summary.acceptance_rate < 0.9   # accepted and rejected
    assert chi_square_p(counts, want) > 1e-3
    assert chi_square_p(counts, drafts) < 1e-6        # the test tells the draft's own joint apart

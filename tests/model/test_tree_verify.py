"""Token trees through split spans: every root-to-leaf path equals running that path linearly, and
after keep_path the session continues exactly as if only the accepted path had ever been run.

Exactness: a chain tree is bit-exact against the same tokens run as a linear step. A branching
tree is equal within ~1e-7 (fp32), not bit-exact: the CPU GEMM gives a row slightly different bits
depending on how many rows are in the call (checked: ``Linear`` on 4 vs 5 rows differs in the last
bit, 4 vs 8 does not), and a tree step has more rows than the path it is compared with.
"""

import asyncio
import json

import pytest
import torch

from bloombee_nb._kernels import branching_parents, leaves, path, tree_position_ids
from bloombee_nb.cluster.stage import StageActor
from bloombee_nb.errors import SessionLengthError, ShapeMismatchError, TreeError, UnknownSessionError
from bloombee_nb.model.span import SpanRunner, _and_tree
from tests.conftest import FAMILIES, VOCAB, make_checkpoint, padded_batch
from tests.helpers import positions

TIGHT = dict(rtol=1e-6, atol=1e-6)


def tight(family: str) -> dict:
    """OLMo 2 normalises q and k over all heads at once, and a mixture of experts gathers the rows
    routed to each expert: a tree's 11 rows and a path's 4 take other BLAS blockings there (observed
    up to 3.2e-6 and 1.04e-6 apart); the tokens are checked by test_exactness."""
    return dict(rtol=1e-5, atol=1e-5) if family in ("olmo2", "mixtral", "qwen3_moe") else TIGHT


def run(spans, sid, h, pos, mask, tree=None):
    for s in spans:
        h = s.forward(sid, h, pos, mask, tree)
    return h


def ones(B, T):
    return torch.ones(B, T, dtype=torch.long)


def tokens(B, T, seed=1):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


class Chain:
    """Two spans of one checkpoint and its embeddings: a prompt, then trees or linear steps."""

    def __init__(self, path, embed):
        self.spans, self.embed = [SpanRunner(path, 0, 2), SpanRunner(path, 2, 5)], embed

    def open(self, sid, ids, mask, max_length=64):
        for s in self.spans:
            s.open(sid, ids.shape[0], max_length)
        return run(self.spans, sid, self.embed(ids), positions(mask), mask)

    def step(self, sid, toks, pos, tree=None):
        return run(self.spans, sid, self.embed(toks), pos, ones(*toks.shape), tree)

    def keep_path(self, sid, past_len, keep):
        for s in self.spans:
            s.keep_path(sid, past_len, keep)

    def close(self, sid):
        for s in self.spans:
            s.close(sid)


@pytest.fixture
def chain(checkpoints, reference):
    """family -> a fresh Chain (a failing test leaves no session open for the next one)."""
    return lambda family: Chain(checkpoints[family], reference[family].get_input_embeddings())


#: every family but those whose 8-position windows the test's tree outgrows (trees are refused past the
#: window: test_sliding_window_layers_inside_the_window) and BLOOM (ALiBi refuses trees: below)
TREE_FAMILIES = [f for f in FAMILIES if f not in ("mistral_sliding", "gemma2", "gemma3_text", "bloom")]


@pytest.mark.parametrize("family", TREE_FAMILIES)
@torch.inference_mode()
def test_tree_paths_equal_linear_runs_and_keep_path_continues_them(chain, family):
    c = chain(family)
    ids, mask = padded_batch([6, 3])  # left-padded: rows have their own positions
    B, past, used = 2, ids.shape[1], mask.sum(1)  # used = positions each row has taken
    parents = branching_parents((2, 2, 1))  # 1 root + 2 + 4 + 4 nodes
    toks = tokens(B, parents.numel())
    c.open("tree", ids, mask)
    out = c.step("tree", toks, tree_position_ids(parents, used), parents)  # [B, 11, D]
    for leaf in leaves(parents).tolist():
        p = path(parents, leaf)
        c.open("linear", ids, mask)
        want = c.step("linear", toks[:, p], tree_position_ids(torch.arange(-1, len(p) - 1), used))
        torch.testing.assert_close(out[:, p], want, **tight(family))
        c.close("linear")
    # the client accepts one path; the next step must equal the linear run's next step
    p = path(parents, 9)  # [0, 2, 5, 9]
    c.keep_path("tree", past, p.tolist())
    assert all(s.sessions["tree"].length == past + 4 for s in c.spans)
    c.open("linear", ids, mask)
    c.step("linear", toks[:, p], tree_position_ids(torch.arange(-1, 3), used))
    nxt = tokens(B, 1, seed=2)
    torch.testing.assert_close(c.step("tree", nxt, used[:, None] + 4), c.step("linear", nxt, used[:, None] + 4), **tight(family))
    for s in c.spans:  # and the caches agree entry for entry
        for a, b in zip(s.sessions["tree"].cache.layers[s.start:s.end], s.sessions["linear"].cache.layers[s.start:s.end]):
            torch.testing.assert_close(a.keys, b.keys, **tight(family))
            torch.testing.assert_close(a.values, b.values, **tight(family))
    c.close("tree"), c.close("linear")


@torch.inference_mode()
def test_rows_keep_paths_of_different_lengths(chain):
    """Batch > 1: each row keeps its own path; a row that accepted fewer is padded with -1."""
    c = chain("llama")
    ids, mask = padded_batch([6, 3])
    B, past, used = 2, ids.shape[1], mask.sum(1)
    parents = branching_parents((2, 2, 1))
    toks = tokens(B, parents.numel())
    c.open("tree", ids, mask)
    c.step("tree", toks, tree_position_ids(parents, used), parents)
    kept = [path(parents, 8).tolist(), [0, 2, -1, -1]]  # row 0 accepted 3 drafts, row 1 one
    c.keep_path("tree", past, kept)
    assert c.spans[0].sessions["tree"].mask[:, past:].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    nxt = tokens(B, 1, seed=2)
    accepted = torch.tensor([4, 2])
    out = c.step("tree", nxt, (used + accepted)[:, None])
    for b in range(B):  # each row against its own unpadded linear run
        real = ids[b, mask[b] == 1][None]
        c.open("linear", real, torch.ones_like(real))
        k = torch.tensor(kept[b][:accepted[b]])
        n = real.shape[1]
        c.step("linear", toks[b:b + 1, k], n + torch.arange(len(k))[None])
        want = c.step("linear", nxt[b:b + 1], torch.tensor([[n + len(k)]]))
        torch.testing.assert_close(out[b:b + 1], want, **TIGHT)
        c.close("linear")
    c.close("tree")


@torch.inference_mode()
def test_chain_tree_is_bit_exact_with_a_linear_step(chain):
    """A linear draft sent as a tree = the same tokens as a plain step; keep_path = rollback, bit for bit."""
    c = chain("llama")
    ids, mask = padded_batch([6, 3])
    past, used = ids.shape[1], mask.sum(1)
    parents = branching_parents((1, 1, 1))
    toks, pos = tokens(2, 4), tree_position_ids(parents, used)
    c.open("tree", ids, mask)
    c.open("linear", ids, mask)
    assert torch.equal(c.step("tree", toks, pos, parents), c.step("linear", toks, pos))
    c.keep_path("tree", past, [0, 1])  # root + 1 accepted draft
    for s in c.spans:
        s.rollback("linear", past + 2)
    nxt = tokens(2, 1, seed=2)
    assert torch.equal(c.step("tree", nxt, used[:, None] + 2), c.step("linear", nxt, used[:, None] + 2))
    c.close("tree"), c.close("linear")


@torch.inference_mode()
def test_tree_as_the_first_step(chain):
    """No past, no padding: transformers skips the mask (SDPA's causal path) and the tree mask is all of it."""
    c = chain("qwen3")
    parents = branching_parents((3, 1))
    toks = tokens(1, parents.numel())
    for s in c.spans:
        s.open("tree", 1, 16)
    out = c.step("tree", toks, tree_position_ids(parents, 0)[None], parents)
    for leaf in leaves(parents).tolist():
        p = path(parents, leaf)
        for s in c.spans:
            s.open("linear", 1, 16)
        torch.testing.assert_close(out[:, p], c.step("linear", toks[:, p], torch.arange(len(p))[None]), **TIGHT)
        c.close("linear")


def test_tree_is_anded_into_every_mask_form():
    allowed = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # [T=2, past 1 + T]
    padded = torch.tensor([[[[0, 1, 1], [0, 1, 1]]]], dtype=torch.bool)  # sdpa: row 0 of the past is padding
    assert torch.equal(_and_tree(padded, allowed, 1), torch.tensor([[[[0, 1, 0], [0, 0, 1]]]], dtype=torch.bool))
    assert torch.equal(_and_tree(None, allowed, 2), allowed.expand(2, 1, 2, 3))
    additive = torch.zeros(1, 1, 2, 3)  # eager: 0 = attend
    assert torch.equal(_and_tree(additive, allowed, 1) == 0, allowed[None, None])
    with pytest.raises(ShapeMismatchError, match="sdpa or eager"):
        _and_tree(torch.zeros(1, 1, 2, 4, dtype=torch.bool), allowed, 1)


def snapshot(span, sid):
    s = span.sessions[sid]
    return s.mask.clone(), [(l.keys.clone(), l.values.clone()) for l in s.cache.layers[span.start:span.end]]


def unchanged(span, sid, snap):
    mask, kv = snapshot(span, sid)
    return torch.equal(mask, snap[0]) and all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(kv, snap[1]))


@torch.inference_mode()
def test_bad_trees_and_paths_raise_typed_errors_and_change_nothing(chain):
    c = chain("llama")
    s0 = c.spans[0]
    ids, mask = padded_batch([4])
    past = ids.shape[1]
    c.open("s", ids, mask, max_length=12)
    h = c.embed(tokens(1, 5))
    parents = branching_parents((2, 1))  # [-1, 0, 0, 1, 2]
    pos = tree_position_ids(parents, past)[None]
    snap = snapshot(s0, "s")
    bad_forward = [
        (h, pos, torch.tensor([-1, 0, 3, 1, 2]), TreeError, "node 2 has parent 3"),
        (h, pos, torch.tensor([0, 0, 0, 1, 2]), TreeError, "must have parent -1"),
        (h, pos, parents.int(), ShapeMismatchError, r"int64 \[5\]"),
        (h, pos, parents[:4], ShapeMismatchError, r"int64 \[5\]"),
        (h, past + torch.arange(5)[None], parents, TreeError, "root's position plus each node's depth"),
        (c.embed(tokens(1, 9)), past + torch.arange(9)[None], branching_parents((2, 3)), SessionLengthError, "max_length=12"),
    ]
    for x, p, tree, err, match in bad_forward:
        with pytest.raises(err, match=match):
            s0.forward("s", x, p, ones(1, x.shape[1]), tree)
        assert unchanged(s0, "s", snap)
    with pytest.raises(TreeError, match="no tree step"):
        s0.keep_path("s", past, [0])
    with pytest.raises(UnknownSessionError, match="open a new inference session"):
        s0.keep_path("nobody", past, [0])
    s0.forward("s", h, pos, ones(1, 5), parents)
    snap = snapshot(s0, "s")
    bad_keep = [
        (past - 1, [0, 1], "started at position 4, not 3"),
        (past, [0, 7], r"outside the tree's nodes \[0, 5\)"),
        (past, [0, -2], "outside"),
        (past, [0, 1, 3, 3, 4, 4], "1 <= K <= 5"),
        (past, [], "1 <= K <= 5"),
        (past, [0, 3], "not a root-first path"),  # 3 is a grandchild
        (past, [1, 3], "not a root-first path"),  # the root is always kept
        (past, [0, -1, 1], "not a root-first path"),  # -1 pads only at the end
        (past, [[0, 1], [0]], "pad with -1"),  # ragged
        (past, [[0, 1], [0, 2]], r"\[1, K\]"),  # two rows for a batch of one
    ]
    for past_len, keep, match in bad_keep:
        with pytest.raises(TreeError, match=match):
            s0.keep_path("s", past_len, keep)
        assert unchanged(s0, "s", snap)
    s0.keep_path("s", past, [0, 2, 4])
    assert s0.sessions["s"].length == past + 3
    with pytest.raises(TreeError, match="already kept"):
        s0.keep_path("s", past, [0])
    c.close("s")


@pytest.fixture(scope="module")
def small_window(tmp_path_factory):
    """A Mistral checkpoint whose sliding window (16) a test can reach."""
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mistral-w16", "mistral")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "sliding_window": 16}))
    return path


@torch.inference_mode()
def test_sliding_window_layers_inside_the_window(small_window):
    from transformers import AutoModelForCausalLM

    c = Chain(small_window, AutoModelForCausalLM.from_pretrained(small_window).model.embed_tokens)
    ids, mask = padded_batch([6])
    past = ids.shape[1]
    parents = branching_parents((2, 2))  # 7 nodes: 6 + 7 < 16
    toks = tokens(1, 7)
    c.open("tree", ids, mask)
    c.step("tree", toks, tree_position_ids(parents, past)[None], parents)
    p = path(parents, 5)  # [0, 2, 5]
    c.keep_path("tree", past, p.tolist())
    assert all(l.cumulative_length == past + 3 for s in c.spans for l in s.sessions["tree"].cache.layers[s.start:s.end])
    c.open("linear", ids, mask)
    c.step("linear", toks[:, p], past + torch.arange(3)[None])
    nxt = tokens(1, 1, seed=2)
    torch.testing.assert_close(c.step("tree", nxt, torch.tensor([[past + 3]])),
                               c.step("linear", nxt, torch.tensor([[past + 3]])), **TIGHT)
    with pytest.raises(SessionLengthError, match="sliding-window attention"):  # 10 + 7 reaches the window
        c.step("tree", toks, tree_position_ids(parents, past + 4)[None], parents)


def test_stage_keep_path_runs_on_the_stage_thread(checkpoints, reference):
    stage = StageActor(checkpoints["llama"], 0, 2, num_threads=torch.get_num_threads())
    emb = reference["llama"].model.embed_tokens
    parents = branching_parents((2,))

    async def go():
        await stage.open_session("s", 1, 16)
        with torch.inference_mode():
            stage.runner.forward("s", emb(tokens(1, 3)), tree_position_ids(parents, 0)[None], ones(1, 3), parents)
        with pytest.raises(TreeError, match="not a root-first path"):
            await stage.keep_path("s", 0, [1])
        await stage.keep_path("s", 0, [0, 2])
        return (await stage.info())["sessions"], stage.runner.sessions["s"].length

    assert asyncio.run(go()) == (1, 2)


@torch.inference_mode()
def test_alibi_families_refuse_token_trees_and_stay_usable(chain):
    """BLOOM's ALiBi bias follows the mask's token count, not a tree's depths: a typed refusal,
    and the session goes on with linear steps."""
    c = chain("bloom")
    ids, mask = padded_batch([5])
    c.open("s", ids, mask)
    parents = branching_parents((2,))
    with pytest.raises(TreeError, match="ALiBi.*without assistant_model"):
        c.step("s", tokens(1, 3), tree_position_ids(parents, 5)[None], parents)
    assert all(s.sessions["s"].length == 5 for s in c.spans)
    c.step("s", tokens(1, 1), torch.full((1, 1), 5))
    c.close("s")


@torch.inference_mode()
def test_rollback_past_a_sliding_window_is_a_typed_refusal(chain):
    """Sliding-window layers keep only the last window - 1 positions: once a session has passed the
    window (8 here) it cannot roll back; the refusal changes nothing and decoding goes on."""
    c = chain("mistral_sliding")
    ids, mask = padded_batch([10])
    c.open("s", ids, mask)
    for s in c.spans:
        with pytest.raises(SessionLengthError, match="sliding-window.*cannot roll back"):
            s.rollback("s", 7)
        assert s.sessions["s"].length == 10
    c.step("s", tokens(1, 1), torch.full((1, 1), 10))
    c.close("s")

"""Token-tree kernels against brute-force constructions (walk the parent pointers in plain Python)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bloombee_nb._kernels import (TokenTree, branching_parents, check_parents, depths, leaves, path,
                                  tree_attention_mask, tree_position_ids)


@st.composite
def trees(draw, max_nodes=24):
    """A random topologically ordered tree: parents [T], node 0 the root."""
    T = draw(st.integers(1, max_nodes))
    return torch.tensor([-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)], dtype=torch.long)


def chain_to_root(parents: list[int], i: int) -> list[int]:
    out = [i]
    while parents[out[-1]] != -1:
        out.append(parents[out[-1]])
    return out[::-1]


@settings(max_examples=60, deadline=None)
@given(trees(), st.integers(0, 7))
def test_mask_and_positions_equal_brute_force(parents, past_len):
    p, T = parents.tolist(), parents.numel()
    want = torch.zeros(T, past_len + T, dtype=torch.bool)
    want[:, :past_len] = True
    for i in range(T):
        for j in chain_to_root(p, i):
            want[i, past_len + j] = True
    assert torch.equal(tree_attention_mask(parents, past_len), want)
    additive = tree_attention_mask(parents, past_len, torch.float32)
    assert torch.equal(additive == 0, want) and (additive[~want] == torch.finfo(torch.float32).min).all()
    depth = torch.tensor([len(chain_to_root(p, i)) - 1 for i in range(T)])
    assert torch.equal(tree_position_ids(parents, past_len), past_len + depth)
    rows = torch.tensor([past_len, 3])  # per-row used positions (left-padded batch) -> [B, T]
    assert torch.equal(tree_position_ids(parents, rows), rows[:, None] + depth)
    for i in range(T):
        assert path(parents, i).tolist() == chain_to_root(p, i)
    assert leaves(parents).tolist() == [i for i in range(T) if i not in p]


@pytest.mark.parametrize("widths", [(1,), (3,), (1, 1, 1, 1), (2, 2, 1), (4, 1, 3)])
def test_branching_parents_gives_each_level_its_width(widths):
    parents = branching_parents(widths)
    check_parents(parents)
    d = depths(parents)
    assert d.tolist() == sorted(d.tolist())  # breadth-first
    n = 1
    for level, w in enumerate(widths):
        assert int((d == level).sum()) == n
        children = torch.bincount(parents[1:], minlength=parents.numel())[d == level]
        assert (children == w).all()
        n *= w
    assert int((d == len(widths)).sum()) == n and len(leaves(parents)) == n
    assert branching_parents((1,) * 4).tolist() == [-1, 0, 1, 2, 3]  # the linear draft


@pytest.mark.parametrize("parents, match", [
    ([0, 0], "must have parent -1"),
    ([-1, 0, 3, 1], "node 2 has parent 3"),
    ([-1, 1], "node 1 has parent 1"),
    ([-1, -1], "node 1 has parent -1"),
    ([], "non-empty"),
])
def test_check_parents_says_what_is_wrong(parents, match):
    with pytest.raises(ValueError, match=match):
        check_parents(torch.tensor(parents, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        check_parents(torch.tensor([-1, 0], dtype=torch.int32))


def test_token_tree_value():
    root, drafts = torch.tensor([5, 6]), torch.arange(8).view(2, 4)
    tree = TokenTree.from_widths(root, (2, 1), drafts)
    assert tree.size == 5 and tree.tokens[:, 0].tolist() == [5, 6]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2]
    assert tree.path(4).tolist() == [0, 2, 4] and tree.leaves().tolist() == [3, 4]
    assert tree.position_ids(10).tolist() == [10, 11, 11, 12, 12]
    assert tree.attention_mask(2).shape == (5, 7)
    with pytest.raises(ValueError, match=r"tokens must be \[batch, 5\]"):
        TokenTree(torch.zeros(2, 4, dtype=torch.long), tree.parents)
    with pytest.raises(ValueError, match="at least one child"):
        branching_parents((2, 0))


def test_token_tree_shape_is_what_the_loop_plans_on():
    tree = TokenTree.shape((2, 1))
    assert tree.tokens is None and tree.widths == (2, 1) and tree.level_starts == (0, 1, 3, 5)
    assert tree.children == ((1, 2), (3,), (4,), (), ()) and tree.nodes(1) == slice(1, 3)
    assert tree.path_nodes(2).tolist() == [[1, 3], [2, 4]]
    assert TokenTree.shape(()).widths == () and TokenTree.shape(()).size == 1
    assert TokenTree(None, torch.tensor([-1, 0, 0, 1])).widths is None  # node 2 has no child, node 1 has one
    assert tree.with_tokens(torch.zeros(3, 5, dtype=torch.long)).tokens.shape == (3, 5)
    with pytest.raises(ValueError, match="not breadth-first"):
        TokenTree(None, torch.tensor([-1, 0, 1, 0])).level_starts

"""The link-aware tree size, on explicit numbers: pure functions, no cluster."""

import pytest

from bloombee_nb.generate.tree_size import (AcceptanceStats, ChainCost, LinkSample, StepSample, TreePolicy,
                                            candidate_widths, chain_cost, choose_widths, fit_line, fit_widths,
                                            tree_size)

MEASURED = 1e6  # pseudo-counts that drown the prior: the rates below are what was measured


def stats(*rates_by_rank: float, depths: int = 8) -> AcceptanceStats:
    """Acceptance measured at every depth: candidate i accepted with rates_by_rank[i] (earlier ones rejected)."""
    tried = [[MEASURED] * len(rates_by_rank)] * depths
    accepted = [[MEASURED * r for r in rates_by_rank]] * depths
    return AcceptanceStats().updated(tried, accepted)


GOOD_DRAFT = stats(0.6, 0.3, 0.15, 0.05)    # the shipped pair's ballpark: ~52% top-1 agreement
BAD_DRAFT = stats(0.002, 0.001, 0.001, 0.001)
# 3 stages of a small model on CPUs: 1.5 ms per step + 0.2 ms per tree token; draft 1 ms a level
CHEAP_COMPUTE = dict(compute_s=1.5e-3, compute_per_token_s=0.2e-3, draft_level_s=1e-3, draft_per_token_s=0.02e-3)


def test_expected_tokens_follow_the_acceptance_maths():
    s = stats(0.5, 0.25)
    assert s.rate(0, 0) == pytest.approx(0.5, abs=1e-5) and s.rate(3, 1) == pytest.approx(0.25, abs=1e-5)
    assert s.advance(0, 2) == pytest.approx(1 - 0.5 * 0.75, abs=1e-5)
    assert s.expected_tokens(()) == 1.0
    assert s.expected_tokens((2,)) == pytest.approx(1.625, abs=1e-5)
    assert s.expected_tokens((2, 1)) == pytest.approx(1 + 0.625 + 0.625 * 0.5, abs=1e-5)
    assert s.acceptance_by_depth()[0] == pytest.approx(0.75, abs=1e-5)  # (0.5 + 0.25) of node visits


def test_a_slow_link_buys_a_deeper_and_wider_tree():
    slow = choose_widths(ChainCost(link_s=0.2, **CHEAP_COMPUTE), GOOD_DRAFT)      # 100 ms RTT, 4 one-way hops
    fast = choose_widths(ChainCost(link_s=0.002, **CHEAP_COMPUTE), GOOD_DRAFT)    # loopback
    assert len(slow) >= 4 and slow[0] >= 2
    assert tree_size(slow) > tree_size(fast) and len(slow) > len(fast)
    gain = GOOD_DRAFT.expected_tokens(slow) / ChainCost(link_s=0.2, **CHEAP_COMPUTE).round_s(slow) * 0.2015
    assert gain > 2.0   # more than twice plain decoding's tokens per second on the slow link


def test_a_compute_bound_batch_on_a_fast_link_turns_speculation_off():
    # batch 64: every tree token costs 64 rows of compute (~13 ms); the link is 1 ms
    busy = ChainCost(link_s=1e-3, compute_s=5e-3, compute_per_token_s=13e-3, draft_level_s=2e-3,
                     draft_per_token_s=1e-3)
    assert choose_widths(busy, GOOD_DRAFT) == ()
    # the same batch behind a 100 ms link: a small tree pays again
    assert choose_widths(ChainCost(**{**busy.__dict__, "link_s": 0.2}), GOOD_DRAFT) != ()


def test_a_draft_that_is_never_right_turns_speculation_off():
    assert choose_widths(ChainCost(link_s=0.2, **CHEAP_COMPUTE), BAD_DRAFT) == ()


def test_acceptance_adapts_within_a_few_rounds():
    s = AcceptanceStats()
    slow = ChainCost(link_s=0.2, **CHEAP_COMPUTE)
    assert tree_size(choose_widths(slow, s)) >= 7            # the prior is worth a real try
    for _ in range(30):                                      # then nothing is ever accepted
        s = s.updated([[1, 1, 1]], [[0, 0, 0]])
    assert tree_size(choose_widths(slow, s)) <= 3            # ~1% acceptance: at most a tiny probe pays here
    assert choose_widths(ChainCost(link_s=0.02, **CHEAP_COMPUTE), s) == ()  # and nothing on a faster link
    for _ in range(30):                                      # and then the draft is right again
        s = s.updated([[1]], [[1]])
    assert len(choose_widths(slow, s)) >= 3


def test_costs_are_fitted_from_step_traces():
    steps = [StepSample(1, 0.211, 0.010), StepSample(10, 0.230, 0.028), StepSample(1, 0.209, 0.010)]
    cost = chain_cost(steps, draft_levels=[(1, 0.0011), (4, 0.0014)])
    assert cost.compute_s == pytest.approx(0.008) and cost.compute_per_token_s == pytest.approx(0.002)
    assert cost.link_s == pytest.approx(0.1998, abs=1e-3) and cost.link_per_token_s == pytest.approx(2.2e-4, abs=1e-5)
    assert cost.draft_level_s == pytest.approx(0.001) and cost.draft_per_token_s == pytest.approx(1e-4)
    # a measured profile gives the link instead of the traces
    profiled = chain_cost(steps, link=LinkSample(latency_s=0.15, per_token_s=1e-5))
    assert profiled.link_s == 0.15 and profiled.link_per_token_s == 1e-5 and profiled.compute_s == cost.compute_s
    # one step size only: compute is taken as proportional to tokens, the link as fixed
    assert fit_line([1, 1], [0.01, 0.01], through_origin_if_single=True) == (0.0, 0.01)
    assert fit_line([1, 1], [0.2, 0.2], through_origin_if_single=False) == (0.2, 0.0)


def test_candidates_and_limits():
    cands = list(candidate_widths(max_depth=3, max_width=2, max_nodes=7))
    assert cands[0] == () and (2, 2) in cands and (2, 2, 1) not in cands and (1, 2) not in cands
    assert all(tree_size(c) <= 7 and list(c) == sorted(c, reverse=True) for c in cands)
    assert fit_widths((4, 2, 2, 1), max_depth=3, max_nodes=14) == (4, 2)
    assert fit_widths((2, 2), max_depth=0, max_nodes=99) == ()
    assert TreePolicy((2, 2, 1)).choose(None, AcceptanceStats(), 0, max_depth=2, max_nodes=99) == (2, 2)
    assert TreePolicy().choose(None, AcceptanceStats(), 0, max_depth=8, max_nodes=99) == (2, 2, 1)  # nothing measured
    off = ChainCost(link_s=0.2, **CHEAP_COMPUTE)
    assert TreePolicy().choose(off, BAD_DRAFT, rounds_off=8, max_depth=8, max_nodes=99) == (1,)  # probe now and then
    with pytest.raises(ValueError, match="positive ints"):
        TreePolicy((2, 0))


def test_a_few_stalled_draft_forwards_do_not_turn_speculation_off():
    # 12.5 Mbit/s · 50 ms RTT chain, 3 stages: 112 ms of link per traversal + 2.7 ms per tree token
    # (a 1 KiB hidden state over 4 hops at 1.5625 MB/s); the stages compute 8 ms + 0.1 ms per token
    def step(tokens):
        compute = 8e-3 + 0.1e-3 * tokens
        return StepSample(tokens, 112e-3 + 2.7e-3 * tokens + compute, compute)

    # the prefill (17 tokens), a (2, 2, 1, 1) tree (15), then 8 plain steps and a (1,) probe
    steps = [step(17), step(15)] + [step(1)] * 8 + [step(2)]
    # the draft's forwards (nodes, s): 1.5-3 ms each, but the client was descheduled during two
    # of the tree's (160 ms each: a busy 2-core machine, torch's OpenMP threads waiting for a core)
    first_tree = [(17, 3.1e-3), (1, 1.5e-3), (2, 160e-3), (4, 1.9e-3), (4, 160e-3), (4, 1.9e-3)]
    probe = [(9, 2.2e-3), (1, 1.5e-3)]  # the probe's draft catches up on the 8 plain tokens
    cost = chain_cost(steps, first_tree + probe)
    assert cost.draft_level_s < 3e-3 and cost.draft_per_token_s < 0.5e-3  # what a forward typically takes
    chosen = choose_widths(cost, GOOD_DRAFT)
    assert len(chosen) >= 3 and tree_size(chosen) >= 5   # speculation pays ~2x here
    # right after the tree, before any plain step: the same
    assert len(choose_widths(chain_cost(steps[:2], first_tree), GOOD_DRAFT)) >= 3
    # a draft that is slow every time is priced as slow: then plain decoding wins
    slow = [(n, 160e-3 + 1e-3 * n) for n, _ in first_tree + probe]
    assert choose_widths(chain_cost(steps, slow), GOOD_DRAFT) == ()

"""Speculative decoding across the chain: the draft proposes a token tree on the client, the chain
verifies the whole tree in one traversal, and every stage keeps only the accepted path.

    out = model.generate(ids, assistant_model=draft, max_new_tokens=64)              # greedy: exact
    out = model.generate(ids, assistant_model=draft, do_sample=True, tree_widths=(2, 2, 1))

One round, for a batch of B sequences (node 0 of the tree is each row's last accepted token, the
*root*, not yet in any KV cache; see ``bloombee_nb._kernels.tree``):

1. draft   the draft model (same tokenizer, runs here with its own DynamicCache) grows the tree a
           level at a time: each node at depth l gets ``widths[l]`` children: the top-w tokens of
           its draft distribution q (greedy), or w i.i.d. samples from q (sampling).
2. verify  the T tree tokens go through the chain as one step with the tree's mask and positions:
           logits for every node at once (the target's distribution p after each node's path).
3. accept  per row, walk down from the root (:func:`accept_greedy`, :func:`accept_sampled`):
           k accepted drafts, plus one token the target picks where the walk stops.
4. keep    the stages keep the KV of the path [root, a1..ak] (sent with the next step, no extra
           round trip); the draft's cache keeps the same path. The new token is the next root.

How big a tree pays depends on the link, the stages' compute and the acceptance rate: with
``tree_widths="auto"`` (default) :mod:`.tree_size` re-chooses the tree every round and turns
speculation off (plain decoding) when it does not pay.

Exactness. Greedy: a row's output is the target's argmax at every position, whatever the draft
proposes, so it equals plain greedy token for token (trees run within ~4e-8 of linear steps in
fp32, not bit for bit: a near-tie of two logits could in principle flip; a linear draft is
bit-exact). Sampling: :func:`accept_sampled` leaves every emitted token distributed exactly as the
target's (processed: temperature, top-k, top-p …) distribution.

Modules: ``accept.py`` (step 3, pure), ``draft.py`` (step 1 and the draft's cache), this one (the
loop, what a generation records). The tree is ``bloombee_nb._kernels.TokenTree`` throughout, and the
draft keeps its path with the stages' own ``compact_cache``.

Batch > 1: rows accept different numbers of tokens. The stages keep each row's own path (-1 pads a
shorter row, masked from then on); rows run ahead of each other and the output is handed out a
column at a time as every unfinished row has it, so streamers and stopping criteria see exactly
what plain ``generate`` would show them.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .._kernels import TokenTree
from ..errors import SessionLengthError, ShapeMismatchError
from .accept import Verdict, accept_greedy, accept_sampled, children_of
from .draft import DraftMirror, check_draft, default_draft_path, load_draft
from .threads import torch_threads
from .tree_size import AcceptanceStats, ChainCost, LinkSample, StepSample, TreePolicy, chain_cost

# the draft's and acceptance's names stay importable from here (generate.speculative was one module)
__all__ = ["DraftMirror", "RoundTrace", "SpeculationSummary", "Verdict", "accept_greedy", "accept_sampled",
           "check_draft", "children_of", "default_draft_path", "load_draft", "remembered_stats",
           "speculative_decoding"]


# ---- what a generation records ------------------------------------------------------------------
@dataclass(frozen=True)
class RoundTrace:
    """One round: the tree sent, what each row accepted, where the time went (client clock)."""

    widths: tuple[int, ...]    # tree shape (children per node, per depth); () = plain decoding step
    tree_tokens: int           # nodes per sequence that crossed the chain
    accepted: tuple[int, ...]  # drafts accepted per row (0 in a plain step)
    draft_s: float             # the draft model's forwards
    verify_s: float            # the chain step (one traversal)
    round_s: float             # the whole round, acceptance and bookkeeping included

    @property
    def depth(self) -> int:
        return len(self.widths)


@dataclass(frozen=True)
class SpeculationSummary:
    """Numbers the generation panel and benchmarks read off a session's rounds."""

    rounds: int                    # traversals of the chain while decoding
    speculative_rounds: int        # of which carried a tree
    tokens_per_traversal: float    # tokens per sequence per traversal (1.0 = no gain)
    acceptance_rate: float         # accepted drafts / drafted depth, over speculative rounds and rows
    acceptance_by_depth: tuple[float, ...]  # chance to accept one more level, having reached depth l
    mean_tree_tokens: float        # nodes per sequence per speculative round
    last_widths: tuple[int, ...]      # the last tree sent (() when none was)

    @classmethod
    def of(cls, rounds) -> "SpeculationSummary":
        rounds = list(rounds)
        spec = [r for r in rounds if r.widths]
        rows = [(a, r.depth) for r in rounds for a in r.accepted]
        drafted = sum(d for _, d in rows)
        max_depth = max((r.depth for r in rounds), default=0)
        by_depth = []
        for l in range(max_depth):
            reached = [a for a, d in rows if a >= l and d > l]
            by_depth.append(sum(a > l for a in reached) / len(reached) if reached else 0.0)
        return cls(len(rounds), len(spec), float(np.mean([a + 1 for a, _ in rows])) if rows else 0.0,
                   sum(a for a, _ in rows) / drafted if drafted else 0.0, tuple(by_depth),
                   float(np.mean([r.tree_tokens for r in spec])) if spec else 0.0,
                   spec[-1].widths if spec else ())


# ---- the decoding loop --------------------------------------------------------------------------
PLAIN = TokenTree.shape(())  # a plain decoding step: the root alone, no drafts


class _Run:
    """One speculative ``generate`` call: the client's state between rounds."""

    def __init__(self, model, draft, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                 policy: TreePolicy, session, attention_mask):
        self.model, self.session, self.policy, self.streamer = model, session, policy, streamer
        self.processors, self.stopping = logits_processor, stopping_criteria
        self.sampling = bool(generation_config.do_sample)
        self.max_length = generation_config.max_length
        self.pad = int(generation_config._pad_token_tensor) if generation_config._pad_token_tensor is not None else 0
        self.input_ids = input_ids
        B, L = input_ids.shape
        if L == 0:
            raise ShapeMismatchError("speculative decoding starts from input_ids (the draft needs the tokens), "
                                     "not from inputs_embeds")
        self.B = B
        self.link = profile_link(model, B)                      # None: the link is read off the step traces
        mask = torch.ones(B, L, dtype=torch.long) if attention_mask is None else attention_mask.to(torch.long)
        if B > 1 and bool((mask[:, -1] == 0).any()):
            raise ShapeMismatchError("speculative decoding needs left-padded prompts (tokenizer.padding_side='left')")
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)   # what transformers gives the prompt
        self.queues = [deque() for _ in range(B)]               # tokens generated, not yet handed out
        self.unfinished = torch.ones(B, dtype=torch.long)
        self.root, self.root_pos = input_ids[:, -1].clone(), pos[:, -1].clone()
        self.draft = DraftMirror(draft, B)
        self.draft.append(input_ids[:, :-1], mask[:, :-1], pos[:, :-1])
        self._prefill(input_ids, mask, pos)
        self.stats, self.rounds_off = remembered_stats(model, draft), 0

    def _prefill(self, ids, mask, pos) -> None:
        held = self.session.get_seq_length()
        if held > ids.shape[1] - 1:
            raise SessionLengthError(f"the session holds {held} positions but the prompt has {ids.shape[1]} tokens; "
                                     "pass the whole conversation so far (or open a new session)")
        if held < ids.shape[1] - 1:
            cols = slice(held, ids.shape[1] - 1)
            self.session.step(self._embed(ids[:, cols]), pos[:, cols], mask[:, cols])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.client_math.inputs(self.model.embed_tokens(ids).to(self.model.dtype))

    # ---- one round ----------------------------------------------------------------------------
    def round(self) -> None:
        t0 = time.perf_counter()
        tree = self._choose()
        draft_s, q = 0.0, None
        if tree.widths:
            t = time.perf_counter()
            tokens, q = self._draft(tree)                                       # [B, T], [B, T', V]
            draft_s = time.perf_counter() - t
        else:
            tokens = self.root[:, None]
            self.draft.append(tokens, torch.ones_like(tokens), self.root_pos[:, None])
        past = self.session.get_seq_length()
        t = time.perf_counter()
        logits = self._verify(tokens, tree)                                     # [B, T, V]
        verify_s = time.perf_counter() - t
        verdicts = self._accept(tree, tokens, logits, q)
        if tree.widths:
            keep = torch.full((self.B, max(len(v.path) for v in verdicts)), -1, dtype=torch.long)
            for b, v in enumerate(verdicts):
                keep[b, :len(v.path)] = torch.tensor(v.path)
            self.session.keep_path(past, keep)
            self.draft.keep_path(keep)
        self._advance(tree, tokens, verdicts)
        self.session.rounds.append(RoundTrace(tree.widths, tree.size, tuple(v.accepted for v in verdicts), draft_s,
                                              verify_s, time.perf_counter() - t0))

    def _choose(self) -> TokenTree:
        need = [self.max_length - self.input_ids.shape[1] - len(q)
                for q, u in zip(self.queues, self.unfinished.tolist()) if u]
        room = self.session.max_length - self.session.get_seq_length()
        if room < 1:
            raise SessionLengthError(f"the session's max_length={self.session.max_length} is used up; open the session "
                                     "with room for the tree tokens (prompt + new tokens + a tree)")
        deepest = max(need, default=1)
        widths = self.policy.choose(self._cost(), self.stats, self.rounds_off,
                                    max_depth=min(deepest - 1, room - deepest), max_nodes=room)
        self.rounds_off = self.rounds_off + 1 if not widths else 0
        return _tree(widths)

    def _cost(self) -> ChainCost | None:
        traces = list(self.session.traces)[-64:]
        if not traces:
            return None
        steps = [StepSample(t.tokens, t.wall_s, sum(t.stage_compute_s)) for t in traces]
        return chain_cost(steps, list(self.draft.timings), self.link)

    def _draft(self, tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow the tree: tokens ``[B, T]`` (root first, breadth-first) and the draft's distribution
        ``q [B, T', V]`` at every node with children (what each node's children were drawn from)."""
        B, T = self.B, tree.size
        tokens = torch.empty(B, T, dtype=torch.long)
        tokens[:, 0] = self.root
        logits = self.draft.start(self.root, self.root_pos)                        # [B, 1, V]
        qs = []
        for l, w in enumerate(tree.widths):
            scores = self._process(logits.float(), tokens, tree, l)                # [B, n_l, V]
            if self.sampling:
                q = scores.softmax(-1)
                kids = torch.multinomial(q.reshape(-1, q.shape[-1]), w, replacement=True).reshape(B, -1)
                qs.append(q)
            else:
                kids = scores.topk(w, dim=-1).indices.reshape(B, -1)               # distinct, best first
            nodes = tree.nodes(l + 1)
            tokens[:, nodes] = kids
            logits = self.draft.level(kids, self.root_pos[:, None] + l + 1, tree.ancestors[nodes, :nodes.stop])
        return tokens, (torch.cat(qs, 1) if qs else None)

    def _verify(self, tokens: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """One traversal of the chain: the target's logits after every node ``[B, T, V]``."""
        parents = tree.parents if tree.widths else None
        pos = tree.position_ids(self.root_pos)                                     # [B, T]
        hidden = self.session.step(self._embed(tokens), pos, torch.ones_like(tokens), parents)
        return self.model.client_math.logits(self.model.lm_head(self.model.norm(hidden))).float()

    def _accept(self, tree: TokenTree, tokens, logits, q) -> list[Verdict]:
        scores = torch.cat([self._process(logits[:, tree.nodes(l)], tokens, tree, l)
                            for l in range(len(tree.level_starts) - 1)], 1)                   # [B, T, V]
        toks = tokens.tolist()
        if not self.sampling:
            best = scores.argmax(-1).tolist()
            verdicts = [accept_greedy(best[b], toks[b], tree.children) for b in range(self.B)]
        else:
            p = scores.softmax(-1)
            verdicts = [accept_sampled(p[b], q[b] if q is not None else p[b, :0], toks[b], tree.children)
                        for b in range(self.B)]
        if tree.widths:
            self._count(verdicts)
        return verdicts

    def _count(self, verdicts: list[Verdict]) -> None:
        depth = max(len(v.tries) for v in verdicts)
        width = max([self.policy.max_width, *(t for v in verdicts for t in v.tries)])
        tried, accepted = np.zeros((depth, width)), np.zeros((depth, width))
        for v in verdicts:
            for l, n in enumerate(v.tries):
                tried[l, :n] += 1
                if l < v.accepted:
                    accepted[l, n - 1] += 1
        self.stats = self.stats.updated(tried.tolist(), accepted.tolist())
        self.model.acceptance[self.draft.model] = self.stats

    def _process(self, logits: torch.Tensor, tokens: torch.Tensor, tree: TokenTree, depth: int) -> torch.Tensor:
        """The generation's logits processors on the scores of the nodes at ``depth`` ``[B, n, V]``, each
        node seeing its own context: the row's tokens so far, then the drafts on the path to it."""
        if not self.processors:
            return logits
        B, n, V = logits.shape
        out = torch.empty_like(logits)
        path = tokens[:, tree.path_nodes(depth)]                                    # [B, n, depth]
        by_len: dict[int, list[int]] = {}
        for b in range(B):
            by_len.setdefault(len(self.queues[b]), []).append(b)
        for extra, rows in by_len.items():
            rows_t = torch.tensor(rows)
            ctx = torch.cat([self.input_ids[rows_t], torch.tensor([list(self.queues[b]) for b in rows],
                                                                  dtype=torch.long).reshape(len(rows), extra)], 1)
            ids = torch.cat([ctx[:, None].expand(-1, n, -1), path[rows_t]], -1).reshape(len(rows) * n, -1)
            out[rows_t] = self.processors(ids, logits[rows_t].reshape(-1, V).clone()).reshape(len(rows), n, V)
        return out

    def _advance(self, tree: TokenTree, tokens: torch.Tensor, verdicts: list[Verdict]) -> None:
        """Queue each row's new tokens (accepted drafts + the target's token), which becomes the root."""
        for b, v in enumerate(verdicts):
            new = tokens[b, list(v.path[1:])].tolist() + [v.token]
            self.queues[b].extend(new)
            self.root[b] = v.token
            self.root_pos[b] += len(new)

    # ---- handing tokens out -------------------------------------------------------------------
    def emit(self) -> bool:
        """Append every column all unfinished rows have; stopping criteria per column. True: done."""
        cols = []
        while all(self.queues[b] for b in range(self.B) if self.unfinished[b]):
            col = torch.tensor([self.queues[b].popleft() if self.queues[b] else self.pad for b in range(self.B)])
            col = col * self.unfinished + self.pad * (1 - self.unfinished)
            self.input_ids = torch.cat([self.input_ids, col[:, None]], 1)
            cols.append(col)
            self.unfinished = self.unfinished * (~self.stopping(self.input_ids, None)).to(torch.long)
            if not self.unfinished.any():
                break
        if cols and self.streamer is not None:
            self.streamer.put(torch.stack(cols, 1))
        return not bool(self.unfinished.any())


def remembered_stats(model, draft) -> AcceptanceStats:
    """The acceptance the last generation of ``model`` with ``draft`` measured (the prior if none)."""
    return model.acceptance.get(draft, AcceptanceStats())


@lru_cache(maxsize=64)
def _tree(widths: tuple[int, ...]) -> TokenTree:
    """One tree value per shape: its derived facts (children, ancestors, levels) are computed once."""
    return TokenTree.shape(widths) if widths else PLAIN


def profile_link(model, batch: int) -> LinkSample | None:
    """The chain's links from ``model.profile`` (when measured): latency and per-token wire time."""
    profile = getattr(model, "profile", None)
    if profile is None:
        return None
    info = model.cluster.workers()
    name = lambda i: profile.client if i == -1 else str(  # noqa: E731
        info.get(model.placement.stages[i].worker, {}).get("name", model.placement.stages[i].worker))
    links = [profile.link(name(s), name(d)) for s, d in model.chain.hops()]
    if any(link is None for link in links):
        return None
    token_bytes = model.config.hidden_size * torch.finfo(model.dtype).bits // 8 * batch
    return LinkSample(sum(ln.rtt_s / 2 for ln in links), sum(token_bytes / ln.bandwidth_bytes_per_s for ln in links))


def speculative_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, *, draft,
                         streamer=None, **model_kwargs):
    """The decoding loop ``generate(..., assistant_model=draft)`` runs (transformers' decoding-method
    signature; the session is ``model_kwargs["cache"]``, carrying the tree policy of the call in
    ``session.tree_policy``). Returns the sequences like ``generate``."""
    session = model_kwargs.get("cache")
    if session is None or not hasattr(session, "keep_path"):
        raise ValueError("speculative decoding needs the model's inference session as the cache; call "
                         "model.generate(...) (it opens one) or pass session=model.inference_session(...)")
    if getattr(session, "ragged", False):
        raise SessionLengthError("this session's rows hold different numbers of positions after a batched speculative "
                                 "generation; open a new session for the next turn")
    with torch_threads(model.client_threads), torch.inference_mode():
        run = _Run(model, draft, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                   getattr(session, "tree_policy", None) or TreePolicy(), session, model_kwargs.get("attention_mask"))
        done = run.emit()
        while not done:
            run.round()
            done = run.emit()
    _settle(run)
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=run.input_ids, past_key_values=session)
    return run.input_ids


def _settle(run: _Run) -> None:
    """Leave the session as plain ``generate`` would: holding every token of the output but the last.

    One row: roll back what was accepted beyond the output. A batch cannot be lined up again (rows
    ran ahead of each other, finished rows hold their own tokens rather than padding): the session
    is marked so that reusing it fails loudly instead of decoding at wrong positions.
    """
    s = run.session
    if run.B > 1:
        s.ragged = True
        return
    held = run.input_ids.shape[1] - 1
    if s.get_seq_length() > held:
        s.rollback(held)

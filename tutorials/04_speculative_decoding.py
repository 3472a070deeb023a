# %% [markdown]
# # 04 · Speculative decoding: several tokens per trip through the chain
#
# Every token a distributed model generates costs one *traversal* of the chain: the newest
# token's hidden states go from the notebook to stage 1, each stage forwards to the next, the last
# one answers the notebook. With 3 stages that is 4 one-way hops, so on links with a 50 ms
# round-trip time (RTT) a token waits ~100 ms on the network alone — while the stages sit idle.
#
# **Speculative decoding** buys several tokens with one traversal. A small *draft* model, running
# here in the notebook, guesses the next few tokens — not one guess per position but a *tree* of
# alternatives. The chain runs the whole tree in a single traversal (11 tokens cost about what one
# costs when the link's latency dominates), and the target's logits at every node of the tree say
# which guesses it agrees with. The agreed ones are kept, the rest leave nothing behind, and the
# output is exactly what the target alone produces.
#
# This notebook shows the shipped target/draft pair, a token tree and its attention mask, greedy
# speculation checked token for token against `transformers`, acceptance and tokens per traversal,
# how the tree size follows the link, the speed-up on emulated slow links, and sampling that keeps
# the target's distribution. It runs on a CPU in about a minute.

# %%
# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/bloombee-nb/bloombee_nb@main")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)

# %% [markdown]
# ## Target and draft
#
# The target is the shipped `tiny-llama` (6 layers), split over three local workers — 2 layers
# each. The draft is the shipped `tiny-llama-draft`: 2 narrower layers, 5× fewer parameters, the
# same tokenizer, trained on the same Python standard library. On held-out code it picks the
# target's next greedy token about half the time. Any small causal LM that shares the target's
# tokenizer can be the draft; `load_draft(path)` loads one once per path (no path: the shipped
# draft).

# %%
# %load_ext bloombee_nb

# %%
# %bloombee connect local --workers 3

# %%
import torch
from transformers import AutoModelForCausalLM
from bloombee_nb.generate.speculative import load_draft
from bloombee_nb.notebook import session
from bloombee_nb.shipped import DRAFT_PATH, default_model_path

s = session()
cluster, model, tok = s.cluster, s.model, s.tokenizer
reference = AutoModelForCausalLM.from_pretrained(default_model_path())  # the whole target in one process
draft = load_draft(str(DRAFT_PATH))    # the shipped draft, on the client (the same copy %%bloombee uses)
for name, m in (("target", reference), ("draft", draft)):
    print(f"{name:6s} {m.config.num_hidden_layers} layers, {m.config.hidden_size:3d} wide, "
          f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters")

# %% [markdown]
# ## A token tree
#
# The tree is described by its *widths*: `(2, 2, 1)` gives the root 2 children (the draft's two
# likeliest next tokens), each of them 2, and each of those 1 — 1 + 2 + 4 + 4 = 11 nodes. The root
# is the last token the target chose, not yet in any KV cache. `branching_parents` flattens the
# tree breadth-first into one tensor: each node's parent, `-1` for the root.
#
# Here the draft grows a tree after `import os⏎import` (with plain `transformers` and the whole
# context each time, to keep it readable; the library runs the draft with its own KV cache, one
# forward per level of the tree):

# %%
from bloombee_nb._kernels import TokenTree, branching_parents

prompt = tok("import os\nimport", return_tensors="pt").input_ids      # [1, P]
widths = (2, 2, 1)
parents = branching_parents(widths)                                  # [11]: each node's parent
tokens, paths = [prompt[0, -1].item()], [prompt[0].tolist()]         # node 0, the root: the last token so far
with torch.no_grad():
    for node in range(parents.numel()):
        n_kids = int((parents == node).sum())
        if n_kids:                          # its children: the draft's n_kids likeliest tokens after its path
            best = draft(torch.tensor([paths[node]])).logits[0, -1].topk(n_kids).indices.tolist()
            tokens += best
            paths += [paths[node] + [t] for t in best]
tree = TokenTree(torch.tensor([tokens]), parents)    # breadth-first: children were appended in node order
print("parents:", parents.tolist())
print("tokens: ", [tok.decode([t]) for t in tokens])

# %% [markdown]
# Which branch does the target agree with? On the chain, the target's logits at all 11
# nodes come from one traversal; greedy verification then walks down from the root, moving to the
# child that carries the target's own choice, and stops where no child does — emitting the target's
# token there instead. So a traversal yields *accepted drafts + 1* tokens, and each of them is what
# greedy decoding with the target alone gives (here the target's greedy continuation from plain
# `transformers` stands in for the chain's logits):

# %%
want = reference.generate(prompt, max_new_tokens=len(widths) + 1, do_sample=False)[0, prompt.shape[1]:].tolist()
P, path = parents.tolist(), [0]
for t in want:                                # move to the child holding the target's token, if any
    hit = [c for c in range(tree.size) if P[c] == path[-1] and tokens[c] == t]
    if not hit:
        break
    path += hit
accepted = [tok.decode([tokens[n]]) for n in path[1:]]
print(f"target's greedy tokens: {[tok.decode([t]) for t in want]}")
print(f"accepted path {path}: drafts {accepted} + the target's own {tok.decode([want[len(path) - 1]])!r} "
      f"= {len(path)} tokens from one traversal")

# %%
import plotly.graph_objects as go
from bloombee_nb.notebook.frontend import show_figure  # a static plotly figure (also on Colab)

depth, leaves = tree.depths().tolist(), tree.leaves().tolist()
y = {}
for n in reversed(range(tree.size)):             # leaves evenly spaced, each parent midway between its children
    kids = [c for c in range(tree.size) if P[c] == n]
    y[n] = sum(y[c] for c in kids) / len(kids) if kids else -leaves.index(n)
green, grey = "#2a9d8f", "#b8b8b8"
fig = go.Figure()
for n in range(1, tree.size):
    kept = n in path
    fig.add_scatter(x=[depth[P[n]], depth[n]], y=[y[P[n]], y[n]], mode="lines", hoverinfo="skip", showlegend=False,
                    line=dict(color=green if kept else grey, width=4 if kept else 1.5))
fig.add_scatter(x=depth, y=[y[n] for n in range(tree.size)], mode="markers+text", showlegend=False,
                text=[f"{n}: {tok.decode([t])!r}" for n, t in enumerate(tokens)], textposition="top center",
                marker=dict(size=16, color=[green if n in path else grey for n in range(tree.size)]))
fig.add_annotation(x=depth[path[-1]] + 0.5, y=y[path[-1]], yshift=-14, showarrow=False,
                   text=f"then the target's own {tok.decode([want[len(path) - 1]])!r}", font=dict(color=green))
fig.update_layout(title=f"draft tree {widths} after 'import os⏎import': the target keeps the green path",
                  xaxis=dict(title="depth", dtick=1), width=640, height=400,
                  yaxis=dict(visible=False, range=[min(y.values()) - 0.6, max(y.values()) + 0.6]))
show_figure(fig)

# %% [markdown]
# The draft's first guess at depth 1 was wrong and its second right: that is what width
# buys — a linear draft (widths `(1, 1, 1)`) would have kept nothing here.
#
# ## The tree-attention mask
#
# All 11 nodes go through each stage as one step of 11 positions, but they are alternative
# futures, not a sentence: a node may attend to the cached context and to its own ancestors, never
# to a sibling or a cousin. `tree_attention_mask(parents, past_len)` (also `tree.attention_mask`)
# is that mask, and positions are the root's position plus the depth, so siblings share a position.
# The stages hand exactly this mask to the model family's own decoder layers. The cache holds the
# prompt but its last token (the root):

# %%
import html

past = prompt.shape[1] - 1                          # positions already in the stages' KV cache
mask = tree.attention_mask(past)                      # [11, past + 11] bool: True = may attend
def label(t):                                         # plotly labels are HTML: '<s>' must be escaped
    return html.escape(repr(tok.decode([t])))

cols = [f"{label(t)} ·{i}" for i, t in enumerate(prompt[0, :-1].tolist())]
rows = [f"{label(t)} #{n}" for n, t in enumerate(tokens)]
fig = go.Figure(go.Heatmap(z=mask.int().tolist(), x=cols + rows, y=rows, xgap=1, ygap=1, showscale=False,
                           colorscale=[[0, "#f1f1f1"], [1, "#264653"]]))
fig.add_vline(x=past - 0.5, line_dash="dot")
fig.update_layout(title="tree-attention mask: each node (row) attends to the dark columns",
                  xaxis=dict(title="cached prompt ┆ tree nodes"), yaxis=dict(title="tree node", autorange="reversed"),
                  width=700, height=460)
show_figure(fig)
print("position ids of the nodes:", tree.position_ids(past).tolist())

# %% [markdown]
# After verification every stage keeps the KV entries of the accepted path only — compacted
# in place (`bloombee_nb._kernels.compact_kv`) together with the next step, so keeping costs no
# extra trip — and the rejected branches leave nothing behind.
#
# ## Speculative `generate`, exact
#
# `model.generate(..., assistant_model=draft)` follows the `transformers` convention for
# assisted generation; `tree_widths` fixes the tree (the default, `"auto"`, chooses it per round —
# below). Greedy speculation must give exactly plain greedy's tokens, whatever the draft proposes:

# %%
from bloombee_nb.generate.speculative import SpeculationSummary

NEW = 48
ids = tok("class Queue:\n    def __init__(self, maxsize=0):\n", return_tensors="pt")
with model.inference_session(max_length=ids.input_ids.shape[1] + NEW + tree.size) as sess:
    fast = model.generate(**ids, session=sess, assistant_model=draft, tree_widths=widths,
                          max_new_tokens=NEW, do_sample=False)
    rounds, traces = list(sess.rounds), list(sess.traces)
plain = reference.generate(**ids, max_new_tokens=NEW, do_sample=False)
assert torch.equal(fast, plain), "speculative output differs from transformers"
print(tok.decode(fast[0], skip_special_tokens=True))
print(f"--- {NEW} new tokens, identical to transformers' greedy, in {len(rounds)} traversals of the chain")

# %% [markdown]
# The session records one `RoundTrace` per traversal in `session.rounds`: the tree sent
# (`widths`, `tree_tokens`), the drafts each row `accepted`, and the time spent drafting, verifying
# and in the whole round. `SpeculationSummary.of(rounds)` turns them into the numbers the generation
# panel shows: the **acceptance rate** (accepted drafts / drafted depth), its value per depth (the
# chance to go one level deeper, having reached it), and **tokens per traversal** (accepted + 1; plain
# decoding makes 1):

# %%
from bloombee_nb.generate.speculative import remembered_stats

summary = SpeculationSummary.of(rounds)
stats = remembered_stats(model, draft)   # what the tree-size policy keeps: acceptance by depth and candidate
print(f"acceptance rate {summary.acceptance_rate:.0%}, per depth "
      + " / ".join(f"{a:.0%}" for a in summary.acceptance_by_depth)
      + f"; {summary.tokens_per_traversal:.2f} tokens per traversal; {summary.mean_tree_tokens:.1f} tree tokens sent per round")
r = rounds[0]
print(f"first round: tree {r.widths}, {r.tree_tokens} tokens, accepted {r.accepted[0]}; draft {r.draft_s * 1e3:.1f} ms, "
      f"verify (one traversal) {r.verify_s * 1e3:.1f} ms, round {r.round_s * 1e3:.1f} ms")

gained = [r.accepted[0] + 1 for r in rounds]
fig = go.Figure(go.Bar(x=list(range(1, len(rounds) + 1)), y=gained, marker_color=green, name="tokens"))
fig.add_hline(y=1, line_dash="dot")
fig.update_layout(title=f"tokens per traversal, round by round (tree {widths}; dotted: plain decoding)",
                  xaxis=dict(title="round (one traversal of the chain)"), yaxis=dict(title="tokens", dtick=1),
                  width=640, height=300)
show_figure(fig)


# %% [markdown]
# ## In the notebook: `%%bloombee generate --speculative`
#
# The magic takes the shipped draft for the shipped model (`--draft PATH` for another, `--tree 2,2,1`
# to fix the tree instead of choosing it per round) and adds the acceptance rate and tokens per
# traversal to its summary; in JupyterLab the generation panel updates them live. On this loopback
# "link" a traversal is cheap, so the link-aware tree stays small (or, for some rounds, off):

# %%
# %%bloombee generate --speculative --max-new-tokens 32
def parse_args(argv):


# %% [markdown]
# ## How big a tree? It depends on the link
#
# A bigger tree makes more tokens per traversal likelier, but costs draft forwards and more tokens
# through every stage and link. With `tree_widths="auto"` (the default) the generation re-chooses
# the tree every round (`bloombee_nb/generate/tree_size.py`) to maximise tokens per second,
#
#     rate(widths) = E[accepted + 1] / (traversal_s(T) + draft_s(widths)),    T = nodes of the tree
#
# from measured numbers (a `ChainCost`): the link's latency and per-token wire time, the stages'
# compute as a line in T, the draft's time per level; and `E[accepted + 1]` from the running
# acceptance per depth and candidate (`AcceptanceStats`). `widths = ()` is plain decoding: it wins —
# speculation switches itself off — when the extra tree tokens cost more than the traversals they
# save, e.g. when a large batch already fills the stages' compute.
#
# What the policy sees of this chain, fitted from the traces of the generation above:

# %%
from bloombee_nb.generate.tree_size import ChainCost, StepSample, chain_cost, choose_widths

here = chain_cost([StepSample(t.tokens, t.wall_s, sum(t.stage_compute_s)) for t in traces])
print(f"this chain, from the session's traces: {here.link_s * 1e3 + here.compute_s * 1e3:.1f} ms per traversal "
      f"+ {(here.compute_per_token_s + here.link_per_token_s) * 1e3:.2f} ms per tree token")

# %% [markdown]
# To see the trade-off, take a chain where compute is real: three GPU machines hosting a
# 70B-class model (the numbers below are illustrative: 30 ms of fixed compute per step, reading the
# weights; 0.5 ms per token of every sequence; 16 KiB of bf16 hidden states per token and sequence
# on 1 Gbit/s links; a draft at 5 ms per level), with the acceptance this pair measured in the
# greedy generation above (`stats`). Vary the links' RTT and the batch:

# %%
hops = len(model.placement.stages) + 1   # one-way hops of one traversal

def big_chain(rtt_ms, batch):
    """Seconds of a round on the illustrative 70B chain, every link at rtt_ms, `batch` sequences."""
    return ChainCost(link_s=hops * rtt_ms / 2e3,                              # latency of the hops
                     link_per_token_s=batch * hops * 16 * 1024 * 8 / 1e9,     # 16 KiB per token, every hop
                     compute_s=0.030, compute_per_token_s=batch * 0.0005,     # all stages together
                     draft_level_s=0.005, draft_per_token_s=batch * 0.00002)

RTTS, BATCHES = (0, 5, 25, 100), (1, 16, 64, 256)
print("chosen tree (predicted speed-up over plain decoding)")
print("batch " + "".join(f"{f'RTT {r} ms':>25}" for r in RTTS))
for batch in BATCHES:
    row = []
    for rtt_ms in RTTS:
        cost = big_chain(rtt_ms, batch)
        w = choose_widths(cost, stats)
        speedup = stats.expected_tokens(w) / cost.round_s(w) * cost.round_s(())
        row.append(f"{','.join(map(str, w)) or 'speculation off'} ({speedup:.2f}×)")
    print(f"{batch:5d} " + "".join(f"{cell:>25}" for cell in row))

# %% [markdown]
# Read it along a row: the longer the RTT, the dearer each traversal, so deeper and wider
# trees pay. Down a column: with more sequences in the batch, every extra tree token costs real
# compute and wire time for all of them, so the tree shrinks to a linear draft — and with a fast
# link and a full batch, speculation switches off. During a generation the policy makes this choice
# every round from the session's own traces (and, while off, sends a small tree every few rounds to
# keep measuring the acceptance).
#
# ## Speed-up vs link latency
#
# Now measured: every participant (the notebook and each worker) holds each message it sends for
# RTT/2 (`set_rtt(ms, client)`; the same send-path emulation as in `03_compression_and_links`), and
# each setting generates 16 tokens with and without speculation (`tree_widths="auto"`), twice, keeping
# the faster run (this machine is shared: a run can catch a pause). Per-token latency leaves out the
# prompt's own trip:

# %%
import statistics, time
from collections import Counter
from bloombee_nb.cluster.linkemu import set_rtt

def measure(prompt_ids, new_tokens=16, **speculation):
    """Per-token latency after the prompt, traversals, and the trees sent, for one greedy generation."""
    with model.inference_session(max_length=prompt_ids.shape[1] + new_tokens + 96) as sess:
        t0 = time.perf_counter()
        out = model.generate(prompt_ids, session=sess, max_new_tokens=new_tokens, do_sample=False, **speculation)
        total_s = time.perf_counter() - t0
        prefill, *steps = sess.traces
        rounds = list(sess.rounds)
    return dict(out=out, token_ms=(total_s - prefill.wall_s) / new_tokens * 1e3,
                traversal_ms=statistics.median(t.wall_s for t in steps) * 1e3,
                per_traversal=SpeculationSummary.of(rounds).tokens_per_traversal if rounds else 1.0,
                trees=Counter(",".join(map(str, r.widths)) or "off" for r in rounds))

RTTS_MS = (5, 25, 75)
VARIANTS = {"plain": {}, "speculative": dict(assistant_model=draft)}
short = tok("def fibonacci(n):\n", return_tensors="pt").input_ids
results = {}
try:
    for rtt_ms in RTTS_MS:
        set_rtt(rtt_ms, cluster.client)
        results[rtt_ms] = {name: min((measure(short, **spec) for _ in range(2)), key=lambda r: r["token_ms"])
                           for name, spec in VARIANTS.items()}
finally:
    set_rtt(0, cluster.client)  # back to plain loopback
for rtt_ms, r in results.items():
    p, sp = r["plain"], r["speculative"]
    assert torch.equal(p["out"], sp["out"])   # exact on every link
    print(f"RTT {rtt_ms:3d} ms: plain {p['token_ms']:6.1f} ms per token ({p['traversal_ms']:5.1f} ms per traversal) | "
          f"speculative {sp['token_ms']:6.1f} ms per token ({sp['traversal_ms']:5.1f} ms per traversal, "
          f"{sp['per_traversal']:.2f} tokens each) → {p['token_ms'] / sp['token_ms']:.2f}×   trees: "
          + ", ".join(f"{t} ×{n}" for t, n in sp["trees"].most_common(3)))

# %%
fig = go.Figure()
for name, color in (("plain", "#8c9fb3"), ("speculative", green)):
    fig.add_scatter(x=list(RTTS_MS), y=[results[r][name]["token_ms"] for r in RTTS_MS], mode="lines+markers",
                    name=name, line=dict(color=color))
fig.add_scatter(x=list(RTTS_MS), y=[hops * r / 2 for r in RTTS_MS], mode="lines", name="one traversal's hops × RTT/2",
                line=dict(dash="dot", color="gray"))
for r in RTTS_MS:
    fig.add_annotation(x=r, y=results[r]["speculative"]["token_ms"], yshift=-14, showarrow=False,
                       text=f"{results[r]['plain']['token_ms'] / results[r]['speculative']['token_ms']:.1f}×")
fig.update_layout(title=f"per-token latency, {len(model.placement.stages)} stages, every link at the given RTT",
                  xaxis=dict(title="emulated RTT per link (ms)"), yaxis=dict(title="ms per token"), width=640, height=360)
show_figure(fig)

# %% [markdown]
# A traversal with a tree costs about what a plain one costs (the hops dominate), and it
# brings ~2–3 tokens instead of one, so the per-token latency falls by about the tokens per
# traversal once the link is slow. On a near-local link the gain is smaller: there the draft's
# forwards and the larger step are a real share of the round.
#
# The full numbers — 3 prompts × 40 tokens at 5, 50 and 100 ms, plain vs a Petals-style linear
# draft vs a fixed tree vs the link-aware tree, tokens per traversal, acceptance, tokens/s — are in
# `benchmarks/results/speculative.md` in the repository, written by
# `python benchmarks/bench_speculative.py`. At 100 ms the tree cut the per-token latency from
# 219 ms to 88 ms (2.5×; the linear draft: 2.0×), every variant token for token identical to plain
# greedy.
#
# ## Sampling: speculation that keeps the target's distribution
#
# When sampling, "the target's choice" is a random draw, so acceptance must be randomised too. At a
# node, with the target's distribution `p` and the draft's `q` (the children were drawn i.i.d. from
# `q`), try the children `x₁, x₂, …` in order (SpecInfer's multi-candidate rule, Miao et al. 2023):
#
# - accept `xᵢ` with probability `min(1, p(xᵢ) / q(xᵢ))` and continue from it;
# - otherwise replace `p` by the residual `norm(max(p − q, 0))` and try the next child;
# - if every child is rejected, sample the token from the last residual.
#
# One try emits `x` with probability `q(x)·min(1, p(x)/q(x)) = min(p, q)(x)` and otherwise hands on
# the residual, and `min(p, q) + (1 − Σ min(p, q))·norm(max(p − q, 0)) = p`: the token that leaves a
# try is distributed as that try's `p`. The next child, drawn from `q` independently, is tried against
# the residual in the same way, so by induction the token leaving the node follows the node's
# original `p` — whatever the draft proposes. A good draft only makes
# acceptance likelier. `accept_sampled` is that walk; here it runs 20,000 times on a 6-token
# vocabulary with a deliberately poor draft, and the first token out follows `p`, not `q`:

# %%
from bloombee_nb.generate.speculative import accept_sampled, children_of

p = torch.tensor([0.40, 0.25, 0.15, 0.10, 0.06, 0.04])   # the target after the root
q = torch.tensor([0.05, 0.45, 0.05, 0.35, 0.05, 0.05])   # the draft's guess
shape = branching_parents((2,))                         # a root with two sampled children
kids_of = children_of(shape)
gen = torch.Generator().manual_seed(0)
N, counts, hits = 20_000, torch.zeros(6), 0
for _ in range(N):
    drafted = torch.multinomial(q, 2, replacement=True, generator=gen).tolist()
    nodes = [0, *drafted]                                # node tokens (the root's own token is unused here)
    v = accept_sampled(p.expand(3, -1), q[None], nodes, kids_of, generator=gen)
    counts[nodes[v.path[1]] if v.accepted else v.token] += 1
    hits += v.accepted
freq = counts / N
print(f"a draft was accepted in {hits / N:.0%} of the trials; max |frequency − p| = {(freq - p).abs().max():.3f} "
      f"(the draft's q is off by up to {(q - p).abs().max():.2f})")
fig = go.Figure()
for name, values, color in (("target p", p, "#264653"), ("draft q", q, "#e9c46a"), ("speculative output", freq, green)):
    fig.add_bar(x=[f"token {i}" for i in range(6)], y=values.tolist(), name=name, marker_color=color)
fig.update_layout(title="first token out of multi-candidate speculative sampling", yaxis=dict(title="probability"),
                  width=640, height=320)
show_figure(fig)

# %% [markdown]
# On the chain, sampling uses the same call with `do_sample=True` (temperature, top-k and
# top-p apply to both models' distributions before acceptance). Sampled text cannot be compared token
# for token with another run, but its statistics can: acceptance is lower than greedy's, because a
# sampled draft token must agree with a sampled target token, not just share its argmax:

# %%
torch.manual_seed(0)
with model.inference_session(max_length=short.shape[1] + 32 + 96) as sess:
    sampled = model.generate(short, session=sess, assistant_model=draft, do_sample=True, temperature=0.8,
                             max_new_tokens=32)
    summary = SpeculationSummary.of(sess.rounds)
print(tok.decode(sampled[0, short.shape[1]:]))
print(f"--- sampled at temperature 0.8: acceptance rate {summary.acceptance_rate:.0%}, "
      f"{summary.tokens_per_traversal:.2f} tokens per traversal")

# %% [markdown]
# Clean up: disconnect frees the spans and stops the local cluster.
#
# Next: `05_multi_machine.ipynb` runs the workers as separate processes, as on separate machines.

# %%
# %bloombee disconnect

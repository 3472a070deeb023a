# %% [markdown]
# # 03 · Links and compression: fewer bytes, fewer trips
#
# A decentralized model is only as fast as the links between its machines. This notebook shows
# why, what the link map tells you, what lossless compression does to real hidden states and when
# it pays, how each link gets its own codec automatically, and why the hidden states should travel
# stage to stage (a *chain*) rather than back to the client after every stage (a *star*, as Petals
# does). Everything runs on this machine in about a minute; slow links are emulated.

# %%
# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/bloombee-nb/bloombee_nb@main")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)

# %% [markdown]
# ## Why the link dominates
#
# For every generated token, each hop of the chain carries the hidden states of the new
# position(s): `tokens × hidden size × bytes per value`. That is small — 1 KiB per token for the
# shipped model (256 wide, fp32), 16 KiB for a 70B Llama (8192 wide, bf16) — but every hop also
# pays half a round-trip time (RTT) no matter how few bytes it carries. One hop, one way, costs
# about `RTT/2 + bytes / bandwidth`:

# %%
import numpy as np
import plotly.graph_objects as go
from bloombee_nb.notebook.frontend import show_figure  # a static plotly figure (also on Colab)

def hop_ms(tokens, hidden, bytes_per_value, mbit_per_s, rtt_ms):
    """One hop, one way: half the round trip plus the bytes at the link's rate."""
    return rtt_ms / 2 + tokens * hidden * bytes_per_value * 8 / (mbit_per_s * 1e6) * 1e3

for name, d, b in (("shipped tiny-llama, fp32", 256, 4), ("70B Llama, bf16", 8192, 2)):
    print(f"{name:25s} {d * b / 1024:4.0f} KiB per token per hop")

mbits = np.logspace(0, 4, 81)  # 1 Mbit/s … 10 Gbit/s
fig = go.Figure()
for label, tokens in (("decode: 1 token", 1), ("prefill: 512-token prompt", 512)):
    fig.add_scatter(x=mbits, y=[hop_ms(tokens, 8192, 2, m, rtt_ms=50) for m in mbits], name=label)
fig.add_scatter(x=mbits, y=[25] * len(mbits), name="RTT/2 alone", line=dict(dash="dot", color="gray"))
fig.update_layout(title="one hop of a 70B model's hidden states on a 50 ms link", width=640, height=360,
                  xaxis=dict(type="log", title="link bandwidth (Mbit/s)"), yaxis=dict(type="log", title="ms per hop"))
show_figure(fig)

# %% [markdown]
# Two regimes:
#
# - **Decode** (one token at a time) is *latency-bound*: 16 KiB cross a 100 Mbit/s link in 1.3 ms,
#   but the round trip is paid on every hop of every token. What counts is **how many one-way
#   hops** a token makes — hence chain forwarding (below).
# - **Prefill** (the whole prompt at once) is *bandwidth-bound*: a 512-token prompt is 8 MiB per
#   hop, 0.7 s at 100 Mbit/s. Here **bytes** count — hence compression, on the links slow enough
#   for it to pay, and only there.
#
# ## The link map
#
# Start a local cluster of three workers with `--compression auto`, then draw the measured
# links: `%bloombee links` measures every worker and every ordered link (the client included,
# with real frames on the real path) and shows them, coloured by bandwidth.

# %%
# %load_ext bloombee_nb

# %%
# %bloombee connect local --workers 3 --compression auto

# %%
# %bloombee links

# %% [markdown]
# Hover an edge's midpoint for both directions' bandwidth and RTT. On one machine every
# link is loopback — gigabytes per second, well under a millisecond — so the codec each sender chose
# for its link (`model.link_codecs()`, by worker name; `client` is this notebook) is raw everywhere:
# compressing would cost more time than it saves.

# %%
from bloombee_nb.notebook import session

s = session()
cluster, model, profile = s.cluster, s.model, s.profile
for ln in profile.links:
    print(f"{ln.src:>6} → {ln.dst:<6} {ln.bandwidth_bytes_per_s * 8 / 1e9:6.1f} Gbit/s   RTT {ln.rtt_s * 1e3:.2f} ms")
model.link_codecs()

# %% [markdown]
# ## What lossless compression does to real hidden states
#
# Take what layer 3 of the shipped model hands to the next stage for a real prompt (the source of
# `textwrap` from the standard library), computed by plain `transformers`.

# %%
import inspect, textwrap
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bloombee_nb import transport
from bloombee_nb.shipped import default_model_path

path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)
reference = AutoModelForCausalLM.from_pretrained(path)  # the single-process model, for comparisons
ids = tok(inspect.getsource(textwrap), return_tensors="pt", truncation=True, max_length=512).input_ids
with torch.no_grad():
    hidden = reference(ids, output_hidden_states=True).hidden_states[3][0]  # [512 tokens, 256]
frame = transport.encode(hidden, "zstd-1+shuffle")  # a frame: header + blosc2-compressed bytes
assert torch.equal(transport.decode(frame), hidden)  # lossless: bit for bit
print(f"{hidden.numel() * 4 / 1024:.0f} KiB of fp32 hidden states → {len(frame) / 1024:.0f} KiB compressed")

# %% [markdown]
# The mantissa bytes of hidden states are close to random; what compresses is the high byte
# of each value (sign and exponent), which varies little. It is one byte in four for fp32 and one in
# two for bf16 (fp16's also carries mantissa bits). So ratios are modest: ~1.2× for fp32 and fp16,
# ~1.45× for bf16, the dtype large checkpoints ship in.
#
# `transport.calibrate_sizes` measures each candidate codec (and raw) on frames of growing size cut
# from a real sample — ratio, compress and decompress time, every round trip checked bit for bit.
# From those numbers `transport.break_even_bandwidth_Bps` gives the link speed below which a codec
# saves more transfer time than it costs: with `E`, `D` the encode and decode times and `w` the
# bytes on the wire, compressing with `c` pays when
#
#     β  <  β*_c = (w_raw − w_c) / (E_c + D_c − E_raw − D_raw)

# %%
stats = {"fp32": transport.calibrate_sizes(hidden),                      # this model
         "bf16": transport.calibrate_sizes(hidden.to(torch.bfloat16))}   # as large checkpoints ship
print(f"{'':5s} {'codec':18s} {'ratio':>6s} {'compress':>10s} {'decompress':>11s}   pays on links below")
for dtype, per_size in stats.items():
    prefill = per_size[3]                         # a 512-token frame
    raw = next(c for c in prefill if c.codec.is_raw)
    for c in prefill:
        if not c.codec.is_raw:
            beta = transport.break_even_bandwidth_Bps(c, raw)
            print(f"{dtype:5s} {str(c.codec):18s} {c.ratio:5.2f}× {c.encode_Bps / 1e6:6.0f} MB/s {c.decode_Bps / 1e6:7.0f} MB/s"
                  f"   {beta * 8 / 1e6:6.0f} Mbit/s")

# %% [markdown]
# The same numbers as a picture: how much faster a 512-token frame crosses a link when
# compressed (encode + transfer + decode against raw), by link bandwidth. Above 1 compressing pays;
# each curve crosses 1 at its break-even bandwidth.

# %%
fig = go.Figure()
mbits = np.logspace(0, 4, 81)
for (dtype, per_size), dash in zip(stats.items(), ("solid", "dash")):
    prefill = per_size[3]
    raw = next(c for c in prefill if c.codec.is_raw)
    for c in prefill:
        if not c.codec.is_raw:
            gain = [raw.time_s(m * 1e6 / 8) / c.time_s(m * 1e6 / 8) for m in mbits]
            fig.add_scatter(x=mbits, y=gain, name=f"{dtype} {c.codec}", line=dict(dash=dash))
fig.add_hline(y=1, line_dash="dot")
fig.update_layout(title="compressed vs raw, one 512-token frame", width=640, height=360,
                  xaxis=dict(type="log", title="link bandwidth (Mbit/s)"), yaxis=dict(title="speed-up (×)"))
show_figure(fig)

# %% [markdown]
# A sender does not pick one codec for a link, but one per frame size: a one-token decode
# frame is too small to gain (the compressed block's header costs more than it saves) while a
# prefill frame gains. `CodecPolicy.choose` makes that choice for a link's bandwidth:

# %%
for mbit in (10_000, 1_000, 100, 10):
    print(f"{mbit:>6} Mbit/s   fp32: {transport.CodecPolicy.choose(stats['fp32'], mbit * 1e6 / 8)}")
    print(f"{'':>13}   bf16: {transport.CodecPolicy.choose(stats['bf16'], mbit * 1e6 / 8)}")

# %% [markdown]
# ## Each link chooses its own codec
#
# With `compression="auto"` (which `--compression auto` above passed on to
# `DistributedModelForCausalLM.from_pretrained`), every sender — the client and each stage —
# calibrates the candidates on its own machine and picks, per link, the policy for that link's
# measured bandwidth. To see a slow link switch compression on, edit a copy of the measured profile
# (profiles are plain values): say the notebook sits behind a 10 Mbit/s, 40 ms home link, then let
# the model choose again with `choose_compression`.

# %%
from bloombee_nb.generate.deployment import choose_compression

names = [str(cluster.workers()[st.worker]["name"]) for st in model.placement.stages]  # profiles name workers by str
slow = (profile.with_link("client", names[0], bandwidth_bytes_per_s=10e6 / 8, rtt_s=0.040)
               .with_link(names[-1], "client", bandwidth_bytes_per_s=10e6 / 8, rtt_s=0.040))
choose_compression(model.chain, cluster, model.embed_tokens, slow)
model.link_codecs()

# %% [markdown]
# Only the client's two links compress (large frames; decode-sized frames stay raw), the
# stage-to-stage links stay raw. The link map with the model's chain drawn on it (an even split of
# the 6 layers, which is how the model was placed) labels each hop with its codec:

# %%
from bloombee_nb.notebook import figures
from bloombee_nb.plan import Workload, even_split

placed = even_split(slow, Workload(), micro_batches=(1,), offloads=(0.0,))  # describes the placement
assert placed.layer_spans == [(st.start, st.end) for st in model.placement.stages]
show_figure(figures.link_map(slow, placed, model.link_codecs()))

# %% [markdown]
# **Bit-exactness survives it.** Generate from a longer prompt — its prefill frame is large
# enough to be compressed on the client's link — and compare with plain `transformers`:

# %%
import json.decoder
prompt = tok(inspect.getsource(json.decoder), return_tensors="pt", truncation=True, max_length=300)
with model.inference_session(max_length=300 + 16) as sess:
    got = model.generate(**prompt, session=sess, max_new_tokens=16, do_sample=False)
    first = sess.traces[0]  # the prefill step
want = reference.generate(**prompt, max_new_tokens=16, do_sample=False)
assert torch.equal(got, want), "distributed output differs from transformers"
print(f"prefill of {first.tokens} tokens: {first.raw_bytes / 1024:.0f} KiB of hidden states over "
      f"{len(first.hop_wire_bytes)} hops, {first.wire_bytes / 1024:.0f} KiB on the wire; "
      "16 new tokens identical to transformers")

# %% [markdown]
# ## Chain vs star on a slow link
#
# How hidden states travel decides how many times a token pays the link's latency. With `N` stages:
#
# - **star** (Petals-style): the client sends to stage 1, gets the result back, sends it to stage 2,
#   … — `N` round trips, `2N` one-way hops per token;
# - **chain** (ours): the client sends to stage 1, each stage forwards to the next, the last one
#   answers the client — `N + 1` one-way hops per token.
#
# Three stages: 4 one-way hops instead of 6. To see it on this machine, the links get an emulated
# round-trip time: `set_rtt(ms, client)` makes the client and every worker hold each message they
# send for `ms / 2` (this kernel has no `netem`, so latency lives in the send path; see
# `bloombee_nb/transport/emulation.py`). A second model, relaying as a star with raw frames, shares
# the cluster with ours.

# %%
import statistics
import bloombee_nb as bb
from bloombee_nb.cluster.linkemu import set_rtt

star = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, relay="star")  # Petals-style, raw

def measure(m, prompt_ids, new_tokens=8):
    """Time to first token and the median decode step of one generation, from the session's traces."""
    with m.inference_session(max_length=prompt_ids.shape[1] + new_tokens) as sess:
        m.generate(prompt_ids, session=sess, max_new_tokens=new_tokens, do_sample=False)
        prefill, *steps = sess.traces
    def median(of):
        return statistics.median(of(t) for t in steps)
    return dict(ttft_ms=prefill.wall_s * 1e3, token_ms=median(lambda t: t.wall_s) * 1e3,
                compute_ms=median(lambda t: sum(t.stage_compute_s)) * 1e3,
                token_wire_bytes=median(lambda t: t.wire_bytes), prefill_wire_bytes=prefill.wire_bytes,
                prefill_raw_bytes=prefill.raw_bytes)

RTT_MS, N = 20, len(model.placement.stages)
short = ids[:, :32]
set_rtt(RTT_MS, cluster.client)
try:
    rtt_only = {"chain (ours)": measure(model, short), "star (Petals-style)": measure(star, short)}
finally:
    set_rtt(0, cluster.client)  # back to plain loopback
for (name, r), hops in zip(rtt_only.items(), (N + 1, 2 * N)):
    print(f"{name:20s} {r['token_ms']:6.1f} ms per token; links alone: {hops} hops × {RTT_MS / 2:.0f} ms = "
          f"{hops * RTT_MS / 2:.0f} ms, stages' compute {r['compute_ms']:.1f} ms")

# %%
fig = go.Figure()
labels = list(rtt_only)
floor = [(N + 1) * RTT_MS / 2, 2 * N * RTT_MS / 2]
fig.add_bar(x=labels, y=floor, name="one-way hops × RTT/2", marker_color="#8c9fb3")
fig.add_bar(x=labels, y=[r["compute_ms"] for r in rtt_only.values()], name="stages' compute", marker_color="#2a9d8f")
fig.add_bar(x=labels, y=[r["token_ms"] - f - r["compute_ms"] for r, f in zip(rtt_only.values(), floor)],
            name="runtime (messages, hand-offs)", marker_color="#e9c46a")
fig.update_layout(barmode="stack", title=f"per-token decode latency, {N} stages, every link {RTT_MS} ms RTT",
                  yaxis=dict(title="ms"), width=560, height=340)
show_figure(fig)

# %% [markdown]
# Now bandwidth too. `BLOOMBEE_EMULATED_MBIT` adds `bytes × 8 / rate` to the same send-path
# hold: an **in-process** bandwidth shaping that serialises each frame's time on the wire but does
# not model a link shared by concurrent transfers. With every link at 20 Mbit/s and 20 ms, our
# model measures its chain's links again (no profile given: it probes them now) and chooses codecs
# for what it measured; then a 300-token prompt goes through both models.

# %%
import os
from bloombee_nb.transport.emulation import ENV_MBIT

def set_mbit(mbit, client):
    """In-process bandwidth shaping of every participant's sends (0: off)."""
    def setenv(value=str(mbit)):
        os.environ[ENV_MBIT] = value
    setenv()
    client.run(setenv)

set_rtt(RTT_MS, cluster.client)
set_mbit(20, cluster.client)
try:
    choose_compression(model.chain, cluster, model.embed_tokens)  # measures the chain's links as they are now
    codecs = model.link_codecs()
    shaped = {"chain (ours)": measure(model, prompt.input_ids), "star (Petals-style)": measure(star, prompt.input_ids)}
finally:
    set_mbit(0, cluster.client)
    set_rtt(0, cluster.client)
for hop, codec in codecs.items():
    print(f"{' → '.join(hop):14s} {codec}")
for name, r in shaped.items():
    print(f"{name:20s} time to first token {r['ttft_ms']:5.0f} ms "
          f"({r['prefill_raw_bytes'] / 1024:.0f} KiB of hidden states → {r['prefill_wire_bytes'] / 1024:.0f} KiB on the wire), "
          f"{r['token_ms']:5.1f} ms per token")

# %% [markdown]
# The chain wins twice on the prompt: the hidden states cross 4 hops instead of 6, and the
# client's and stages' large frames go compressed. On decode the gain is the hops alone (1 KiB
# frames stay raw).
#
# **The real thing.** In-process holds are an approximation. `bloombee_nb/cluster/linkemu.py` builds
# an emulated WAN with the kernel's own shaping (root only): each worker in its own network
# namespace on a veth pair to a bridge, bandwidth shaped by `tc … tbf` on both ends, RTT held in
# the send path. `python benchmarks/bench_network.py` runs a grid on it with three stages — chain +
# `compression="auto"` against the Petals-style star with raw frames and against the physical bound
# (compute + one traversal of the links); the README's performance section has the table. Two of
# its rows, per-token latency ours / Petals / bound: 100 Mbit/s · 100 ms, 128-token prompt,
# batch 1: 221.9 / 322.2 / 207.5 ms; 12.5 Mbit/s · 50 ms, 512 tokens × batch 8: time to first
# token 10.5 s vs 17.8 s for the star.
#
# Clean up: free the second model's spans, and disconnect (which frees ours and stops the cluster).

# %%
star.close()
# %bloombee disconnect

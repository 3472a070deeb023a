"""Writes the tutorial notebooks from the cell sources below (outputs are never committed), and
the README's table of them.

    python tutorials/make_notebooks.py

Keeping the sources here makes diffs readable and guarantees the committed notebooks carry no
outputs; tests/tutorials runs every notebook top to bottom with a real kernel and checks that the
committed notebooks and the README table are what this script writes.
"""

from pathlib import Path

import nbformat

HERE = Path(__file__).parent
README = HERE.parent / "README.md"

#: Where the project is published, as GitHub's owner/name. No public repository is known yet: set
#: this when publishing, then rerun this script. The README's "Open in Colab" links and the
#: notebooks' Colab install cell point here (https://colab.research.google.com/github/<owner>/<repo>/blob/main/…).
COLAB_REPO = "bloombee-nb/bloombee_nb"
COLAB_BRANCH = "main"

COLAB_INSTALL = f'''# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/{COLAB_REPO}@{COLAB_BRANCH}")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)'''

QUICKSTART = [
    ("md", """# 01 · Quickstart: a model split across Dask workers

**Decentralized inference** runs a language model that no single machine can hold by cutting it
into contiguous *spans* of decoder layers, each hosted by a different machine (a *worker*).
Your notebook keeps the token embeddings and the LM head; for every token the hidden states
travel through the chain of workers and come back as logits.

Here everything runs on this machine: an embedded Dask `LocalCluster` whose worker processes
stand in for the lab boxes, spare desktops and Colab sessions of a real swarm, and the tiny
Llama that ships with the package (trained on the Python standard library)."""),
    ("code", COLAB_INSTALL),
    ("code", "%load_ext bloombee_nb"),
    ("md", """`%bloombee connect local` starts the cluster and places the shipped model on it — an even
split of its 6 layers over the workers. The panel shows who hosts what."""),
    ("code", "%bloombee connect local --workers 2"),
    ("md", """Generate: the cell body is the prompt, tokens stream in as they are produced. Greedy
decoding gives exactly the tokens plain `transformers` gives for the same checkpoint."""),
    ("code", "%%bloombee generate --max-new-tokens 24\ndef fibonacci(n):"),
    ("md", """The same from Python, with the `transformers` API you already know — and a check that the
distributed model agrees with the single-process one token for token:"""),
    ("code", """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bloombee_nb.notebook import state
from bloombee_nb.shipped import default_model_path

session = state.session()
tok = AutoTokenizer.from_pretrained(default_model_path())
ids = tok("import os\\n", return_tensors="pt")
distributed = session.model.generate(**ids, max_new_tokens=16, do_sample=False)
local = AutoModelForCausalLM.from_pretrained(default_model_path()).generate(**ids, max_new_tokens=16, do_sample=False)
assert torch.equal(distributed, local)
print(tok.decode(distributed[0], skip_special_tokens=True))"""),
    ("md", """Any OpenAI client can use the model too: `%bloombee serve` starts an OpenAI-compatible HTTP
server (`/v1/completions`, `/v1/chat/completions`, streaming) in the background of this kernel —
`--port 8000` for a fixed port, `--api-key KEY` to require a key; from a shell, `bloombee-nb serve`.
Every request is its own session on the workers, and concurrent requests decode together."""),
    ("code", "%bloombee serve --port 0 --out server"),
    ("code", """from openai import OpenAI

client = OpenAI(base_url=server.url, api_key="none")
for chunk in client.completions.create(model="tiny-llama", prompt="def fibonacci(n):", max_tokens=24,
                                       temperature=0, stream=True):
    print(chunk.choices[0].text, end="")"""),
    ("md", "The status panel lists the server and the requests it served; `disconnect` stops it first."),
    ("code", "%bloombee status"),
    ("code", "%bloombee disconnect"),
]

PLANNING = [
    ("md", """# 02 · Planning: who hosts which layers, and why

Over slow, uneven links the placement decides the speed. The planner measures the cluster
(each worker's time per layer, its memory, every link's bandwidth and round-trip time, with real
frames on the real path), then a dynamic program chooses the chain of workers, each one's span,
the micro-batch size and how much each stage offloads — for the least per-token latency or the
most tokens per second. Its recurrence is in `bloombee_nb/plan/dp.py`."""),
    ("code", COLAB_INSTALL),
    ("code", """import bloombee_nb as bb
from bloombee_nb.cluster.planning import runtime_plan
from bloombee_nb.cluster.profiling import profile_cluster
from bloombee_nb.plan import Workload, even_split, petals_greedy
from bloombee_nb.shipped import default_model_path

cluster = bb.connect(n_workers=3)
measured = profile_cluster(cluster, default_model_path())   # measured: layers, memory, links
measured"""),
    ("md", """On one machine every worker has plenty of memory, so the fastest plan puts all 6 layers on
one worker. In a real swarm each lender grants a budget; say each grants room for 3 layers with
the KV cache of a batch of 8 (a single sequence's smaller cache leaves room for a 4th layer), so
at least two workers are needed."""),
    ("code", """from bloombee_nb.plan import cost
room = cost.min_bytes_for(measured.model, Workload(batch=8), 3)
profile = measured
for w in measured.workers:
    profile = profile.with_worker(w.name, ram_bytes=room, disk_bytes=0)"""),
    ("md", """Plan for one user (latency) and for a batch of 8 (throughput). `runtime_plan` prices the
profile the way the runtime relays hidden states (stage to stage) and lets the DP choose the
spans, the micro-batch and each stage's offload fractions; `from_pretrained(plan=...)` applies
all three."""),
    ("code", """latency = runtime_plan(profile, Workload(batch=1, objective="latency"))
throughput = runtime_plan(profile, Workload(batch=8, objective="throughput"))
latency"""),
    ("md", """**What if one link were 10× slower?** Profiles are plain values: edit a copy and re-solve.
Here the first worker of the chain loses 90% of its links' bandwidth and gains 50 ms of round trip."""),
    ("code", """name = latency.stages[0].worker
slow = profile
for link in profile.links:
    if name in (link.src, link.dst):
        slow = slow.with_link(link.src, link.dst, bandwidth_bytes_per_s=link.bandwidth_bytes_per_s / 10,
                              rtt_s=link.rtt_s + 0.050)
replanned = runtime_plan(slow, Workload(batch=1, objective="latency"))
for label, plan in [("measured", latency), (f"worker {name} behind a slow link", replanned),
                    ("even split, slow link", even_split(slow, Workload(), micro_batches=(1,), offloads=(0.0,))),
                    ("Petals-style greedy, slow link", petals_greedy(slow, Workload(), micro_batches=(1,)))]:
    print(f"{label:32s} {plan.latency_s * 1e3:7.2f} ms/token   chain: "
          + " → ".join(f"{s.worker}[{s.start}–{s.end - 1}]" for s in plan.stages))
dict(replanned.reasons)"""),
    ("md", """Apply a plan: place the model's spans as the planner chose, then compare the predicted
per-token time with what the chain really takes (the session's traces)."""),
    ("code", """import statistics, torch
model = bb.DistributedModelForCausalLM.from_pretrained(default_model_path(), cluster=cluster, plan=latency)
ids = torch.randint(10, 4000, (1, 32), generator=torch.Generator().manual_seed(0))
with model.inference_session(max_length=96) as s:
    model.generate(ids, session=s, max_new_tokens=48, do_sample=False)
    measured = statistics.median(t.wall_s for t in list(s.traces)[1:])
print(f"predicted {latency.latency_s * 1e3:.2f} ms/token, measured {measured * 1e3:.2f} ms/token (chain only)")
model.close()
cluster.close()"""),
    ("md", """On this kind of machine the prediction is low by a few milliseconds per token: the cost
model prices compute, links and each stage's fixed step cost, but not every message the runtime
exchanges (see the README's performance section for the measured gap)."""),
]

LINKS = [
    ("md", """# 03 · Links and compression: fewer bytes, fewer trips

A decentralized model is only as fast as the links between its machines. This notebook shows
why, what the link map tells you, what lossless compression does to real hidden states and when
it pays, how each link gets its own codec automatically, and why the hidden states should travel
stage to stage (a *chain*) rather than back to the client after every stage (a *star*, as Petals
does). Everything runs on this machine in about a minute; slow links are emulated."""),
    ("code", COLAB_INSTALL),
    ("md", """## Why the link dominates

For every generated token, each hop of the chain carries the hidden states of the new
position(s): `tokens × hidden size × bytes per value`. That is small — 1 KiB per token for the
shipped model (256 wide, fp32), 16 KiB for a 70B Llama (8192 wide, bf16) — but every hop also
pays half a round-trip time (RTT) no matter how few bytes it carries. One hop, one way, costs
about `RTT/2 + bytes / bandwidth`:"""),
    ("code", """import numpy as np
import plotly.graph_objects as go
from bloombee_nb.notebook.frontend import show_figure  # a static plotly figure (also on Colab)

def hop_ms(tokens, hidden, bytes_per_value, mbit_per_s, rtt_ms):
    \"\"\"One hop, one way: half the round trip plus the bytes at the link's rate.\"\"\"
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
show_figure(fig)"""),
    ("md", """Two regimes:

- **Decode** (one token at a time) is *latency-bound*: 16 KiB cross a 100 Mbit/s link in 1.3 ms,
  but the round trip is paid on every hop of every token. What counts is **how many one-way
  hops** a token makes — hence chain forwarding (below).
- **Prefill** (the whole prompt at once) is *bandwidth-bound*: a 512-token prompt is 8 MiB per
  hop, 0.7 s at 100 Mbit/s. Here **bytes** count — hence compression, on the links slow enough
  for it to pay, and only there.

## The link map

Start a local cluster of three workers with `--compression auto`, then draw the measured
links: `%bloombee links` measures every worker and every ordered link (the client included,
with real frames on the real path) and shows them, coloured by bandwidth."""),
    ("code", "%load_ext bloombee_nb"),
    ("code", "%bloombee connect local --workers 3 --compression auto"),
    ("code", "%bloombee links"),
    ("md", """Hover an edge's midpoint for both directions' bandwidth and RTT. On one machine every
link is loopback — gigabytes per second, well under a millisecond — so the codec each sender chose
for its link (`model.link_codecs()`, by worker name; `client` is this notebook) is raw everywhere:
compressing would cost more time than it saves."""),
    ("code", """from bloombee_nb.notebook import session

s = session()
cluster, model, profile = s.cluster, s.model, s.profile
for ln in profile.links:
    print(f"{ln.src:>6} → {ln.dst:<6} {ln.bandwidth_bytes_per_s * 8 / 1e9:6.1f} Gbit/s   RTT {ln.rtt_s * 1e3:.2f} ms")
model.link_codecs()"""),
    ("md", """## What lossless compression does to real hidden states

Take what layer 3 of the shipped model hands to the next stage for a real prompt (the source of
`textwrap` from the standard library), computed by plain `transformers`."""),
    ("code", """import inspect, textwrap
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
print(f"{hidden.numel() * 4 / 1024:.0f} KiB of fp32 hidden states → {len(frame) / 1024:.0f} KiB compressed")"""),
    ("md", """The mantissa bytes of hidden states are close to random; what compresses is the high byte
of each value (sign and exponent), which varies little. It is one byte in four for fp32 and one in
two for bf16 (fp16's also carries mantissa bits). So ratios are modest: ~1.2× for fp32 and fp16,
~1.45× for bf16, the dtype large checkpoints ship in.

`transport.calibrate_sizes` measures each candidate codec (and raw) on frames of growing size cut
from a real sample — ratio, compress and decompress time, every round trip checked bit for bit.
From those numbers `transport.break_even_bandwidth_Bps` gives the link speed below which a codec
saves more transfer time than it costs: with `E`, `D` the encode and decode times and `w` the
bytes on the wire, compressing with `c` pays when

    β  <  β*_c = (w_raw − w_c) / (E_c + D_c − E_raw − D_raw)"""),
    ("code", """stats = {"fp32": transport.calibrate_sizes(hidden),                      # this model
         "bf16": transport.calibrate_sizes(hidden.to(torch.bfloat16))}   # as large checkpoints ship
print(f"{'':5s} {'codec':18s} {'ratio':>6s} {'compress':>10s} {'decompress':>11s}   pays on links below")
for dtype, per_size in stats.items():
    prefill = per_size[3]                         # a 512-token frame
    raw = next(c for c in prefill if c.codec.is_raw)
    for c in prefill:
        if not c.codec.is_raw:
            beta = transport.break_even_bandwidth_Bps(c, raw)
            print(f"{dtype:5s} {str(c.codec):18s} {c.ratio:5.2f}× {c.encode_Bps / 1e6:6.0f} MB/s {c.decode_Bps / 1e6:7.0f} MB/s"
                  f"   {beta * 8 / 1e6:6.0f} Mbit/s")"""),
    ("md", """The same numbers as a picture: how much faster a 512-token frame crosses a link when
compressed (encode + transfer + decode against raw), by link bandwidth. Above 1 compressing pays;
each curve crosses 1 at its break-even bandwidth."""),
    ("code", """fig = go.Figure()
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
show_figure(fig)"""),
    ("md", """A sender does not pick one codec for a link, but one per frame size: a one-token decode
frame is too small to gain (the compressed block's header costs more than it saves) while a
prefill frame gains. `CodecPolicy.choose` makes that choice for a link's bandwidth:"""),
    ("code", """for mbit in (10_000, 1_000, 100, 10):
    print(f"{mbit:>6} Mbit/s   fp32: {transport.CodecPolicy.choose(stats['fp32'], mbit * 1e6 / 8)}")
    print(f"{'':>13}   bf16: {transport.CodecPolicy.choose(stats['bf16'], mbit * 1e6 / 8)}")"""),
    ("md", """## Each link chooses its own codec

With `compression="auto"` (which `--compression auto` above passed on to
`DistributedModelForCausalLM.from_pretrained`), every sender — the client and each stage —
calibrates the candidates on its own machine and picks, per link, the policy for that link's
measured bandwidth. To see a slow link switch compression on, edit a copy of the measured profile
(profiles are plain values): say the notebook sits behind a 10 Mbit/s, 40 ms home link, then let
the model choose again with `choose_compression`."""),
    ("code", """from bloombee_nb.generate.model import choose_compression

names = [str(cluster.workers()[st.worker]["name"]) for st in model.placement.stages]  # profiles name workers by str
slow = (profile.with_link("client", names[0], bandwidth_bytes_per_s=10e6 / 8, rtt_s=0.040)
               .with_link(names[-1], "client", bandwidth_bytes_per_s=10e6 / 8, rtt_s=0.040))
choose_compression(model.chain, cluster, model.embed_tokens, slow)
model.link_codecs()"""),
    ("md", """Only the client's two links compress (large frames; decode-sized frames stay raw), the
stage-to-stage links stay raw. The link map with the model's chain drawn on it (an even split of
the 6 layers, which is how the model was placed) labels each hop with its codec:"""),
    ("code", """from bloombee_nb.notebook import figures
from bloombee_nb.plan import Workload, even_split

placed = even_split(slow, Workload(), micro_batches=(1,), offloads=(0.0,))  # describes the placement
assert placed.layer_spans == [(st.start, st.end) for st in model.placement.stages]
show_figure(figures.link_map(slow, placed, model.link_codecs()))"""),
    ("md", """**Bit-exactness survives it.** Generate from a longer prompt — its prefill frame is large
enough to be compressed on the client's link — and compare with plain `transformers`:"""),
    ("code", """import json.decoder
prompt = tok(inspect.getsource(json.decoder), return_tensors="pt", truncation=True, max_length=300)
with model.inference_session(max_length=300 + 16) as sess:
    got = model.generate(**prompt, session=sess, max_new_tokens=16, do_sample=False)
    first = sess.traces[0]  # the prefill step
want = reference.generate(**prompt, max_new_tokens=16, do_sample=False)
assert torch.equal(got, want), "distributed output differs from transformers"
print(f"prefill of {first.tokens} tokens: {first.raw_bytes / 1024:.0f} KiB of hidden states over "
      f"{len(first.hop_wire_bytes)} hops, {first.wire_bytes / 1024:.0f} KiB on the wire; "
      "16 new tokens identical to transformers")"""),
    ("md", """## Chain vs star on a slow link

How hidden states travel decides how many times a token pays the link's latency. With `N` stages:

- **star** (Petals-style): the client sends to stage 1, gets the result back, sends it to stage 2,
  … — `N` round trips, `2N` one-way hops per token;
- **chain** (ours): the client sends to stage 1, each stage forwards to the next, the last one
  answers the client — `N + 1` one-way hops per token.

Three stages: 4 one-way hops instead of 6. To see it on this machine, the links get an emulated
round-trip time: `set_rtt(ms, client)` makes the client and every worker hold each message they
send for `ms / 2` (this kernel has no `netem`, so latency lives in the send path; see
`bloombee_nb/transport/emulation.py`). A second model, relaying as a star with raw frames, shares
the cluster with ours."""),
    ("code", """import statistics
import bloombee_nb as bb
from bloombee_nb.cluster.linkemu import set_rtt

star = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster, relay="star")  # Petals-style, raw

def measure(m, prompt_ids, new_tokens=8):
    \"\"\"Time to first token and the median decode step of one generation, from the session's traces.\"\"\"
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
          f"{hops * RTT_MS / 2:.0f} ms, stages' compute {r['compute_ms']:.1f} ms")"""),
    ("code", """fig = go.Figure()
labels = list(rtt_only)
floor = [(N + 1) * RTT_MS / 2, 2 * N * RTT_MS / 2]
fig.add_bar(x=labels, y=floor, name="one-way hops × RTT/2", marker_color="#8c9fb3")
fig.add_bar(x=labels, y=[r["compute_ms"] for r in rtt_only.values()], name="stages' compute", marker_color="#2a9d8f")
fig.add_bar(x=labels, y=[r["token_ms"] - f - r["compute_ms"] for r, f in zip(rtt_only.values(), floor)],
            name="runtime (messages, hand-offs)", marker_color="#e9c46a")
fig.update_layout(barmode="stack", title=f"per-token decode latency, {N} stages, every link {RTT_MS} ms RTT",
                  yaxis=dict(title="ms"), width=560, height=340)
show_figure(fig)"""),
    ("md", """Now bandwidth too. `BLOOMBEE_EMULATED_MBIT` adds `bytes × 8 / rate` to the same send-path
hold: an **in-process** bandwidth shaping that serialises each frame's time on the wire but does
not model a link shared by concurrent transfers. With every link at 20 Mbit/s and 20 ms, our
model measures its chain's links again (no profile given: it probes them now) and chooses codecs
for what it measured; then a 300-token prompt goes through both models."""),
    ("code", """import os
from bloombee_nb.transport.emulation import ENV_MBIT

def set_mbit(mbit, client):
    \"\"\"In-process bandwidth shaping of every participant's sends (0: off).\"\"\"
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
          f"{r['token_ms']:5.1f} ms per token")"""),
    ("md", """The chain wins twice on the prompt: the hidden states cross 4 hops instead of 6, and the
client's and stages' large frames go compressed. On decode the gain is the hops alone (1 KiB
frames stay raw).

**The real thing.** In-process holds are an approximation. `bloombee_nb/cluster/linkemu.py` builds
an emulated WAN with the kernel's own shaping (root only): each worker in its own network
namespace on a veth pair to a bridge, bandwidth shaped by `tc … tbf` on both ends, RTT held in
the send path. `python benchmarks/bench_network.py` runs a grid on it with three stages — chain +
`compression="auto"` against the Petals-style star with raw frames and against the physical bound
(compute + one traversal of the links); the README's performance section has the table. Two of
its rows, per-token latency ours / Petals / bound: 100 Mbit/s · 100 ms, 128-token prompt,
batch 1: 221.9 / 322.2 / 207.5 ms; 12.5 Mbit/s · 50 ms, 512 tokens × batch 8: time to first
token 10.5 s vs 17.8 s for the star.

Clean up: free the second model's spans, and disconnect (which frees ours and stops the cluster)."""),
    ("code", """star.close()
%bloombee disconnect"""),
]

SPECULATIVE = [
    ("md", """# 04 · Speculative decoding: several tokens per trip through the chain

Every token a distributed model generates costs one *traversal* of the chain: the newest
token's hidden states go from the notebook to stage 1, each stage forwards to the next, the last
one answers the notebook. With 3 stages that is 4 one-way hops, so on links with a 50 ms
round-trip time (RTT) a token waits ~100 ms on the network alone — while the stages sit idle.

**Speculative decoding** buys several tokens with one traversal. A small *draft* model, running
here in the notebook, guesses the next few tokens — not one guess per position but a *tree* of
alternatives. The chain runs the whole tree in a single traversal (11 tokens cost about what one
costs when the link's latency dominates), and the target's logits at every node of the tree say
which guesses it agrees with. The agreed ones are kept, the rest leave nothing behind, and the
output is exactly what the target alone produces.

This notebook shows the shipped target/draft pair, a token tree and its attention mask, greedy
speculation checked token for token against `transformers`, acceptance and tokens per traversal,
how the tree size follows the link, the speed-up on emulated slow links, and sampling that keeps
the target's distribution. It runs on a CPU in about a minute."""),
    ("code", COLAB_INSTALL),
    ("md", """## Target and draft

The target is the shipped `tiny-llama` (6 layers), split over three local workers — 2 layers
each. The draft is the shipped `tiny-llama-draft`: 2 narrower layers, 5× fewer parameters, the
same tokenizer, trained on the same Python standard library. On held-out code it picks the
target's next greedy token about half the time. Any small causal LM that shares the target's
tokenizer can be the draft; `load_draft(path)` loads one once per path (no path: the shipped
draft)."""),
    ("code", "%load_ext bloombee_nb"),
    ("code", "%bloombee connect local --workers 3"),
    ("code", """import torch
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
          f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters")"""),
    ("md", """## A token tree

The tree is described by its *widths*: `(2, 2, 1)` gives the root 2 children (the draft's two
likeliest next tokens), each of them 2, and each of those 1 — 1 + 2 + 4 + 4 = 11 nodes. The root
is the last token the target chose, not yet in any KV cache. `branching_parents` flattens the
tree breadth-first into one tensor: each node's parent, `-1` for the root.

Here the draft grows a tree after `import os⏎import` (with plain `transformers` and the whole
context each time, to keep it readable; the library runs the draft with its own KV cache, one
forward per level of the tree):"""),
    ("code", """from bloombee_nb._kernels import TokenTree, branching_parents

prompt = tok("import os\\nimport", return_tensors="pt").input_ids      # [1, P]
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
print("tokens: ", [tok.decode([t]) for t in tokens])"""),
    ("md", """Which branch does the target agree with? On the chain, the target's logits at all 11
nodes come from one traversal; greedy verification then walks down from the root, moving to the
child that carries the target's own choice, and stops where no child does — emitting the target's
token there instead. So a traversal yields *accepted drafts + 1* tokens, and each of them is what
greedy decoding with the target alone gives (here the target's greedy continuation from plain
`transformers` stands in for the chain's logits):"""),
    ("code", """want = reference.generate(prompt, max_new_tokens=len(widths) + 1, do_sample=False)[0, prompt.shape[1]:].tolist()
P, path = parents.tolist(), [0]
for t in want:                                # move to the child holding the target's token, if any
    hit = [c for c in range(tree.size) if P[c] == path[-1] and tokens[c] == t]
    if not hit:
        break
    path += hit
accepted = [tok.decode([tokens[n]]) for n in path[1:]]
print(f"target's greedy tokens: {[tok.decode([t]) for t in want]}")
print(f"accepted path {path}: drafts {accepted} + the target's own {tok.decode([want[len(path) - 1]])!r} "
      f"= {len(path)} tokens from one traversal")"""),
    ("code", """import plotly.graph_objects as go
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
show_figure(fig)"""),
    ("md", """The draft's first guess at depth 1 was wrong and its second right: that is what width
buys — a linear draft (widths `(1, 1, 1)`) would have kept nothing here.

## The tree-attention mask

All 11 nodes go through each stage as one step of 11 positions, but they are alternative
futures, not a sentence: a node may attend to the cached context and to its own ancestors, never
to a sibling or a cousin. `tree_attention_mask(parents, past_len)` (also `tree.attention_mask`)
is that mask, and positions are the root's position plus the depth, so siblings share a position.
The stages hand exactly this mask to the model family's own decoder layers. The cache holds the
prompt but its last token (the root):"""),
    ("code", """import html

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
print("position ids of the nodes:", tree.position_ids(past).tolist())"""),
    ("md", """After verification every stage keeps the KV entries of the accepted path only — compacted
in place (`bloombee_nb._kernels.compact_kv`) together with the next step, so keeping costs no
extra trip — and the rejected branches leave nothing behind.

## Speculative `generate`, exact

`model.generate(..., assistant_model=draft)` follows the `transformers` convention for
assisted generation; `tree_widths` fixes the tree (the default, `"auto"`, chooses it per round —
below). Greedy speculation must give exactly plain greedy's tokens, whatever the draft proposes:"""),
    ("code", """from bloombee_nb.generate.speculative import SpeculationSummary

NEW = 48
ids = tok("class Queue:\\n    def __init__(self, maxsize=0):\\n", return_tensors="pt")
with model.inference_session(max_length=ids.input_ids.shape[1] + NEW + tree.size) as sess:
    fast = model.generate(**ids, session=sess, assistant_model=draft, tree_widths=widths,
                          max_new_tokens=NEW, do_sample=False)
    rounds, traces = list(sess.rounds), list(sess.traces)
plain = reference.generate(**ids, max_new_tokens=NEW, do_sample=False)
assert torch.equal(fast, plain), "speculative output differs from transformers"
print(tok.decode(fast[0], skip_special_tokens=True))
print(f"--- {NEW} new tokens, identical to transformers' greedy, in {len(rounds)} traversals of the chain")"""),
    ("md", """The session records one `RoundTrace` per traversal in `session.rounds`: the tree sent
(`widths`, `tree_tokens`), the drafts each row `accepted`, and the time spent drafting, verifying
and in the whole round. `SpeculationSummary.of(rounds)` turns them into the numbers the generation
panel shows: the **acceptance rate** (accepted drafts / drafted depth), its value per depth (the
chance to go one level deeper, having reached it), and **tokens per traversal** (accepted + 1; plain
decoding makes 1):"""),
    ("code", """from bloombee_nb.generate.speculative import remembered_stats

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
show_figure(fig)"""),
    ("md", """## In the notebook: `%%bloombee generate --speculative`

The magic takes the shipped draft for the shipped model (`--draft PATH` for another, `--tree 2,2,1`
to fix the tree instead of choosing it per round) and adds the acceptance rate and tokens per
traversal to its summary; in JupyterLab the generation panel updates them live. On this loopback
"link" a traversal is cheap, so the link-aware tree stays small (or, for some rounds, off):"""),
    ("code", "%%bloombee generate --speculative --max-new-tokens 32\ndef parse_args(argv):"),
    ("md", """## How big a tree? It depends on the link

A bigger tree makes more tokens per traversal likelier, but costs draft forwards and more tokens
through every stage and link. With `tree_widths="auto"` (the default) the generation re-chooses
the tree every round (`bloombee_nb/generate/tree_size.py`) to maximise tokens per second,

    rate(widths) = E[accepted + 1] / (traversal_s(T) + draft_s(widths)),    T = nodes of the tree

from measured numbers (a `ChainCost`): the link's latency and per-token wire time, the stages'
compute as a line in T, the draft's time per level; and `E[accepted + 1]` from the running
acceptance per depth and candidate (`AcceptanceStats`). `widths = ()` is plain decoding: it wins —
speculation switches itself off — when the extra tree tokens cost more than the traversals they
save, e.g. when a large batch already fills the stages' compute.

What the policy sees of this chain, fitted from the traces of the generation above:"""),
    ("code", """from bloombee_nb.generate.tree_size import ChainCost, StepSample, chain_cost, choose_widths

here = chain_cost([StepSample(t.tokens, t.wall_s, sum(t.stage_compute_s)) for t in traces])
print(f"this chain, from the session's traces: {here.link_s * 1e3 + here.compute_s * 1e3:.1f} ms per traversal "
      f"+ {(here.compute_per_token_s + here.link_per_token_s) * 1e3:.2f} ms per tree token")"""),
    ("md", """To see the trade-off, take a chain where compute is real: three GPU machines hosting a
70B-class model (the numbers below are illustrative: 30 ms of fixed compute per step, reading the
weights; 0.5 ms per token of every sequence; 16 KiB of bf16 hidden states per token and sequence
on 1 Gbit/s links; a draft at 5 ms per level), with the acceptance this pair measured in the
greedy generation above (`stats`). Vary the links' RTT and the batch:"""),
    ("code", """hops = len(model.placement.stages) + 1   # one-way hops of one traversal

def big_chain(rtt_ms, batch):
    \"\"\"Seconds of a round on the illustrative 70B chain, every link at rtt_ms, `batch` sequences.\"\"\"
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
    print(f"{batch:5d} " + "".join(f"{cell:>25}" for cell in row))"""),
    ("md", """Read it along a row: the longer the RTT, the dearer each traversal, so deeper and wider
trees pay. Down a column: with more sequences in the batch, every extra tree token costs real
compute and wire time for all of them, so the tree shrinks to a linear draft — and with a fast
link and a full batch, speculation switches off. During a generation the policy makes this choice
every round from the session's own traces (and, while off, sends a small tree every few rounds to
keep measuring the acceptance).

## Speed-up vs link latency

Now measured: every participant (the notebook and each worker) holds each message it sends for
RTT/2 (`set_rtt(ms, client)`; the same send-path emulation as in `03_compression_and_links`), and
each setting generates 16 tokens with and without speculation (`tree_widths="auto"`), twice, keeping
the faster run (this machine is shared: a run can catch a pause). Per-token latency leaves out the
prompt's own trip:"""),
    ("code", """import statistics, time
from collections import Counter
from bloombee_nb.cluster.linkemu import set_rtt

def measure(prompt_ids, new_tokens=16, **speculation):
    \"\"\"Per-token latency after the prompt, traversals, and the trees sent, for one greedy generation.\"\"\"
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
short = tok("def fibonacci(n):\\n", return_tensors="pt").input_ids
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
          + ", ".join(f"{t} ×{n}" for t, n in sp["trees"].most_common(3)))"""),
    ("code", """fig = go.Figure()
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
show_figure(fig)"""),
    ("md", """A traversal with a tree costs about what a plain one costs (the hops dominate), and it
brings ~2–3 tokens instead of one, so the per-token latency falls by about the tokens per
traversal once the link is slow. On a near-local link the gain is smaller: there the draft's
forwards and the larger step are a real share of the round.

The full numbers — 3 prompts × 40 tokens at 5, 50 and 100 ms, plain vs a Petals-style linear
draft vs a fixed tree vs the link-aware tree, tokens per traversal, acceptance, tokens/s — are in
`benchmarks/results/speculative.md` in the repository, written by
`python benchmarks/bench_speculative.py`. At 100 ms the tree cut the per-token latency from
219 ms to 88 ms (2.5×; the linear draft: 2.0×), every variant token for token identical to plain
greedy.

## Sampling: speculation that keeps the target's distribution

When sampling, "the target's choice" is a random draw, so acceptance must be randomised too. At a
node, with the target's distribution `p` and the draft's `q` (the children were drawn i.i.d. from
`q`), try the children `x₁, x₂, …` in order (SpecInfer's multi-candidate rule, Miao et al. 2023):

- accept `xᵢ` with probability `min(1, p(xᵢ) / q(xᵢ))` and continue from it;
- otherwise replace `p` by the residual `norm(max(p − q, 0))` and try the next child;
- if every child is rejected, sample the token from the last residual.

One try emits `x` with probability `q(x)·min(1, p(x)/q(x)) = min(p, q)(x)` and otherwise hands on
the residual, and `min(p, q) + (1 − Σ min(p, q))·norm(max(p − q, 0)) = p`: the token that leaves a
try is distributed as that try's `p`. The next child, drawn from `q` independently, is tried against
the residual in the same way, so by induction the token leaving the node follows the node's
original `p` — whatever the draft proposes. A good draft only makes
acceptance likelier. `accept_sampled` is that walk; here it runs 20,000 times on a 6-token
vocabulary with a deliberately poor draft, and the first token out follows `p`, not `q`:"""),
    ("code", """from bloombee_nb.generate.speculative import accept_sampled, children_of

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
show_figure(fig)"""),
    ("md", """On the chain, sampling uses the same call with `do_sample=True` (temperature, top-k and
top-p apply to both models' distributions before acceptance). Sampled text cannot be compared token
for token with another run, but its statistics can: acceptance is lower than greedy's, because a
sampled draft token must agree with a sampled target token, not just share its argmax:"""),
    ("code", """torch.manual_seed(0)
with model.inference_session(max_length=short.shape[1] + 32 + 96) as sess:
    sampled = model.generate(short, session=sess, assistant_model=draft, do_sample=True, temperature=0.8,
                             max_new_tokens=32)
    summary = SpeculationSummary.of(sess.rounds)
print(tok.decode(sampled[0, short.shape[1]:]))
print(f"--- sampled at temperature 0.8: acceptance rate {summary.acceptance_rate:.0%}, "
      f"{summary.tokens_per_traversal:.2f} tokens per traversal")"""),
    ("md", """Clean up: disconnect frees the spans and stops the local cluster.

Next: `05_multi_machine.ipynb` runs the workers as separate processes, as on separate machines."""),
    ("code", "%bloombee disconnect"),
]

MULTI = [
    ("md", f"""# 05 · Several machines: a scheduler, workers that join, and TLS

So far every worker ran on this machine. A real deployment spreads them over machines that
lend memory and compute — lab boxes, spare desktops with a GPU, cloud VMs — and drives them from
a notebook anywhere. Three roles, all plain Dask:

- the **scheduler**: the directory of who is alive and who hosts what (one per cluster, on a
  machine everyone can reach);
- **workers**: one per lending machine (`bloombee-nb worker`), each hosting spans of layers;
- the **client**: this notebook, which holds the embeddings and the LM head and drives generation.

On real machines you type:

```bash
# machine A, reachable by everyone (port 8786 for Dask, 8787 for its dashboard):
dask scheduler                                   # prints: Scheduler at: tcp://<A>:8786
# every machine that lends memory/compute (the same bloombee_nb and transformers versions everywhere):
pip install "bloombee_nb[notebook] @ git+https://github.com/{COLAB_REPO}"
bloombee-nb worker tcp://<A>:8786 --name lab-gpu-1
```

`bloombee-nb worker` is a Dask worker with one thread that leaves cleanly on Ctrl-C or SIGTERM.
Its options: `--name` (how the planner and the link map call it), `--listen` (the address it listens
on, default: the one facing the scheduler), `--nthreads`, `--memory-limit`, and `--host MODEL` to
lend it to the swarm: it hosts a span of MODEL for every client (and only the models named with
`--host`/`--allow`). Workers must reach
the scheduler *and each other* (stages forward hidden states straight to the next stage).

Below, the same commands run for real on this machine, on 127.0.0.1, started from the notebook."""),
    ("code", COLAB_INSTALL),
    ("code", """import atexit, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

work = Path(tempfile.mkdtemp(prefix="bloombee-05-"))  # logs, scheduler file, certificates

def cli(name):
    \"\"\"The console script `name` (dask, bloombee-nb) installed with this Python.\"\"\"
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

started = []

def start(*cmd, log):
    \"\"\"Run a command in the background, as in its own terminal; its output goes to a log file.\"\"\"
    started.append(subprocess.Popen([str(c) for c in cmd], stdout=open(work / log, "w"), stderr=subprocess.STDOUT))
    return started[-1]

atexit.register(lambda: [p.kill() for p in started if p.poll() is None])  # if the kernel stops first

def wait_for_file(path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear; see the logs in {work}")
        time.sleep(0.2)
    return json.loads(path.read_text())"""),
    ("md", """Start the scheduler. Here it takes any free port (`--port 0`) and writes its address to a
file, so this notebook never collides with something else on port 8786."""),
    ("code", """scheduler = start(cli("dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                  "--scheduler-file", work / "scheduler.json", log="scheduler.log")
address = wait_for_file(work / "scheduler.json")["address"]
address"""),
    ("md", """Join two workers, as two other machines would:"""),
    ("code", """workers = [start(cli("bloombee-nb"), "worker", address, "--name", f"box-{i}", "--listen", "127.0.0.1",
                 log=f"worker-{i}.log") for i in range(2)]"""),
    ("md", """Connect the notebook. `direct_to_workers=False` sends every call through the scheduler:
that is what a notebook behind NAT needs — a Colab runtime, a laptop on home Wi-Fi — since the
workers cannot open connections back to it; it only has to reach the scheduler's port. (Such a
notebook can be the client, not a worker.) Where the notebook can reach the workers directly,
leave the default (`True`): each call then skips a hop through the scheduler."""),
    ("code", """import bloombee_nb as bb

cluster = bb.connect(address, direct_to_workers=False)
cluster.wait_for_workers(2, timeout_s=120)
cluster"""),
    ("md", """Place the shipped model on them — an even split, 3 layers per worker — and generate.
Each worker reads only its own span from its own copy of the checkpoint (here the same folder;
on real machines a path that exists on each, or a Hub id)."""),
    ("code", """import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from bloombee_nb.shipped import default_model_path

path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster)
ids = tok("class Stack:\\n    def __init__(self):\\n", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=24, do_sample=False, streamer=TextStreamer(tok, skip_special_tokens=True))
local = AutoModelForCausalLM.from_pretrained(path).generate(**ids, max_new_tokens=24, do_sample=False)
assert torch.equal(out, local)  # token for token what one process computes
model"""),
    ("md", """The cluster's panel now shows which worker hosts which layers (in Jupyter it is a table;
the Dask dashboard, when `bokeh` is installed, shows the same workers live):"""),
    ("code", """cluster"""),
    ("md", """The `%bloombee` magics connect to a running scheduler the same way
(`--through-scheduler` is `direct_to_workers=False`, automatic on Colab), place the model, and
show the status panel:"""),
    ("code", """%load_ext bloombee_nb
%bloombee connect {address} --through-scheduler"""),
    ("code", "%%bloombee generate --max-new-tokens 16\ndef parse_args(argv):"),
    ("code", "%bloombee status"),
    ("code", "%bloombee disconnect"),
    ("md", """`disconnect` frees the magics' model and closes their client; the scheduler and workers
keep running — they are not the notebook's to stop.

## A model from the Hugging Face Hub

When the machines have internet, pass a Hub id instead of a folder. The notebook and each worker
download the checkpoint's files into their own Hugging Face cache (set `HF_TOKEN` on every machine
for gated models); each worker then reads only the tensors of its own span. Llama, Mistral, Qwen2 and Qwen3
checkpoints are supported. Set `HUB_MODEL` to try it — it is left unset here, where nothing may
be downloaded:"""),
    ("code", """HUB_MODEL = None  # e.g. "Qwen/Qwen2.5-0.5B-Instruct" (or "Qwen/Qwen3-0.6B")

if HUB_MODEL:
    hub = bb.DistributedModelForCausalLM.from_pretrained(HUB_MODEL, cluster=cluster, compression="auto")
    hub_tok = AutoTokenizer.from_pretrained(HUB_MODEL)
    chat = hub_tok.apply_chat_template([{"role": "user", "content": "Explain a Dask actor in two sentences."}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hub.generate(**chat, max_new_tokens=64, do_sample=False,
                 streamer=TextStreamer(hub_tok, skip_prompt=True, skip_special_tokens=True))
    hub.close()
else:
    print("HUB_MODEL is not set: skipped (no downloads here)")"""),
    ("md", """Shut down: free the spans, close the client, then stop the workers and the scheduler the
way you would stop them on their machines (SIGTERM, i.e. Ctrl-C; a worker leaves cleanly and
exits with 0)."""),
    ("code", """model.close()
cluster.close()
for w in workers:
    w.terminate()
print("workers exited with", [w.wait(60) for w in workers])
scheduler.terminate()
print("scheduler exited with", scheduler.wait(60))
print(next(line for line in (work / "worker-0.log").read_text().splitlines() if "joined" in line))"""),
    ("md", """## Who can do what in a cluster — and TLS

Be clear about the trust model before opening a port to the internet. **A Dask cluster is one
trust domain:**

- anyone whose client can connect to the scheduler can run any Python code on every worker
  (`client.run`, `client.submit`), with the rights of the user the worker runs as — read its
  files, use its GPU, reach its network;
- the scheduler makes workers run code: that is its job;
- a worker sees the hidden states of the layers it hosts (prompts can largely be recovered from
  them) and could return wrong results; nothing in Dask stops a member from lying.

So: join only machines you trust, let only people you trust connect, run workers as an
unprivileged user, and never expose a plain `tcp://` scheduler on an open network. TLS with
mutual authentication keeps everyone else out and encrypts every link; it does not protect the
members from each other.

Dask has TLS built in (`distributed.security.Security`). One private certificate authority (CA)
signs a certificate for the members; every connection must present a certificate signed by it,
in both directions. `Security.temporary()` makes throw-away credentials in one line when the
`cryptography` package is installed; here `openssl` makes real files, as you would for machines:"""),
    ("code", """def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

tls = work / "tls"
tls.mkdir()
openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=bloombee-demo-ca",
        "-keyout", tls / "ca.key", "-out", tls / "ca.pem")                      # the CA: keep ca.key private
openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bloombee-member",
        "-keyout", tls / "member.key", "-out", tls / "member.csr")               # a member's key and request
openssl("x509", "-req", "-days", "30", "-in", tls / "member.csr", "-CA", tls / "ca.pem", "-CAkey", tls / "ca.key",
        "-CAcreateserial", "-out", tls / "member.pem")                          # … signed by the CA
sorted(p.name for p in tls.iterdir())"""),
    ("md", """Copy `ca.pem`, `member.pem` and `member.key` to each machine (or sign one certificate per
machine). The scheduler and workers then take the Dask CLI's TLS options:

```bash
dask scheduler --protocol tls --tls-ca-file ca.pem --tls-cert member.pem --tls-key member.key
dask worker tls://<A>:8786 --nthreads 1 --tls-ca-file ca.pem --tls-cert member.pem --tls-key member.key
```

`bloombee-nb worker` has no TLS options yet — its TLS commands (and one that generates the
credentials) arrive with the reliability and security issue. Until then a plain `dask worker`
serves as well: any Dask worker with `bloombee_nb` installed can host spans. Here both run for
real:"""),
    ("code", """member = ["--tls-ca-file", tls / "ca.pem", "--tls-cert", tls / "member.pem", "--tls-key", tls / "member.key"]
tls_scheduler = start(cli("dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                      "--no-dashboard", "--scheduler-file", work / "tls-scheduler.json", *member, log="tls-scheduler.log")
tls_address = wait_for_file(work / "tls-scheduler.json")["address"]
tls_workers = [start(cli("dask"), "worker", tls_address, "--nthreads", "1", "--name", f"secure-{i}",
                     "--host", "127.0.0.1", *member, log=f"tls-worker-{i}.log") for i in range(2)]
tls_address"""),
    ("md", """The notebook connects with the same credentials as a `Security` object, and everything —
the notebook's calls, the stages forwarding hidden states to each other — goes over TLS:"""),
    ("code", """from distributed.security import Security

security = Security(tls_ca_file=str(tls / "ca.pem"), tls_client_cert=str(tls / "member.pem"),
                    tls_client_key=str(tls / "member.key"), require_encryption=True)
secure = bb.connect(tls_address, security=security)
secure.wait_for_workers(2, timeout_s=120)
model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=secure)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
assert torch.equal(out, local)
print(secure, "→", repr(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)))"""),
    ("md", """A stranger is refused — even one who has the CA's public certificate (so it trusts the
cluster) but holds a certificate the CA never signed:"""),
    ("code", """from distributed import Client

openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger",
        "-keyout", tls / "stranger.key", "-out", tls / "stranger.pem")
stranger = Security(tls_ca_file=str(tls / "ca.pem"), tls_client_cert=str(tls / "stranger.pem"),
                    tls_client_key=str(tls / "stranger.key"), require_encryption=True)
try:
    Client(tls_address, security=stranger, timeout="10s").close()
    raise AssertionError("a client without a member certificate got in")
except OSError as exc:
    print("refused:", type(exc).__name__, str(exc)[:160])"""),
    ("code", """model.close()
secure.close()
for w in tls_workers:
    w.terminate()
print("workers exited with", [w.wait(60) for w in tls_workers])
tls_scheduler.terminate()
print("scheduler exited with", tls_scheduler.wait(60))
shutil.rmtree(work)  # logs, and the demo's keys"""),
    ("md", """Next: `02_planning.ipynb` measures such a cluster and places the layers where the links
and the machines make them fastest; `03_compression_and_links.ipynb` shows what slow links
cost and how the chain and compression win some of it back."""),
]

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_planning.ipynb": PLANNING,
             "03_compression_and_links.ipynb": LINKS, "04_speculative_decoding.ipynb": SPECULATIVE,
             "05_multi_machine.ipynb": MULTI}

#: The README's table, in order: (file, what it shows, None when the notebook exists, else when it arrives).
TABLE = [
    ("01_quickstart.ipynb", "connect a local cluster, generate with the shipped model, check it against `transformers`",
     None),
    ("02_planning.ipynb", "profile, plan for latency and throughput, what if a link were 10× slower (DP vs even "
     "split vs Petals-style greedy), apply a plan, predicted vs measured", None),
    ("03_compression_and_links.ipynb", "why the link dominates, the link map, lossless compression of real hidden "
     "states and its break-even bandwidth, per-link codec choice, bit-exactness, chain vs star on emulated slow "
     "links", None),
    ("04_speculative_decoding.ipynb", "the shipped target/draft pair, a token tree and its tree-attention mask, "
     "greedy speculation identical to `transformers`, acceptance rate and tokens per traversal, "
     "`%%bloombee generate --speculative`, the link-aware tree size (and when it switches speculation off), "
     "speed-up vs emulated link latency, sampling that keeps the target's distribution", None),
    ("05_multi_machine.ipynb", "a scheduler and `bloombee-nb worker` processes started for real, connecting "
     "from behind NAT, a Hub model, who can do what in a cluster, TLS with mutual authentication", None),
]
TABLE_START, TABLE_END = "<!-- tutorials:start -->", "<!-- tutorials:end -->"


def colab_url(name: str) -> str:
    return f"https://colab.research.google.com/github/{COLAB_REPO}/blob/{COLAB_BRANCH}/tutorials/{name}"


def readme_table() -> str:
    """The README's tutorials table (between the two markers), generated from ``TABLE``."""
    rows = ["| notebook | what it shows | Colab |", "|---|---|---|"]
    for name, what, pending in TABLE:
        if pending:
            rows.append(f"| `tutorials/{name}` | {what} | *{pending}* |")
        else:
            badge = "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            rows.append(f"| [`tutorials/{name}`](tutorials/{name}) | {what} | {badge}({colab_url(name)}) |")
    note = (f"The Colab links (and the notebooks' install cell) assume the project is published on GitHub as "
            f"`{COLAB_REPO}`, branch `{COLAB_BRANCH}`; set `COLAB_REPO` in `tutorials/make_notebooks.py` and rerun "
            "it if it is published elsewhere.")
    return "\n".join([TABLE_START, *rows, "", note, TABLE_END])


def with_table(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`readme_table`."""
    head, sep, rest = readme.partition(TABLE_START)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep and sep2):
        raise SystemExit(f"README.md needs the markers {TABLE_START} and {TABLE_END} around the tutorials table")
    return head + readme_table() + tail


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged notebook changes no byte
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


if __name__ == "__main__":
    assert {name for name, _, pending in TABLE if not pending} == set(NOTEBOOKS), "TABLE and NOTEBOOKS disagree"
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)
    README.write_text(with_table(README.read_text()))
    print("wrote the tutorials table in", README)

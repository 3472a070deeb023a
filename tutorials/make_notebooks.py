"""Writes the tutorial notebooks from the cell sources below (outputs are never committed).

    python tutorials/make_notebooks.py

Keeping the sources here makes diffs readable and guarantees the committed notebooks carry no
outputs; tests/tutorials runs every notebook top to bottom with a real kernel.
"""

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

COLAB_INSTALL = '''# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: the project's repository, e.g. "bloombee_nb[notebook] @ git+https://<host>/<you>/bloombee_nb"
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook]")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # Colab imports it at start
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
    ("md", """Plan for one user (latency) and for a batch of 8 (throughput). `runtime_plan` solves for
what the runtime executes today (stages forward to each other; no micro-batching or offloading
yet); `bloombee_nb.plan.solve` is the unrestricted DP."""),
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

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART, "02_planning.ipynb": PLANNING}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


if __name__ == "__main__":
    for name, cells in NOTEBOOKS.items():
        nbformat.write(build(cells), HERE / name)
        print("wrote", HERE / name)

# %% [markdown]
# # 02 · Planning: who hosts which layers, and why
#
# Over slow, uneven links the placement decides the speed. The planner measures the cluster
# (each worker's time per layer, its memory, every link's bandwidth and round-trip time, with real
# frames on the real path), then a dynamic program chooses the chain of workers, each one's span,
# the micro-batch size and how much each stage offloads — for the least per-token latency or the
# most tokens per second. Its recurrence is in `bloombee_nb/plan/dp.py`.

# %%
# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/bloombee-nb/bloombee_nb@main")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)

# %%
import bloombee_nb as bb
from bloombee_nb.cluster.planning import runtime_plan
from bloombee_nb.cluster.profiling import profile_cluster
from bloombee_nb.plan import Workload, even_split, petals_greedy
from bloombee_nb.shipped import default_model_path

cluster = bb.connect(n_workers=3)
measured = profile_cluster(cluster, default_model_path())   # measured: layers, memory, links
measured

# %% [markdown]
# On one machine every worker has plenty of memory, so the fastest plan puts all 6 layers on
# one worker. In a real swarm each lender grants a budget; say each grants room for 3 layers with
# the KV cache of a batch of 8 (a single sequence's smaller cache leaves room for a 4th layer), so
# at least two workers are needed.

# %%
from bloombee_nb.plan import cost
room = cost.min_bytes_for(measured.model, Workload(batch=8), 3)
profile = measured
for w in measured.workers:
    profile = profile.with_worker(w.name, ram_bytes=room, disk_bytes=0)

# %% [markdown]
# Plan for one user (latency) and for a batch of 8 (throughput). `runtime_plan` prices the
# profile the way the runtime relays hidden states (stage to stage) and lets the DP choose the
# spans, the micro-batch and each stage's offload fractions; `from_pretrained(plan=...)` applies
# all three.

# %%
latency = runtime_plan(profile, Workload(batch=1, objective="latency"))
throughput = runtime_plan(profile, Workload(batch=8, objective="throughput"))
latency

# %% [markdown]
# **What if one link were 10× slower?** Profiles are plain values: edit a copy and re-solve.
# Here the first worker of the chain loses 90% of its links' bandwidth and gains 50 ms of round trip.

# %%
name = latency.stages[0].worker
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
dict(replanned.reasons)

# %% [markdown]
# Apply a plan: place the model's spans as the planner chose, then compare the predicted
# per-token time with what the chain really takes (the session's traces).

# %%
import statistics, torch
model = bb.DistributedModelForCausalLM.from_pretrained(default_model_path(), cluster=cluster, plan=latency)
ids = torch.randint(10, 4000, (1, 32), generator=torch.Generator().manual_seed(0))
with model.inference_session(max_length=96) as s:
    model.generate(ids, session=s, max_new_tokens=48, do_sample=False)
    measured = statistics.median(t.wall_s for t in list(s.traces)[1:])
print(f"predicted {latency.latency_s * 1e3:.2f} ms/token, measured {measured * 1e3:.2f} ms/token (chain only)")
model.close()
cluster.close()

# %% [markdown]
# On this kind of machine the prediction is low by a few milliseconds per token: the cost
# model prices compute, links and each stage's fixed step cost, but not every message the runtime
# exchanges (see the README's performance section for the measured gap).

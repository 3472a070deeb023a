# %% [markdown]
# # 05 · Several machines: a scheduler, workers that join, and TLS
#
# So far every worker ran on this machine. A real deployment spreads them over machines that
# lend memory and compute — lab boxes, spare desktops with a GPU, cloud VMs — and drives them from
# a notebook anywhere. Three roles, all plain Dask:
#
# - the **scheduler**: the directory of who is alive and who hosts what (one per cluster, on a
#   machine everyone can reach);
# - **workers**: one per lending machine (`bloombee-nb worker`), each hosting spans of layers;
# - the **client**: this notebook, which holds the embeddings and the LM head and drives generation.
#
# On real machines you type:
#
# ```bash
# # machine A, reachable by everyone (port 8786 for Dask, 8787 for its dashboard):
# dask scheduler                                   # prints: Scheduler at: tcp://<A>:8786
# # every machine that lends memory/compute (the same bloombee_nb and transformers versions everywhere):
# pip install "bloombee_nb[notebook] @ git+https://github.com/bloombee-nb/bloombee_nb"
# bloombee-nb worker tcp://<A>:8786 --name lab-gpu-1
# ```
#
# `bloombee-nb worker` is a Dask worker with one thread that leaves cleanly on Ctrl-C or SIGTERM.
# Its options: `--name` (how the planner and the link map call it), `--listen` (the address it listens
# on, default: the one facing the scheduler), `--nthreads`, `--memory-limit`, and `--host MODEL` to
# lend it to the swarm: it hosts a span of MODEL for every client (and only the models named with
# `--host`/`--allow`). Workers must reach
# the scheduler *and each other* (stages forward hidden states straight to the next stage).
#
# Below, the same commands run for real on this machine, on 127.0.0.1, started from the notebook.

# %%
# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/bloombee-nb/bloombee_nb@main")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)

# %%
import atexit, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path

work = Path(tempfile.mkdtemp(prefix="bloombee-05-"))  # logs, scheduler file, certificates

def cli(name):
    """The console script `name` (dask, bloombee-nb) installed with this Python."""
    return shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))

started = []

def start(*cmd, log):
    """Run a command in the background, as in its own terminal; its output goes to a log file."""
    started.append(subprocess.Popen([str(c) for c in cmd], stdout=open(work / log, "w"), stderr=subprocess.STDOUT))
    return started[-1]

atexit.register(lambda: [p.kill() for p in started if p.poll() is None])  # if the kernel stops first

def wait_for_file(path, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear; see the logs in {work}")
        time.sleep(0.2)
    return json.loads(path.read_text())


# %% [markdown]
# Start the scheduler. Here it takes any free port (`--port 0`) and writes its address to a
# file, so this notebook never collides with something else on port 8786.

# %%
scheduler = start(cli("dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                  "--scheduler-file", work / "scheduler.json", log="scheduler.log")
address = wait_for_file(work / "scheduler.json")["address"]
address

# %% [markdown]
# Join two workers, as two other machines would:

# %%
workers = [start(cli("bloombee-nb"), "worker", address, "--name", f"box-{i}", "--listen", "127.0.0.1",
                 log=f"worker-{i}.log") for i in range(2)]

# %% [markdown]
# Connect the notebook. `direct_to_workers=False` sends every call through the scheduler:
# that is what a notebook behind NAT needs — a Colab runtime, a laptop on home Wi-Fi — since the
# workers cannot open connections back to it; it only has to reach the scheduler's port. (Such a
# notebook can be the client, not a worker.) Where the notebook can reach the workers directly,
# leave the default (`True`): each call then skips a hop through the scheduler.

# %%
import bloombee_nb as bb

cluster = bb.connect(address, direct_to_workers=False)
cluster.wait_for_workers(2, timeout_s=120)
cluster

# %% [markdown]
# Place the shipped model on them — an even split, 3 layers per worker — and generate.
# Each worker reads only its own span from its own copy of the checkpoint (here the same folder;
# on real machines a path that exists on each, or a Hub id).

# %%
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
from bloombee_nb.shipped import default_model_path

path = default_model_path()
tok = AutoTokenizer.from_pretrained(path)
model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=cluster)
ids = tok("class Stack:\n    def __init__(self):\n", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=24, do_sample=False, streamer=TextStreamer(tok, skip_special_tokens=True))
local = AutoModelForCausalLM.from_pretrained(path).generate(**ids, max_new_tokens=24, do_sample=False)
assert torch.equal(out, local)  # token for token what one process computes
model

# %% [markdown]
# The cluster's panel now shows which worker hosts which layers (in Jupyter it is a table;
# the Dask dashboard, when `bokeh` is installed, shows the same workers live):

# %%
cluster


# %% [markdown]
# The `%bloombee` magics connect to a running scheduler the same way
# (`--through-scheduler` is `direct_to_workers=False`, automatic on Colab), place the model, and
# show the status panel:

# %%
# %load_ext bloombee_nb
# %bloombee connect {address} --through-scheduler

# %%
# %%bloombee generate --max-new-tokens 16
def parse_args(argv):


# %%
# %bloombee status

# %%
# %bloombee disconnect

# %% [markdown]
# `disconnect` frees the magics' model and closes their client; the scheduler and workers
# keep running — they are not the notebook's to stop.
#
# ## A model from the Hugging Face Hub
#
# When the machines have internet, pass a Hub id instead of a folder. The notebook and each worker
# download the checkpoint's files into their own Hugging Face cache (set `HF_TOKEN` on every machine
# for gated models); each worker then reads only the tensors of its own span. Llama, Mistral, Qwen2 and Qwen3
# checkpoints are supported. Set `HUB_MODEL` to try it — it is left unset here, where nothing may
# be downloaded:

# %%
HUB_MODEL = None  # e.g. "Qwen/Qwen2.5-0.5B-Instruct" (or "Qwen/Qwen3-0.6B")

if HUB_MODEL:
    hub = bb.DistributedModelForCausalLM.from_pretrained(HUB_MODEL, cluster=cluster, compression="auto")
    hub_tok = AutoTokenizer.from_pretrained(HUB_MODEL)
    chat = hub_tok.apply_chat_template([{"role": "user", "content": "Explain a Dask actor in two sentences."}],
                                       add_generation_prompt=True, return_tensors="pt", return_dict=True)
    hub.generate(**chat, max_new_tokens=64, do_sample=False,
                 streamer=TextStreamer(hub_tok, skip_prompt=True, skip_special_tokens=True))
    hub.close()
else:
    print("HUB_MODEL is not set: skipped (no downloads here)")

# %% [markdown]
# Shut down: free the spans, close the client, then stop the workers and the scheduler the
# way you would stop them on their machines (SIGTERM, i.e. Ctrl-C; a worker leaves cleanly and
# exits with 0).

# %%
model.close()
cluster.close()
for w in workers:
    w.terminate()
print("workers exited with", [w.wait(60) for w in workers])
scheduler.terminate()
print("scheduler exited with", scheduler.wait(60))
print(next(line for line in (work / "worker-0.log").read_text().splitlines() if "joined" in line))


# %% [markdown]
# ## Who can do what in a cluster — and TLS
#
# Be clear about the trust model before opening a port to the internet. **A Dask cluster is one
# trust domain:**
#
# - anyone whose client can connect to the scheduler can run any Python code on every worker
#   (`client.run`, `client.submit`), with the rights of the user the worker runs as — read its
#   files, use its GPU, reach its network;
# - the scheduler makes workers run code: that is its job;
# - a worker sees the hidden states of the layers it hosts (prompts can largely be recovered from
#   them) and could return wrong results; nothing in Dask stops a member from lying.
#
# So: join only machines you trust, let only people you trust connect, run workers as an
# unprivileged user, and never expose a plain `tcp://` scheduler on an open network. TLS with
# mutual authentication keeps everyone else out and encrypts every link; it does not protect the
# members from each other.
#
# Dask has TLS built in (`distributed.security.Security`). One private certificate authority (CA)
# signs a certificate for the members; every connection must present a certificate signed by it,
# in both directions. `Security.temporary()` makes throw-away credentials in one line when the
# `cryptography` package is installed; here `openssl` makes real files, as you would for machines:

# %%
def openssl(*args):
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

tls = work / "tls"
tls.mkdir()
openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=bloombee-demo-ca",
        "-keyout", tls / "ca.key", "-out", tls / "ca.pem")                      # the CA: keep ca.key private
openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=bloombee-member",
        "-keyout", tls / "member.key", "-out", tls / "member.csr")               # a member's key and request
openssl("x509", "-req", "-days", "30", "-in", tls / "member.csr", "-CA", tls / "ca.pem", "-CAkey", tls / "ca.key",
        "-CAcreateserial", "-out", tls / "member.pem")                          # … signed by the CA
sorted(p.name for p in tls.iterdir())

# %% [markdown]
# Copy `ca.pem`, `member.pem` and `member.key` to each machine (or sign one certificate per
# machine). The scheduler and workers then take the Dask CLI's TLS options:
#
# ```bash
# dask scheduler --protocol tls --tls-ca-file ca.pem --tls-cert member.pem --tls-key member.key
# dask worker tls://<A>:8786 --nthreads 1 --tls-ca-file ca.pem --tls-cert member.pem --tls-key member.key
# ```
#
# `bloombee-nb worker` has no TLS options yet — its TLS commands (and one that generates the
# credentials) arrive with the reliability and security issue. Until then a plain `dask worker`
# serves as well: any Dask worker with `bloombee_nb` installed can host spans. Here both run for
# real:

# %%
member = ["--tls-ca-file", tls / "ca.pem", "--tls-cert", tls / "member.pem", "--tls-key", tls / "member.key"]
tls_scheduler = start(cli("dask"), "scheduler", "--protocol", "tls", "--host", "127.0.0.1", "--port", "0",
                      "--no-dashboard", "--scheduler-file", work / "tls-scheduler.json", *member, log="tls-scheduler.log")
tls_address = wait_for_file(work / "tls-scheduler.json")["address"]
tls_workers = [start(cli("dask"), "worker", tls_address, "--nthreads", "1", "--name", f"secure-{i}",
                     "--host", "127.0.0.1", *member, log=f"tls-worker-{i}.log") for i in range(2)]
tls_address

# %% [markdown]
# The notebook connects with the same credentials as a `Security` object, and everything —
# the notebook's calls, the stages forwarding hidden states to each other — goes over TLS:

# %%
from distributed.security import Security

security = Security(tls_ca_file=str(tls / "ca.pem"), tls_client_cert=str(tls / "member.pem"),
                    tls_client_key=str(tls / "member.key"), require_encryption=True)
secure = bb.connect(tls_address, security=security)
secure.wait_for_workers(2, timeout_s=120)
model = bb.DistributedModelForCausalLM.from_pretrained(path, cluster=secure)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
assert torch.equal(out, local)
print(secure, "→", repr(tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)))

# %% [markdown]
# A stranger is refused — even one who has the CA's public certificate (so it trusts the
# cluster) but holds a certificate the CA never signed:

# %%
from distributed import Client

openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=stranger",
        "-keyout", tls / "stranger.key", "-out", tls / "stranger.pem")
stranger = Security(tls_ca_file=str(tls / "ca.pem"), tls_client_cert=str(tls / "stranger.pem"),
                    tls_client_key=str(tls / "stranger.key"), require_encryption=True)
try:
    Client(tls_address, security=stranger, timeout="10s").close()
    raise AssertionError("a client without a member certificate got in")
except OSError as exc:
    print("refused:", type(exc).__name__, str(exc)[:160])

# %%
model.close()
secure.close()
for w in tls_workers:
    w.terminate()
print("workers exited with", [w.wait(60) for w in tls_workers])
tls_scheduler.terminate()
print("scheduler exited with", tls_scheduler.wait(60))
shutil.rmtree(work)  # logs, and the demo's keys

# %% [markdown]
# Next: `02_planning.ipynb` measures such a cluster and places the layers where the links
# and the machines make them fastest; `03_compression_and_links.ipynb` shows what slow links
# cost and how the chain and compression win some of it back.

# %% [markdown]
# # 01 · Quickstart: a model split across Dask workers
#
# **Decentralized inference** runs a language model that no single machine can hold by cutting it
# into contiguous *spans* of decoder layers, each hosted by a different machine (a *worker*).
# Your notebook keeps the token embeddings and the LM head; for every token the hidden states
# travel through the chain of workers and come back as logits.
#
# Here everything runs on this machine: an embedded Dask `LocalCluster` whose worker processes
# stand in for the lab boxes, spare desktops and Colab sessions of a real swarm, and the tiny
# Llama that ships with the package (trained on the Python standard library).

# %%
# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/bloombee-nb/bloombee_nb@main")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)


# %%
# %load_ext bloombee_nb

# %% [markdown]
# `%bloombee connect local` starts the cluster and places the shipped model on it — an even
# split of its 6 layers over the workers. The panel shows who hosts what.

# %%
# %bloombee connect local --workers 2

# %% [markdown]
# Generate: the cell body is the prompt, tokens stream in as they are produced. Greedy
# decoding gives exactly the tokens plain `transformers` gives for the same checkpoint.

# %%
# %%bloombee generate --max-new-tokens 24
def fibonacci(n):


# %% [markdown]
# The same from Python, with the `transformers` API you already know — and a check that the
# distributed model agrees with the single-process one token for token:

# %%
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from bloombee_nb.notebook import state
from bloombee_nb.shipped import default_model_path

session = state.session()
tok = AutoTokenizer.from_pretrained(default_model_path())
ids = tok("import os\n", return_tensors="pt")
distributed = session.model.generate(**ids, max_new_tokens=16, do_sample=False)
local = AutoModelForCausalLM.from_pretrained(default_model_path()).generate(**ids, max_new_tokens=16, do_sample=False)
assert torch.equal(distributed, local)
print(tok.decode(distributed[0], skip_special_tokens=True))

# %% [markdown]
# Any OpenAI client can use the model too: `%bloombee serve` starts an OpenAI-compatible HTTP
# server (`/v1/completions`, `/v1/chat/completions`, streaming) in the background of this kernel —
# `--port 8000` for a fixed port, `--api-key KEY` to require a key; from a shell, `bloombee-nb serve`.
# Every request is its own session on the workers, and concurrent requests decode together.

# %%
# %bloombee serve --port 0 --out server

# %%
from openai import OpenAI

client = OpenAI(base_url=server.url, api_key="none")
for chunk in client.completions.create(model="tiny-llama", prompt="def fibonacci(n):", max_tokens=24,
                                       temperature=0, stream=True):
    print(chunk.choices[0].text, end="")

# %% [markdown]
# The status panel lists the server and the requests it served; `disconnect` stops it first.

# %%
# %bloombee status

# %%
# %bloombee disconnect

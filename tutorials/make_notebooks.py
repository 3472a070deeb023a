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

NOTEBOOKS = {"01_quickstart.ipynb": QUICKSTART}


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

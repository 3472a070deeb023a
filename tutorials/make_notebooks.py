"""Writes the tutorial notebooks from their jupytext sources, and the README's table of them.

    python tutorials/make_notebooks.py

Each notebook's cells live in a percent-format script next to it (``01_quickstart.py`` for
``01_quickstart.ipynb``: ``# %%`` starts a code cell, ``# %% [markdown]`` a text cell; jupytext's
format, which Jupyter opens as a notebook when the jupytext extension is installed). Edit the
``.py``, then run this script: the ``.ipynb`` are generated, without outputs and with stable cell
ids, so regenerating an unchanged notebook changes no byte. tests/tutorials runs every notebook
top to bottom with a real kernel and checks that the committed notebooks and the README table are
what this script writes.
"""

from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).parent
README = HERE.parent / "README.md"

#: Where the project is published, as GitHub's owner/name. No public repository is known yet: set
#: this when publishing, then update the install cell of each tutorials/*.py (the tests check it
#: equals COLAB_INSTALL) and rerun this script. The README's "Open in Colab" links and the
#: notebooks' Colab install cell point here (https://colab.research.google.com/github/<owner>/<repo>/blob/main/…).
COLAB_REPO = "bloombee-nb/bloombee_nb"
COLAB_BRANCH = "main"

#: The first code cell of every tutorial.
COLAB_INSTALL = f'''# On Colab (detected, not assumed) install bloombee_nb first; elsewhere it is already installed.
# SOURCE: where to install from (the project's repository; set BLOOMBEE_NB_SOURCE to use another)
import importlib.util, os, subprocess, sys
SOURCE = os.environ.get("BLOOMBEE_NB_SOURCE", "bloombee_nb[notebook,serve] @ git+https://github.com/{COLAB_REPO}@{COLAB_BRANCH}")
if "google.colab" in sys.modules and not importlib.util.find_spec("bloombee_nb"):  # not installed yet
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", SOURCE], check=True)'''

#: notebook -> its source script (percent format)
NOTEBOOKS = {p.with_suffix(".ipynb").name: p for p in sorted(HERE.glob("[0-9][0-9]_*.py"))}

#: The README's table, in order: (file, what it shows, None when the notebook exists, else when it arrives).
TABLE = [
    ("01_quickstart.ipynb", "connect a local cluster, generate with the shipped model, check it against `transformers`, "
     "serve it to the `openai` client (`%bloombee serve`), a multi-turn chat with the real SmolLM2 (GGUF) whose KV "
     "stays on the stages (skipped without the `.[real]` extra)", None),
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
            f"`{COLAB_REPO}`, branch `{COLAB_BRANCH}`; set `COLAB_REPO` in `tutorials/make_notebooks.py` (and the "
            "install cell of each `tutorials/*.py`) and rerun it if it is published elsewhere.")
    return "\n".join([TABLE_START, *rows, "", note, TABLE_END])


def with_table(readme: str) -> str:
    """``readme`` with the text between the markers replaced by :func:`readme_table`."""
    head, sep, rest = readme.partition(TABLE_START)
    _, sep2, tail = rest.partition(TABLE_END)
    if not (sep and sep2):
        raise SystemExit(f"README.md needs the markers {TABLE_START} and {TABLE_END} around the tutorials table")
    return head + readme_table() + tail


def build(source: Path) -> nbformat.NotebookNode:
    """The notebook of the percent-format script ``source``: its cells, no outputs, stable ids."""
    cells = jupytext.read(source, fmt="py:percent").cells
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(c.source) if c.cell_type == "markdown"
                else nbformat.v4.new_code_cell(c.source) for c in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating an unchanged notebook changes no byte
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["colab"] = {"provenance": []}
    return nb


if __name__ == "__main__":
    assert {name for name, _, pending in TABLE if not pending} == set(NOTEBOOKS), "TABLE and the sources disagree"
    for name, source in NOTEBOOKS.items():
        nbformat.write(build(source), HERE / name)
        print("wrote", HERE / name, "from", source.name)
    README.write_text(with_table(README.read_text()))
    print("wrote the tutorials table in", README)

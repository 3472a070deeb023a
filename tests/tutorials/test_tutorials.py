"""Every tutorial runs top to bottom with a real kernel, and no notebook is committed with outputs.

The notebooks are generated from their jupytext sources (``tutorials/01_quickstart.py`` …, percent
format) by ``tutorials/make_notebooks.py``, which also writes the README's table of them; the tests
check that what is committed is what it writes.
"""

import importlib.util
from pathlib import Path

import pytest

# nbformat and nbclient are imported in the tests: nbformat's import alone takes 3 s (its JSON
# schema's format checkers), which every quick run would pay at collection
pytestmark = pytest.mark.slow  # real notebook kernels; the file checks go with them

ROOT = Path(__file__).parents[2]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))

#: Text each notebook's outputs must contain: the cell that shows the point of the notebook ran.
EXPECTED = {
    "01_quickstart.ipynb": ["tokens/s",  # the generation cell produced its summary
                            "(running): 1 served", "stopped serving on port",  # %bloombee serve, then disconnect
                            "SmolLM2"],  # the real model's chat ran, or said why it was skipped
    "02_planning.ipynb": ["predicted", "measured"],
    "03_compression_and_links.ipynb": ["pays on links below", "identical to transformers", "ms per token",
                                       "time to first token"],
    "04_speculative_decoding.ipynb": ["identical to transformers' greedy", "tokens per traversal", "speculation off",
                                      "ms per token", "max |frequency − p|"],
    "05_multi_machine.ipynb": ["workers exited with [0, 0]", "scheduler exited with 0", "refused:"],
}


def _make_notebooks():
    spec = importlib.util.spec_from_file_location("make_notebooks", ROOT / "tutorials" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_tutorials():
    assert TUTORIALS, "tutorials/*.ipynb missing: run python tutorials/make_notebooks.py"


def test_committed_notebooks_and_readme_table_are_generated():
    import nbformat

    make = _make_notebooks()
    assert {p.name for p in TUTORIALS} == set(make.NOTEBOOKS), "run python tutorials/make_notebooks.py"
    for name, source in make.NOTEBOOKS.items():
        committed = (ROOT / "tutorials" / name).read_text()
        assert committed == nbformat.writes(make.build(source)) + "\n", \
            f"{name} differs from {source.name}: run python tutorials/make_notebooks.py"
    readme = (ROOT / "README.md").read_text()
    assert make.readme_table() in readme, "the README's tutorials table is stale: run python tutorials/make_notebooks.py"
    for name, _, pending in make.TABLE:
        if not pending:
            assert f"({make.colab_url(name)})" in readme
            assert make.colab_url(name).startswith("https://colab.research.google.com/github/")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and not c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_starts_with_the_colab_install_cell(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert first_code.source == _make_notebooks().COLAB_INSTALL


@pytest.mark.timeout(400)
@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BLOOMBEE_NB_DISPLAY", "static")  # headless: no front-end renders live widgets
    nb = nbformat.read(path, as_version=4)
    # a real kernel; any cell error raises CellExecutionError and fails the test
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   allow_errors=False).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(str(o) for o in outputs)
    for expected in EXPECTED.get(path.name, []):
        assert expected in text, f"{path.name}: no output contains {expected!r}"

"""End to end in a real browser: Debian's Chromium (headless), driven by Playwright, in each of two
front-ends: JupyterLab (/lab/tree/...) and Jupyter Notebook 7 (/notebooks/...), which is what users
get today as "classic Notebook" (a JupyterLab-based app: ipywidgets 8, no front-end build step).

A notebook written here loads the extension, connects a 2-worker local cluster, shows the plan
widget and streams a generation; the test asserts on the rendered page and on the notebook model
the page holds (every cell ran, no error output), and saves a screenshot per front-end to
tests/notebook/artifacts/{jupyterlab,notebook7}.png. Set-up installs what is missing (Chromium with
apt; jupyterlab, notebook>=7 and playwright with pip); it skips only when Chromium cannot be
installed at all. One server and one browser run at a time.
"""

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
NOTEBOOK = "bloombee.ipynb"
PROMPT = "def fibonacci(n):"
CELLS = ["%load_ext bloombee_nb", "%bloombee connect local --workers 2", "%bloombee plan",
         f"%%bloombee generate --max-new-tokens 8\n{PROMPT}"]


@dataclass(frozen=True)
class Frontend:
    name: str              # also the screenshot's name
    module: str            # `python -m <module>` starts its server
    requirement: str       # what pip installs when the module is missing (or too old)
    path: str              # the notebook's URL path, before its file name
    extra_args: tuple = ()


FRONTENDS = [
    Frontend("jupyterlab", "jupyterlab", "jupyterlab>=4.1", "/lab/tree/", ("--LabApp.news_url=",)),
    Frontend("notebook7", "notebook", "notebook>=7", "/notebooks/"),
]

# Both front-ends are JupyterLab applications and, started with --expose-app-in-browser, put theirs
# on window.jupyterapp (checked in the browser: JupyterLab and Notebook 7.6 alike); in both,
# shell.currentWidget is the open NotebookPanel.
NOTEBOOK_PANEL = "window.jupyterapp && window.jupyterapp.shell.currentWidget"

# the notebook's own kernel is started, connected and idle (not just the page's status bar)
KERNEL_READY = f"""async () => {{
    const w = {NOTEBOOK_PANEL};
    if (!w || !w.sessionContext) return false;
    await w.sessionContext.ready;
    const k = w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}}"""

# every cell of the notebook model the page holds: its execution count and its outputs as nbformat JSON
CELL_RECORDS = f"""() => {{
    const cells = ({NOTEBOOK_PANEL}).content.model.cells;
    const records = [];
    for (let i = 0; i < cells.length; i++) {{
        const c = cells.get(i), outputs = [];
        for (let j = 0; j < c.outputs.length; j++) outputs.push(c.outputs.get(j).toJSON());
        records.push({{source: c.sharedModel.getSource(), count: c.executionCount, outputs}});
    }}
    return records;
}}"""

# the run is over: the last cell's reply has arrived, or a cell failed (run-all stops there)
RUN_OVER = f"""() => {{
    const cells = ({NOTEBOOK_PANEL}).content.model.cells;
    for (let i = 0; i < cells.length; i++) {{
        const outputs = cells.get(i).outputs;
        for (let j = 0; j < outputs.length; j++) if (outputs.get(j).type === 'error') return true;
    }}
    return !!cells.get(cells.length - 1).executionCount;
}}"""

# what ipywidgets / the output area show when a widget or an output fails to render
RENDER_ERRORS = ("Error displaying widget", "Failed to load model class", "Error rendering output item",
                 "Could not render content")

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(600)]  # a first run may install Chromium


def _ensure_chromium() -> None:
    if os.path.exists(CHROMIUM):
        return
    apt = shutil.which("apt-get")
    if apt:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [apt, "install", "-y", "-q", "chromium"]
        for cmd in (install, [apt, "update", "-q"], install):
            if subprocess.run(cmd, env=env, capture_output=True).returncode == 0 and os.path.exists(CHROMIUM):
                return
    pytest.skip(f"{CHROMIUM} is missing and `apt-get install -y chromium` could not install it "
                "(needs root and Debian's package archive)")


def _ensure_python_packages(frontend: Frontend) -> None:
    import importlib.metadata
    import importlib.util

    missing = [req for module, req in ((frontend.module, frontend.requirement), ("playwright", "playwright"))
               if not importlib.util.find_spec(module)]
    if frontend.module == "notebook" and not missing:   # Notebook 6 has neither /notebooks/ as a lab app nor jupyterapp
        if int(importlib.metadata.version("notebook").split(".")[0]) < 7:
            missing.append(frontend.requirement)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def _write_settings(root: Path) -> Path:
    """User settings (read by both front-ends): render every cell (no windowing), no news or update checks."""
    settings = root / "settings"
    for plugin, values in {
            "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
            "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False}}.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    return settings


def _write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture(scope="module", params=FRONTENDS, ids=lambda f: f.name)
def server(request, tmp_path_factory):
    """A headless Jupyter server of one front-end on 127.0.0.1 with a token; yields (frontend, url, token,
    root). Stops it and every process it started (kernel, Dask workers) afterwards."""
    import psutil

    frontend: Frontend = request.param
    _ensure_chromium()
    _ensure_python_packages(frontend)
    root = tmp_path_factory.mktemp(frontend.name)
    _write_notebook(root / NOTEBOOK)
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "cfg"), "JUPYTER_RUNTIME_DIR": str(root / "run"),
           "IPYTHONDIR": str(root / "ipython"), "JUPYTERLAB_SETTINGS_DIR": str(_write_settings(root)),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "PYTHONPATH": str(Path(__file__).parents[2])}
    log = root / "server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", frontend.module, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--expose-app-in-browser",
         "--allow-root", *frontend.extra_args],
        env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if server.poll() is not None:
                raise RuntimeError(f"{frontend.name} exited:\n" + log.read_text()[-2000:])
            return urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).status == 200

        wait_for(up, 60, "the Jupyter server", explain=lambda: log.read_text()[-2000:])
        yield frontend, url, token, root
    finally:
        procs = []
        if server.poll() is None:
            procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            _shutdown_kernels(url, token)
            server.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()


def _shutdown_kernels(url: str, token: str) -> None:
    """Ask each kernel to shut down cleanly (its LocalCluster closes at exit)."""
    try:
        kernels = json.load(urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=5))
        for k in kernels:
            req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=30)
    except OSError:
        pass


@functools.lru_cache(maxsize=1)
def expected_text() -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bloombee_nb.shipped import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ref = AutoModelForCausalLM.from_pretrained(default_model_path()).eval()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _output_text(output: dict) -> str:
    """A stream's text or an error's traceback, without the terminal colours."""
    if output["output_type"] == "stream":
        text = "".join(output["text"]) if isinstance(output["text"], list) else output["text"]
    elif output["output_type"] == "error":
        text = "\n".join(output.get("traceback", [])) or f"{output['ename']}: {output['evalue']}"
    else:
        return ""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _run_and_check(page, frontend: Frontend, url: str, token: str) -> None:
    page.goto(f"{url}{frontend.path}{NOTEBOOK}?token={token}", timeout=60_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_function(KERNEL_READY, timeout=60_000)
    if page.locator(".jp-Dialog .jp-mod-accept").count():   # "Select Kernel", should it still ask
        page.locator(".jp-Dialog .jp-mod-accept").click()
    # start the run without awaiting its promise (it settles only when every cell has finished)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.wait_for_function(RUN_OVER, timeout=240_000, polling=500)

    # every cell ran; none has an error output or a traceback on stderr
    records = page.evaluate(CELL_RECORDS)
    assert [r["source"] for r in records] == CELLS
    for r in records:
        errors = [_output_text(o) for o in r["outputs"] if o["output_type"] == "error"
                  or (o["output_type"] == "stream" and o["name"] == "stderr" and "Traceback" in _output_text(o))]
        assert not errors, f"cell {r['source']!r}:\n" + "\n".join(errors)
    counts = [r["count"] for r in records]
    assert all(counts) and counts == sorted(counts), counts

    # the widgets' views render after the replies: wait for the plan's figures and the final stats
    page.wait_for_selector(".bloombee-plan .js-plotly-plot", timeout=30_000)
    stats = page.locator(".bloombee-generation .bloombee-gen-stats")
    stats.wait_for(timeout=30_000)
    page.wait_for_function("!document.querySelector('.bloombee-generation .bloombee-gen-stats')"
                           ".innerText.includes('(live)')", timeout=30_000)
    page.wait_for_timeout(500)  # let plotly finish drawing before the screenshot
    page.screenshot(path=str(ARTIFACTS / f"{frontend.name}.png"), full_page=True)

    # nothing failed to render
    rendered = page.locator(".jp-Notebook").inner_text()
    assert not [e for e in RENDER_ERRORS if e in rendered], rendered[-2000:]

    # the plan widget, rendered by the ipywidgets 8 manager of this front-end (not the static fallback)
    assert page.locator(".jp-OutputArea-output .jupyter-widgets.widget-vbox.bloombee-plan").count() == 1
    assert page.locator(".bloombee-plan .js-plotly-plot").count() >= 4   # chain, stage times, cost, links
    assert page.locator(".bloombee-plan .js-plotly-plot .main-svg").count() >= 4   # plotly drew them
    assert page.locator(".bloombee-plan button.jupyter-button:has-text('apply')").count() == 1
    assert page.locator(".bloombee-plan .widget-checkbox input[type=checkbox]").count() == 2   # one per worker
    assert page.locator(".bloombee-status").count() == 1                 # the connect status panel
    assert "static view" not in rendered

    # the generation streamed into its widget: the greedy tokens of the reference model, 8 of them
    assert page.locator(".jupyter-widgets.bloombee-generation").count() == 1
    shown = page.locator(".bloombee-generation .bloombee-gen-text").inner_text()
    assert re.sub(r"\s+", " ", PROMPT + expected_text()).strip() == re.sub(r"\s+", " ", shown).strip()
    assert re.search(r"8 tokens.*tokens/s", stats.inner_text())


def test_connect_plan_generate(server):
    from playwright.sync_api import sync_playwright

    frontend, url, token, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 2800})
        try:
            _run_and_check(page, frontend, url, token)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / f"{frontend.name}-failure.png"), full_page=True)
            raise
        finally:
            browser.close()

"""End to end in a real browser: JupyterLab + Debian's Chromium (headless), driven by Playwright.

A notebook written here loads the extension, connects a 2-worker local cluster, shows the plan
widget and streams a generation; the test asserts on the rendered page and saves a screenshot
to tests/notebook/artifacts/jupyterlab.png. Set-up installs what is missing (Chromium with apt,
jupyterlab and playwright with pip); it skips only when Chromium cannot be installed at all.
"""

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "def fibonacci(n):"
CELLS = ["%load_ext bloombee_nb", "%bloombee connect local --workers 2", "%bloombee plan",
         f"%%bloombee generate --max-new-tokens 8\n{PROMPT}"]

# the notebook's own kernel is started, connected and idle (not just the page's status bar)
KERNEL_READY = """async () => {
    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    if (!w || !w.sessionContext) return false;
    await w.sessionContext.ready;
    const k = w.sessionContext.session && w.sessionContext.session.kernel;
    return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]  # a first run may install Chromium


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


def _ensure_python_packages() -> None:
    import importlib.util

    missing = [pkg for pkg in ("jupyterlab", "playwright") if not importlib.util.find_spec(pkg)]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *missing], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(root: Path) -> Path:
    """User settings: render every cell (no windowing), no news or update checks."""
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A headless JupyterLab on 127.0.0.1 with a token; yields (url, token, root). Stops it and every
    process it started (kernel, Dask workers) afterwards."""
    import psutil

    _ensure_chromium()
    _ensure_python_packages()
    root = tmp_path_factory.mktemp("lab")
    _write_notebook(root / "bloombee.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "cfg"), "JUPYTER_RUNTIME_DIR": str(root / "run"),
           "IPYTHONDIR": str(root / "ipython"), "JUPYTERLAB_SETTINGS_DIR": str(_write_settings(root)),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "PYTHONPATH": str(Path(__file__).parents[2])}
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--expose-app-in-browser",
         "--LabApp.news_url=", "--allow-root"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            if server.poll() is not None:
                raise RuntimeError("JupyterLab exited:\n" + (root / "server.log").read_text()[-2000:])
            return urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2).status == 200

        _wait_for(up, 60, lambda: (root / "server.log").read_text()[-2000:])
        yield url, token, root
    finally:
        procs = []
        if server.poll() is None:
            procs = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            _shutdown_kernels(url, token)
            server.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()


def _wait_for(check, timeout_s: float, explain=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:.0f}s\n{explain()}")
        time.sleep(0.25)


def _shutdown_kernels(url: str, token: str) -> None:
    """Ask each kernel to shut down cleanly (its LocalCluster closes at exit)."""
    try:
        kernels = json.load(urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=5))
        for k in kernels:
            req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
            urllib.request.urlopen(req, timeout=30)
    except OSError:
        pass


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


def test_jupyterlab_connect_plan_generate(lab):
    from playwright.sync_api import sync_playwright

    url, token, root = lab
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 2800})
        try:
            page.goto(f"{url}/lab/tree/bloombee.ipynb?token={token}", timeout=60_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function(KERNEL_READY, timeout=60_000)
            if page.locator(".jp-Dialog .jp-mod-accept").count():   # "Select Kernel", should it still ask
                page.locator(".jp-Dialog .jp-mod-accept").click()
            # start the run without awaiting its promise (it settles only when every cell has finished)
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            plan = page.wait_for_selector(".bloombee-plan .js-plotly-plot", timeout=90_000)
            stats = page.locator(".bloombee-generation .bloombee-gen-stats")
            stats.wait_for(timeout=60_000)
            page.wait_for_function("!document.querySelector('.bloombee-generation .bloombee-gen-stats')"
                                   ".innerText.includes('(live)')", timeout=60_000)
            page.wait_for_timeout(500)  # let plotly finish drawing before the screenshot
            page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=True)
            assert plan is not None
            assert page.locator(".bloombee-plan .js-plotly-plot").count() >= 4   # chain, stage times, cost, links
            assert page.locator(".bloombee-plan button:has-text('apply')").count() == 1
            assert page.locator(".bloombee-status").count() == 1                 # the connect status panel
            shown = page.locator(".bloombee-generation .bloombee-gen-text").inner_text()
            assert re.sub(r"\s+", " ", PROMPT + expected_text()).strip() == re.sub(r"\s+", " ", shown).strip()
            assert re.search(r"8 tokens.*tokens/s", stats.inner_text())
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not any("Traceback" in errors.nth(i).inner_text() for i in range(errors.count()))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "jupyterlab-failure.png"), full_page=True)
            raise
        finally:
            browser.close()

"""kernels/ installs as bloombee_nb._kernels, and pyproject lists every subpackage (it cannot use `find`)."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_every_subpackage_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {"bloombee_nb._kernels": "kernels"}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "bloombee_nb").rglob("__init__.py")}
    assert on_disk | {"bloombee_nb._kernels"} == set(tool["packages"]), "add new subpackages to pyproject.toml"


@pytest.mark.slow  # a subprocess Python
def test_kernels_import_under_the_package_name_from_anywhere(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import bloombee_nb._kernels as k; print(k.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == ROOT / "kernels" / "__init__.py"


# transformers >= 5.25 depends on Hugging Face's `kernels` distribution and imports it: our kernels/ folder
# must never stand in for it, wherever the repository root is on sys.path (issue 22).
PROBE = ("import transformers, bloombee_nb, kernels; from transformers.integrations import hub_kernels; "
         "from kernels import CUDAProperties; print(kernels.__file__)")


def real_kernels_file() -> Path:
    dist = importlib.metadata.distribution("kernels")   # installed with transformers >= 5.25
    return Path(dist.locate_file("kernels/__init__.py")).resolve()


def test_transformers_imports_its_kernels_in_this_pytest_process():
    assert str(ROOT) in [str(Path(p or ".").resolve()) for p in sys.path], "the test needs the root on sys.path"
    import kernels
    from transformers.integrations import hub_kernels  # noqa: F401 (failed with ImportError: CUDAProperties)
    assert Path(kernels.__file__).resolve() == real_kernels_file()


@pytest.mark.slow  # a subprocess Python (3 s)
def test_transformers_imports_its_kernels_from_python_in_the_repository_root():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve() == real_kernels_file()


@pytest.mark.slow  # a Jupyter kernel (3 s)
def test_transformers_imports_its_kernels_in_a_jupyter_kernel_started_in_the_root():
    from jupyter_client.manager import start_new_kernel
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        printed, errors = [], []

        def hook(msg):
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                errors.append("\n".join(msg["content"]["traceback"]))
        reply = kc.execute_interactive(PROBE.replace("; ", "\n"), output_hook=hook, timeout=120)
        assert reply["content"]["status"] == "ok", errors
        assert Path("".join(printed).strip()).resolve() == real_kernels_file()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_without_the_distribution_kernels_is_not_found_rather_than_ours():
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name, e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.startswith("kernels ") and "bloombee_nb._kernels" in out

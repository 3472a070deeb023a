"""kernels/ installs as bloombee_nb._kernels, and pyproject lists every subpackage (it cannot use `find`)."""

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


def test_kernels_import_under_the_package_name_from_anywhere(tmp_path):
    out = subprocess.run([sys.executable, "-c", "import bloombee_nb._kernels as k; print(k.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == ROOT / "kernels" / "__init__.py"

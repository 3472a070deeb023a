#!/usr/bin/env bash
# The prepared GPU check (stages on an accelerator): run from the repository root on a machine with
# a GPU and Python 3.12, with the wheels of what that machine lacks in .whl/ (dask, distributed,
# blosc2 and its needs, transformers as pinned in our venv, ...). No network is needed.
#
#   bash benchmarks/gpu_check.sh            # ~3-5 min on one H100
#   bash benchmarks/gpu_check.sh profile    # only the device tests and benchmarks/gpu_profile.py
#   bash benchmarks/gpu_check.sh install-only  # only step 1 (benchmarks/gpu_wave2.sh uses it)
#
# 1. installs .whl/*.whl into /tmp/site (nothing of the machine's own Python is changed) and makes
#    bloombee_nb importable from this tree: PYTHONPATH, plus a sitecustomize that maps
#    bloombee_nb._kernels to kernels/ as the editable install does (pyproject's package-dir);
# 2. runs the device tests: tests/model/test_device.py, tests/model/test_offload.py, tests/kernels;
# 3. runs benchmarks/gpu_check.py (real LocalCluster, device="cuda", exactness + timings), which
#    writes $OUT/gpu_check.json (benchmarks/results/ when OUT is unset).
# Logs go to $OUT too. Exit status: 0 only when both steps passed.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "installing .whl/*.whl failed"; exit 2; }
cat > "$SITE/sitecustomize.py" <<EOF
# Written by benchmarks/gpu_check.sh: bloombee_nb._kernels is the tree's kernels/ folder (what the
# editable install's finder does), then whatever sitecustomize this one shadows.
import importlib.abc, importlib.machinery, importlib.util, os, sys

_KERNELS = os.path.join("$ROOT", "kernels")


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "bloombee_nb._kernels":
            return importlib.util.spec_from_file_location(
                name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])
        return None


sys.meta_path.append(_KernelsFinder())
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
EOF
export PYTHONPATH=$SITE:$ROOT

[ "${1:-}" = "install-only" ] && exit 0

echo "== machine"
nvidia-smi -L || echo "nvidia-smi: not available"
python3 - <<'EOF'
import sys, torch, transformers, dask, distributed, blosc2
import bloombee_nb._kernels as k
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| dask", dask.__version__, "distributed", distributed.__version__, "blosc2", blosc2.__version__)
print("bloombee_nb._kernels from", k.__file__)
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
EOF

status=0
set -o pipefail
if [ "${1:-}" = "profile" ]; then  # only: where a decode step's time goes (benchmarks/gpu_profile.py)
    timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider tests/model/test_device.py 2>&1 | tail -3
    timeout -k 10 240 python3 benchmarks/gpu_profile.py 2>&1 | tee "$OUT/gpu_profile.log"
    exit $?
fi
echo "== device tests (the GPU visible: SpanRunner's default device is the GPU)"
timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/model/test_device.py tests/model/test_offload.py tests/kernels \
    "tests/cluster/test_batching.py::test_merged_steps_of_different_sessions_equal_separate_steps" \
    2>&1 | tee "$OUT/gpu_tests.log" || status=1
echo "== the same offload tests with no GPU visible"
CUDA_VISIBLE_DEVICES= timeout -k 10 90 python3 -m pytest -q -p no:cacheprovider \
    tests/model/test_offload.py tests/model/test_device.py 2>&1 | tee "$OUT/cpu_tests.log" || status=1

echo "== gpu_check.py"
timeout -k 10 300 python3 benchmarks/gpu_check.py --device cuda --budget-s 200 2>&1 | tee "$OUT/gpu_check.log" || status=1

echo "== done: status $status (tests log, script log and gpu_check.json in $OUT)"
exit $status

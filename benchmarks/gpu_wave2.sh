#!/usr/bin/env bash
# The second wave's GPU check, one prepared run (~6 min on one H200): run from the repository root
# with the wheels of what that machine lacks in .whl/ (see benchmarks/gpu_check.sh).
#   bash benchmarks/gpu_wave2.sh
# 1. device tests: every family's span on the GPU vs transformers (fp32 and bf16), offload, kernels;
# 2. quantized spans on the GPU (benchmarks/gpu_quantize.py);
# 3. per-stage latency with a bf16 58M Llama on the GPU: bench_pipeline.py --device cuda --dtype bfloat16.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
bash benchmarks/gpu_check.sh install-only || exit 2
export PYTHONPATH=/tmp/site:$ROOT
status=0
set -o pipefail
echo "== device tests"
timeout -k 10 200 python3 -m pytest -q -p no:cacheprovider -rs tests/model/test_device.py tests/kernels "tests/generate/test_family_features.py::test_bf16_on_the_gpu_equals_transformers_on_the_gpu" \
    2>&1 | tail -15 | tee "$OUT/wave2_tests.log" || status=1
echo "== quantized spans on the GPU"
timeout -k 10 120 python3 benchmarks/gpu_quantize.py --out "$OUT" 2>&1 | tail -20 | tee "$OUT/wave2_quantize.log" || status=1
echo "== per-stage latency, bf16 on the GPU"
timeout -k 10 200 python3 benchmarks/bench_pipeline.py --synthetic 58m --device cuda --dtype bfloat16 --relays chain \
    --repeats 3 --out "$OUT" 2>&1 | tail -40 | tee "$OUT/wave2_pipeline.log" || status=1
echo "== done: status $status"
exit $status

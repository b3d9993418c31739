#!/usr/bin/env bash
# The GPU checks of the TVM backend, run on the CUDA machine from the project root after
# `source .gpu/b/env.sh` (../shared/gpu/README.md): the gpu-marked tests, the conformance suite
# on tvm-cuda (failures and reasons written as an expectations file) and the benchmark table.
# Results go to $OUT (or ./gpu-results).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-cache}
# the digits data for the GPU training test (that machine has no scikit-learn): staged with
#   python -c "from sklearn.datasets import load_digits as l; import numpy as n; d=l(); n.savez('.gpu/b/digits.npz', images=d.images, target=d.target)"
[[ -f .gpu/b/digits.npz ]] && export KILN_DIGITS_NPZ=$PWD/.gpu/b/digits.npz
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
workers=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8" || echo "")
echo "== gpu tests" | tee -a "$out/summary.txt"
timeout 300 python3 -m pytest -m gpu -q -p no:cacheprovider $workers tests/backends/test_tvm.py tests/models/test_zoo.py tests/train \
  > "$out/pytest-gpu.txt" 2>&1
tail -3 "$out/pytest-gpu.txt" | tee -a "$out/summary.txt"
if [[ "${SKIP_CONFORMANCE:-0}" != 1 ]]; then
  echo "== conformance on tvm-cuda" | tee -a "$out/summary.txt"
  (cd tests/conformance && timeout 420 python3 report.py --target tvm-cuda --jobs 12 \
     --out "$out/tvm-cuda-failures.tsv" --write-expectations "$out/expected_failures_tvm-cuda.txt") \
    > "$out/conformance.txt" 2> "$out/conformance.stderr"
  head -4 "$out/conformance.txt" | tee -a "$out/summary.txt"
fi
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  echo "== benchmark" | tee -a "$out/summary.txt"
  timeout 420 python3 benchmarks/gpu_bench.py --out "$out/gpu-report.md" > "$out/bench.txt" 2> "$out/bench.stderr"
  cat "$out/gpu-report.md" >> "$out/summary.txt" 2>/dev/null
fi
if [[ -n "${TUNE_TRIALS:-}" ]]; then  # needs the tune extra: benchmarks/gpu_stage_tune.sh
  echo "== tuned benchmark ($TUNE_TRIALS trials a model)" | tee -a "$out/summary.txt"
  timeout "${TUNE_TIMEOUT:-540}" python3 benchmarks/gpu_bench.py --tune "$TUNE_TRIALS" --models "${TUNE_MODELS:-lstm-2x256/b16,resnet50/b1}" \
    --out "$out/gpu-report-tuned.md" > "$out/bench-tuned.txt" 2> "$out/bench-tuned.stderr"
  cat "$out/gpu-report-tuned.md" >> "$out/summary.txt" 2>/dev/null
fi
cat "$out/summary.txt"

#!/usr/bin/env bash
# Stages what `--tune` needs besides TVM (the tune extra: psutil, cloudpickle, xgboost-cpu, and
# scipy under xgboost) as Python 3.12 wheels in .gpu/c, for the offline GPU machine
# (../shared/gpu/README.md). There, after step 1 (.gpu/a) and before step 2 (.gpu/b):
#   run with carry [".gpu/c"]:  bash .gpu/c/install.sh
# then step 2 with TUNE_TRIALS=N set runs the tuned benchmark (benchmarks/gpu_checks.sh).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
mkdir -p .gpu/c
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/c "psutil>=5.9" "cloudpickle>=2.2" "xgboost-cpu>=2.1" scipy
rm -f .gpu/c/numpy-*.whl  # the GPU machine has its own numpy
cat > .gpu/c/install.sh <<'SH'
# the machine's numpy and scipy, where it has them, are kept
python3 -m pip install -q --no-index --find-links "$(dirname "${BASH_SOURCE[0]}")" psutil cloudpickle xgboost-cpu \
  && python3 -c 'import psutil, cloudpickle, xgboost; print("tune extra: xgboost", xgboost.__version__)'
SH
du -sh .gpu/c

#!/usr/bin/env bash
# The GPU path, checked and measured in one command on a lent GPU machine (see the README's GPU section):
# installs the wheels carried in .whl/ (benchmarks/gpu_wheels.sh fetches them), runs `pytest -m gpu`, then
# benchmarks/gpu_check.py (augmentation, training steps from a synthetic store, peak memory).
# Writes gpu_check.json, gpu_check.md and pytest_gpu.txt into $OUT (or ./gpu_check_out).
#   device run: bash benchmarks/gpu_check.sh            (carry: [".whl"])
#   CPU mode:   bash benchmarks/gpu_check.sh --device cpu --small
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD:${PYTHONPATH:-}
fi
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ ! -d .whl ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1
if [[ " $* " != *" --device cpu "* ]]; then
  # the test files that hold gpu tests (the converter's tests need SimpleITK, which does not travel)
  timeout 240 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_loader.py \
    tests/test_augment.py tests/training/test_evaluate.py 2>&1 | tee "$out/pytest_gpu.txt"
  pytest_log=(--pytest-log "$out/pytest_gpu.txt")
else
  pytest_log=()
fi
"$py" benchmarks/gpu_check.py --out "$out" "${pytest_log[@]}" "$@"

#!/usr/bin/env bash
# One call on the GPU machine: the kernel tests with compiled Triton, then bench/kernels.py.
# Needs .whl/ with pytest and hypothesis (the image lacks them): see bench/README.md.
#   bash bench/gpu_check.sh [pytest selection, default: the kernel and pattern tests]
set -uo pipefail
out=${OUT:-/tmp/fastft-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
selection=${*:-tests/test_kernel_*.py tests/test_pattern_*.py}
# shellcheck disable=SC2086
# Time-boxed so that the benchmark still runs inside one 10-minute device call.
timeout 270 python3 -m pytest -q -p no:logging --durations=10 $selection > "$out/tests.txt" 2>&1
echo "tests: $(tail -1 "$out/tests.txt")"
grep -E "^(FAILED|ERROR)" "$out/tests.txt" | head -20
python3 bench/kernels.py --out "$out" > "$out/bench.txt" 2>&1
status=$?
grep -vE "^\s+\S+\s+(eager|compile|fastft)\s+rel L2" "$out/bench.txt" | tail -30
exit $status

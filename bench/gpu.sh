#!/usr/bin/env bash
# The GPU tests and the benchmarks (GPU beside the CPU, in the same run) on a GPU machine, in
# one command; prints the table.
#
#   bench/gpu.sh [OUTDIR]      OUTDIR (default bench-gpu/) gets tests.log, bench.log,
#                              bench.json and table.md
#
# A machine that cannot reach a package index installs the wheels that
# bench/fetch-gpu-wheels.sh put in .whl/ (beside what it has: CuPy, NumPy, SciPy, pytest,
# pytest-benchmark). GPUDIFFIM_BENCH_FILTER (a pytest -k expression) picks benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench-gpu}
mkdir -p "$out"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpudiffim-site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/gpudiffim-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader
"$PY" - <<'PY' || exit 1
from gpudiffim.backend import get_backend, gpu_unavailable_reason
why = gpu_unavailable_reason()
print("GPU backend:", why or "usable")
if why is None:
    import cupy
    print("CuPy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
cpu = get_backend("cpu")
print("CPU FFT:", cpu.fft_library, "threads", cpu.threads)
PY
# the tests that run on the gpu backend (modules whose optional packages are missing there
# fail to collect and are listed; the rest run)
"$PY" -m pytest tests -q -m gpu -p no:cacheprovider --continue-on-collection-errors -rs \
    2>&1 | tee "$out/tests.log"
tests_rc=${PIPESTATUS[0]}
"$PY" -m pytest bench -q -s -o python_files='bench_*.py' -p no:cacheprovider --benchmark-only \
    --benchmark-columns=min,median,max,rounds --benchmark-json="$out/bench.json" \
    ${GPUDIFFIM_BENCH_FILTER:+-k "$GPUDIFFIM_BENCH_FILTER"} 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
"$PY" bench/table.py "$out/bench.json" | tee "$out/table.md"
echo "tests: exit $tests_rc; benchmarks: exit $bench_rc; logs and table in $out/"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]

#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index (Python 3.12, x86-64 Linux),
# into .whl/: what gpudiffim and its GPU tests need beyond an image that already has CuPy,
# NumPy, SciPy, pandas, pyarrow, matplotlib, tqdm, PyYAML, pytest, pytest-benchmark and
# hypothesis (the device README's package list).
# Then carry .whl/ to that machine and run bench/gpu.sh there: it installs them first.
#
#   bench/fetch-gpu-wheels.sh [PYTHON_VERSION]     (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35 2_39; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
# astropy and what it imports; array-api-compat for the GPU backend, array-api-strict for the
# tests' strict backend; pyFFTW so that the CPU baseline beside the GPU is the real one
for pkg in astropy pyerfa astropy-iers-data array-api-compat array-api-strict pyfftw; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp "${platforms[@]}" -d .whl "$pkg"
done
du -sh .whl

#!/usr/bin/env bash
# The GPU checks in one command, for a machine with a CUDA GPU and a CUDA build of torch:
# the CUDA tests (tests/test_cuda.py), then GPU benchmark sections of docs/benchmarks.md.
#
#   scripts/gpu_check.sh [SECTION ...]     default: gpu-sdxl-1024 (see distrifx/report.py SUITES)
#
# GPU_TESTS=0 skips the tests, to give a section the whole call (the inductor tests compile first: not yet timed on a GPU).
# Results land in docs/ (docs/bench/SECTION/ and docs/benchmarks.md); with RESULTS_DIR set, they are
# also copied there (for a machine whose working tree is thrown away afterwards).
# Each section takes a few minutes on one GPU (fresh processes: build full SDXL, capture it, time it).
# Installs this checkout (editable, no dependencies) if it is not installed. Packages missing on
# the machine (without a package index there) can travel as wheels in .whl/ (git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
set -euo pipefail
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
fi
if ! python3 -c "import distrifx.passes" 2> /dev/null; then  # not installed here yet: as in the README
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
tests=0
if [ "${GPU_TESTS:-1}" != 0 ]; then
    python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py || tests=$?  # the benchmarks run either way
fi
sections=("${@:-gpu-sdxl-1024}")
python3 -m distrifx report --out docs --sections "${sections[@]}"
if [ -n "${RESULTS_DIR:-}" ]; then
    for section in "${sections[@]}"; do
        mkdir -p "$RESULTS_DIR/$section" && cp docs/bench/"$section"/* "$RESULTS_DIR/$section/"
    done
    cp docs/benchmarks.md "$RESULTS_DIR/"
fi
exit "$tests"

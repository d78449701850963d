#!/usr/bin/env bash
# Fetch, where pip reaches PyPI, the wheels that benchmarks/gpu_suite.sh installs on a GPU
# machine whose image already has jax (CUDA), flax, optax, orbax, torch and OpenCV but not the
# packages below (Python 3.12, x86-64). They land in .whl/ (ignored by git); carry that folder.
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
platforms=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 \
  manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  ml-collections grain array-record portpicker importlib_resources
ls -l .whl

#!/usr/bin/env bash
# Downloads, into .whl/, the wheels a GPU machine without network needs beside its image's packages
# (JAX, flax, optax, orbax, absl, ... are there; grain is not), for its Python 3.12 on x86-64.
# Then: carry .whl to that machine and run `bash launch/gpu_check.sh` there (it installs them first).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  "grain==0.2.18" "array-record==0.8.6" "portpicker==1.6.0"
ls -l .whl

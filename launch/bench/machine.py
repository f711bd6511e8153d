"""What this machine can do: its peak FLOP/s (a published GPU peak or a measured matmul), its memory
bandwidth, and the environment the figures were taken in."""

from __future__ import annotations

import os
import platform

from absl import logging

from launch.bench.measure import free_memory_bytes, median_seconds

# Published dense bf16 peaks (FLOP/s, no sparsity) by `device_kind` substring; first match wins.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12))


def measure_matmul_peak(n: int, dtype: str, repeats: int) -> float:
  """FLOP/s of one large `n x n` matmul (median) -- the practical CPU peak MFU is measured against."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  seconds, _ = median_seconds(lambda: matmul(a, b), repeats)
  return 2.0 * n ** 3 / seconds


def measure_bandwidth(nbytes: int, repeats: int) -> dict:
  """Memory bandwidth from a large fp32 array: a sum (read once) and a scale (read + write)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  read, _ = median_seconds(lambda: total(x), repeats)
  # Donated so the output reuses the input's pages: a fresh output buffer each call would time the
  # kernel's first-touch page faults rather than the memory bus.
  scale = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  state = [jnp.ones((nbytes // 4,), jnp.float32)]

  def scale_in_place():
    state[0] = scale(state[0])
    return state[0]
  copy, _ = median_seconds(scale_in_place, repeats)
  return {"read_bytes_per_s": nbytes / read, "copy_bytes_per_s": 2 * nbytes / copy,
          "bytes_per_s": max(nbytes / read, 2 * nbytes / copy), "array_bytes": nbytes}


def device_peak_flops(repeats: int) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained): a published bf16 dense peak on GPU, a measured matmul on CPU."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    for key, peak in GPU_PEAKS:
      if key in dev.device_kind:
        return peak, f"published dense bf16 peak of {dev.device_kind}"
    logging.warning("unknown GPU %r: measuring a bf16 matmul instead of a published peak", dev.device_kind)
    return measure_matmul_peak(8192, "bfloat16", repeats), f"measured 8192^2 bf16 matmul on {dev.device_kind}"
  n = 4096
  return measure_matmul_peak(n, "float32", repeats), f"measured {n}^2 fp32 matmul (median of {repeats})"


def environment() -> dict:
  """Backend, device, versions and free memory, recorded beside the figures."""
  import jax
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "available_memory_bytes": free_memory_bytes()}

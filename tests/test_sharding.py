"""`sharding.put` on a forced 8-device CPU mesh (a subprocess: the device count is fixed at JAX import)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  from fellrec_jax import sharding
  mesh = sharding.make_mesh(4, 2)
  x = np.arange(8 * 6 * 4, dtype=np.float32).reshape(8, 6, 4)
  over_clients = sharding.per_client(mesh, x)
  over_model = sharding.shared(mesh, x)
  a = sharding.put(x, over_clients)                     # host -> shards
  assert a.sharding.is_equivalent_to(over_clients, 3) and len(a.addressable_shards) == 8
  assert sharding.put(a, over_clients) is a             # already laid out: untouched
  b = sharding.put(a, over_model)                       # device -> device, re-laid out
  assert b.sharding.is_equivalent_to(over_model, 3) and b.sharding.spec != a.sharding.spec
  np.testing.assert_array_equal(np.asarray(b), x)
  for shard in b.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  print("ok")
""")


def test_put_lays_out_host_and_device_values_and_keeps_laid_out_ones():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

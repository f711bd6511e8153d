"""`sharding.put` and the base weights' shardings on a forced 8-device CPU mesh (subprocesses: the device count is
fixed at JAX import)."""

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
  over_model = sharding.shared(mesh, {"blocks": {"q": {"w_io": x}}})["blocks"]["q"]["w_io"]  # split by its name
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


FORWARD_SCRIPT = textwrap.dedent("""
  import dataclasses, jax, jax.numpy as jnp, numpy as np
  import models
  from fellrec_jax import sharding
  from jax.sharding import PartitionSpec as P
  config, base, _ = models.load("tiny-llama", vocab_size=512, tie_embeddings=False)
  config = dataclasses.replace(config, lora=models.LoraConfig(targets=("q", "v", "down")))
  lora = jax.tree.map(lambda x: x + 0.01, models.init_lora(config, jax.random.key(1)))
  mesh = sharding.make_mesh(2, 4)
  shardings = sharding.shared(mesh, base)
  specs = {name: shardings["blocks"][name]["w_io"].spec for name in ("q", "k", "v", "o", "gate", "up", "down")}
  for name in ("q", "k", "v", "gate", "up"):   # column-parallel: the output features
    assert specs[name] == P(None, None, "model"), (name, specs[name])
  for name in ("o", "down"):                   # row-parallel: the input features
    assert specs[name] == P(None, "model", None), (name, specs[name])
  assert shardings["embed"]["table_vd"].spec == P("model", None)
  assert shardings["head"]["w_io"].spec == P(None, "model")
  assert shardings["blocks"]["attn_norm"]["scale_d"].spec == P()
  ids = jax.random.randint(jax.random.key(2), (4, 12), 1, 500)
  mask = jnp.ones_like(ids).at[:2, :3].set(0)
  forward = lambda b, l, i, m: models.apply(config, b, i, m, lora=l)
  want = jax.jit(forward)(base, lora, ids, mask)
  placed = sharding.put(base, shardings)
  assert placed["blocks"]["q"]["w_io"].addressable_shards[0].data.shape[-1] == 64 // 4
  got = jax.jit(forward, in_shardings=(shardings, None, None, None))(placed, lora, ids, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  print("ok")
""")


def _run(script: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)


def test_base_weights_split_by_their_names_and_a_sharded_forward_equals_the_unsharded_one():
  out = _run(FORWARD_SCRIPT)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_put_lays_out_host_and_device_values_and_keeps_laid_out_ones():
  out = _run(SCRIPT)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]

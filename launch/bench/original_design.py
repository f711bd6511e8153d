"""Section original_design: the released code's pattern (clients one by one, the base reloaded from disk
for each) against our vmapped round."""

from __future__ import annotations

import pathlib
import tempfile

from absl import flags

from launch.bench.fixtures import local_update, make_model, make_round
from launch.bench.measure import Table, median_seconds

FLAGS = flags.FLAGS  # read at call time: `launch.benchmark` defines the flags


def save_base(base, path: pathlib.Path) -> None:
  """The base weights as one safetensors file, as a checkpoint on disk would hold them."""
  import numpy as np
  from safetensors.numpy import save_file
  import jax
  flat = {"/".join(str(getattr(k, "key", k)) for k in path_keys): np.asarray(x)
          for path_keys, x in jax.tree_util.tree_flatten_with_path(base)[0]}
  save_file(flat, str(path))


def reload_base(path: pathlib.Path, like):
  """Reads the base back from disk into a fresh device pytree (the released code's per-client reload)."""
  import jax
  import jax.numpy as jnp
  from safetensors.numpy import load_file
  flat = load_file(str(path))
  leaves = [jnp.asarray(flat["/".join(str(getattr(k, "key", k)) for k in keys)])
            for keys, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def original_design_section(quick: bool, repeats: int) -> list[dict]:
  """Our vmapped round vs clients trained one by one with the base reloaded from disk for each client."""
  import jax
  import models
  from federated import client
  table = Table("original design: sequential + base reload per client vs our vmapped round",
                ["model", "C", "reload from", "original s", "ours s", "ratio"])
  cases = [("tiny-llama", FLAGS.exec_clients, FLAGS.exec_batch_size, FLAGS.exec_seq_len, "safetensors")]
  if not quick:
    cases.append(("smollm2-135m", 4, 2, 64, "gguf"))
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, c, b, t, source in cases:
      if source == "gguf":
        config, base, _ = models.load("smollm2-135m", lora=models.LoraConfig(rank=8, targets=("q", "v")))
        reload = lambda: models.load("smollm2-135m")[1]  # re-reads and dequantizes the GGUF
      else:
        config, base = make_model(name)
        path = pathlib.Path(tmp) / f"{name}.safetensors"
        save_base(base, path)
        reload = lambda: reload_base(path, base)
      rnd = make_round(config, base, c, FLAGS.exec_local_steps, b, t)
      update = local_update(rnd)
      ours = jax.jit(client.over_clients(update, "vmap"))
      one = jax.jit(update)
      per_client = rnd.per_client_args()

      def original():
        return [one(reload(), *args) for args in per_client]  # a fresh base per client, as released

      n = repeats if source != "gguf" else 2
      t_ours, _ = median_seconds(lambda: ours(*rnd.args()), n)
      t_orig, _ = median_seconds(original, n)
      results.append({"model": name, "C": c, "shape": dict(zip("CSABT", rnd.batches["input_ids"].shape)),
                      "reload_from": source, "original_seconds": t_orig, "ours_seconds": t_ours,
                      "ratio": t_orig / t_ours})
      table.add(name, c, source, t_orig, t_ours, t_orig / t_ours)
  return results

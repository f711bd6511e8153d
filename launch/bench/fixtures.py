"""Inputs of the benchmark's rounds: real model shapes with random weights (timings do not depend on the
values), right-padded synthetic token batches, stacked per-client state, and synthetic adapter stacks."""

from __future__ import annotations

import dataclasses
from typing import Any

PyTree = Any


def smollm2_config(dtype: str = "float32", lora=None):
  """SmolLM2-135M's shapes (random weights are enough for timing and memory)."""
  import models
  return models.ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64, intermediate_size=1536, tie_embeddings=True,
                            rope_theta=100000.0, max_positions=8192, param_dtype=dtype, compute_dtype=dtype,
                            lora=lora or models.LoraConfig(rank=8, targets=("q", "v")))


def make_model(name: str, dtype: str = "float32"):
  """`(config, base params)`: tiny-llama (r=8 q,v adapters) or SmolLM2-135M shapes, random init."""
  import jax
  import models
  lora = models.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q", "v"))
  if name == "tiny-llama":
    config, base, _ = models.load("tiny-llama", dtype=dtype, lora=lora)
    return config, base
  if name == "smollm2-135m":
    config = smollm2_config(dtype, lora)
    return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  raise ValueError(f"unknown benchmark model {name!r}")


def synthetic_batches(num_clients: int, steps: int, accum: int, batch: int, seq_len: int, vocab: int,
                      pad_id: int = 0, seed: int = 0, response_tokens: int | None = None) -> dict:
  """Right-padded random token batches `[C, S, A, B, T]` with lengths in `[T/2, T]`. The targets are the
  last `response_tokens` real tokens of each row (a BIGRec response), or every real token after the
  first when None (train_on_inputs); `target_index` rows have R = T-1 or `response_tokens` entries."""
  import numpy as np
  from fellrec_jax.data import pipeline
  rng = np.random.default_rng(seed)
  shape = (num_clients, steps, accum, batch)
  lengths = rng.integers(max(2, seq_len // 2), seq_len + 1, shape)
  attention = (np.arange(seq_len) < lengths[..., None]).astype(np.int32)
  ids = np.where(attention > 0, rng.integers(1, vocab, (*shape, seq_len)), pad_id).astype(np.int32)
  loss_mask = np.zeros_like(attention)
  loss_mask[..., :-1] = attention[..., 1:]
  if response_tokens is not None:
    loss_mask *= np.arange(seq_len) >= (lengths - 1 - response_tokens)[..., None]
  target_index, target_mask = pipeline.targets_from_loss_mask(
      loss_mask, seq_len - 1 if response_tokens is None else response_tokens)
  return {"input_ids": ids, "attention_mask": attention, "target_index": target_index, "target_mask": target_mask,
          "example_mask": np.ones(shape, np.float32)}


@dataclasses.dataclass
class Round:
  """One benchmark round's inputs: the shared base and the stacked per-client state and data."""

  config: Any
  base: PyTree
  lora: PyTree
  opt_state: PyTree
  batches: dict
  keys: Any
  tx: Any

  @property
  def num_clients(self) -> int:
    import jax
    return jax.tree.leaves(self.lora)[0].shape[0]

  def args(self):
    return self.base, self.lora, self.opt_state, self.batches, self.keys

  def per_client_args(self) -> list[tuple]:
    """Each client's own `(lora, opt_state, batches, key)`, sliced off the stacks."""
    import jax
    return [jax.tree.map(lambda x, c=c: x[c], self.args()[1:]) for c in range(self.num_clients)]

  @property
  def steps(self) -> int:
    """Local optimizer steps S of every client (the batches' second axis)."""
    return self.batches["input_ids"].shape[1]

  def tokens(self) -> int:
    """Tokens the round pushes through the model (real, unpadded ones)."""
    return int(self.batches["attention_mask"].sum())

  def target_tokens(self) -> int:
    return int((self.batches["target_mask"] * self.batches["example_mask"][..., None]).sum())


def make_round(config, base, num_clients: int, steps: int, batch: int, seq_len: int, accum: int = 1,
               response_tokens: int | None = None) -> Round:
  import jax
  import jax.numpy as jnp
  import models
  from federated import engine
  tx = __import__("optax").adamw(1e-3)
  lora = engine.stack_clients(models.init_lora(config, jax.random.key(1)), num_clients)
  lora = jax.tree.map(jnp.array, lora)  # materialise the broadcast: every client owns its copy
  batches = {k: jnp.asarray(v) for k, v in synthetic_batches(
      num_clients, steps, accum, batch, seq_len, config.vocab_size, config.pad_id,
      response_tokens=response_tokens).items()}
  return Round(config, base, lora, jax.vmap(tx.init)(lora), batches,
               jax.random.split(jax.random.key(0), num_clients), tx)


def local_update(rnd: Round):
  from federated import client
  return client.make_local_update(client.LocalSpec(rnd.config), rnd.tx)


def adapter_shapes(name: str) -> dict:
  """Per-client LoRA leaf shapes (r=8 on q and v), stacked on layers like `models.init_lora`."""
  if name == "smollm2-135m":
    layers, d, q_out, v_out = 30, 576, 576, 192
  elif name == "llama-7b":
    layers, d, q_out, v_out = 32, 4096, 4096, 4096
  else:
    raise ValueError(name)
  r = 8
  return {"q": {"a_ir": (layers, d, r), "b_ro": (layers, r, q_out)},
          "v": {"a_ir": (layers, d, r), "b_ro": (layers, r, v_out)}}


def synthetic_stack(shapes: dict, num_clients: int):
  """A stacked fp32 adapter pytree with distinct, cheap-to-make values per client."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def make():
    def leaf(shape, salt):
      full = (num_clients, *shape)
      c = jax.lax.broadcasted_iota(jnp.float32, full, 0)
      i = jax.lax.broadcasted_iota(jnp.float32, full, len(full) - 1)
      return jnp.sin(0.37 * c + 0.011 * i + salt)
    return jax.tree.map(leaf, shapes, {k: {kk: float(n) for n, kk in enumerate(v)} for k, v in shapes.items()},
                        is_leaf=lambda x: isinstance(x, tuple))
  return make()

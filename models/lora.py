"""LoRA adapters as their own pytree, stacked on the same layer axis as the base blocks.

`{"blocks": {target: {"a_ir": [L, in, r], "b_ro": [L, r, out]}}}`. A is drawn like PEFT's
kaiming-uniform default (bound `1/sqrt(in)`); B starts at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.transformer import Params


def init_lora(config: ModelConfig, base_params: Params, rng: jax.Array) -> Params:
  """Fresh fp32 adapters for `config.lora.targets` (shapes read off the base weights)."""
  if config.lora is None:
    raise ValueError("config.lora is None: set a LoraConfig to create adapters")
  r = config.lora.rank
  lora = {}
  for target, key in zip(config.lora.targets, jax.random.split(rng, len(config.lora.targets))):
    if target not in base_params["blocks"]:
      raise ValueError(f"LoRA target {target!r} is not a projection of this {config.arch} model")
    num_layers, d_in, d_out = base_params["blocks"][target]["w_io"].shape
    bound = 1.0 / jnp.sqrt(d_in)
    lora[target] = {"a_ir": jax.random.uniform(key, (num_layers, d_in, r), jnp.float32, -bound, bound),
                    "b_ro": jnp.zeros((num_layers, r, d_out), jnp.float32)}
  return {"blocks": lora}


def merge_lora(config: ModelConfig, base_params: Params, lora: Params) -> Params:
  """Base params with `scale * A @ B` folded into each targeted weight (for export/serving)."""
  blocks = dict(base_params["blocks"])
  for target, ab in lora["blocks"].items():
    w = blocks[target]["w_io"]
    delta = config.lora.scale * jnp.einsum("lir,lro->lio", ab["a_ir"], ab["b_ro"])
    blocks[target] = dict(blocks[target], w_io=(w.astype(jnp.float32) + delta).astype(w.dtype))
  return dict(base_params, blocks=blocks)

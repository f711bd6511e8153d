"""LoRA adapters as their own pytree (the blocks' `nnx.LoRAParam` state), stacked on the same layer axis as
the base blocks: `{"blocks": {target: {"a_ir": [L, in, r], "b_ro": [L, r, out]}}}` (drawn by
`models.modules.Linear`, kaiming-uniform A and zero B)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from models import transformer as tfm
from models.config import ModelConfig


@functools.partial(jax.jit, static_argnums=0)
def init_lora(config: ModelConfig, rng: jax.Array) -> tfm.Params:
  """Fresh fp32 adapters for `config.lora.targets`: the `nnx.LoRAParam` state of the model created with `rng`
  as its LoRA key (jit drops the base weights drawn alongside, which nothing reads)."""
  model = tfm.model_class(config)(config, key=jax.random.key(0), lora_key=rng)
  lora = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  made = sorted(lora.get("blocks", {}))
  if made != sorted(config.lora.targets):
    raise ValueError(f"LoRA targets {list(config.lora.targets)} but the model created adapters on {made}: "
                     f"{tfm.model_class(config).__name__} has no such projection, or does not read config.lora")
  return lora


def merge_lora(config: ModelConfig, base_params: tfm.Params, lora: tfm.Params) -> tfm.Params:
  """Base params with `scale * A @ B` folded into each targeted weight (for export/serving)."""
  blocks = dict(base_params["blocks"])
  for target, ab in lora["blocks"].items():
    w = blocks[target]["w_io"]
    delta = config.lora.scale * jnp.einsum("lir,lro->lio", ab["a_ir"], ab["b_ro"])
    blocks[target] = dict(blocks[target], w_io=(w.astype(jnp.float32) + delta).astype(w.dtype))
  return dict(base_params, blocks=blocks)

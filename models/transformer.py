"""The backbone's functional forward over nnx state, and the whole model as an nnx module.

`params` and `lora` are the pure-dict states of `Transformer` (layouts in `models.modules`); extra top-level
entries (e.g. an item table) are ignored. Each piece here merges the submodule it needs from its slice of
the state (`nnx.merge` inside the traced function) and calls it; the blocks run under `lax.scan`, one
layer's state slice merged per step. So the split's segments (`models.split`) are these same pieces on
slices of the layer axis, and `Transformer.__call__` is `apply` on the module's own state.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention as attn
from models import modules
from models.config import ModelConfig

Params = dict[str, Any]
HEAD_KEYS = ("embed", "embed_norm")
TAIL_KEYS = ("final_norm", "head")
SUBMODULES = (*HEAD_KEYS, "blocks", "final_norm")  # merged and called; the head is read as a matrix


class Transformer(nnx.Module):
  """The whole backbone: `embed`, (`embed_norm`), `blocks` (stacked), (`final_norm`, `head`).

  `key` draws the base weights (normal(0, `std`) matrices); `lora_key` (with `config.lora`) adds fresh adapters
  as `nnx.LoRAParam`s.
  """

  def __init__(self, config: ModelConfig, *, key: jax.Array, lora_key: jax.Array | None = None, std: float = 0.02):
    init = modules.Normal(iter(jax.random.split(key, 16)), std)  # the draw order fixes the weights a seed gives
    self.blocks = modules.Block(config, init=init, layers=(config.num_layers,), lora_key=lora_key)
    self.embed = modules.Embedding(config, init=init)
    if config.is_decoder:
      self.final_norm = modules.norm(config)
      if not config.tie_embeddings:
        self.head = modules.Linear(config.hidden_size, config.vocab_size, init=init, dtype=config.param_dtype,
                                   bias=False)
    else:
      self.embed_norm = modules.norm(config)
    self.config = config

  def __call__(self, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None, **kwargs) -> jax.Array:
    """`apply(config, base_state, ...)` with this module's adapters (keyword arguments as `apply`'s)."""
    _, lora, base = nnx.split(self, nnx.LoRAParam, nnx.Param)
    return apply(self.config, nnx.to_pure_dict(base), input_ids_bt, attention_mask_bt,
                 lora=nnx.to_pure_dict(lora) or None, **kwargs)


def model_class(config: ModelConfig) -> type[nnx.Module]:
  """The nnx module class whose submodules the functional forward runs: `config.module`, else `Transformer`."""
  return config.module or Transformer


@functools.cache
def graphdefs(config: ModelConfig, lora_targets: tuple[str, ...] | None) -> dict[str, nnx.GraphDef]:
  """The graphs of the model's submodules ("embed", "embed_norm", "blocks", "final_norm", those it has), built
  abstractly with adapters on `lora_targets` (None: without adapters). Graphs hold no shapes, so the stacked
  blocks' graph merges one layer's slice of their state."""
  if lora_targets is not None and config.lora is None:
    raise ValueError("adapters given but config.lora is None: set a LoraConfig (its scale and dropout apply)")
  lora = None if lora_targets is None else dataclasses.replace(config.lora, targets=lora_targets)
  cfg = dataclasses.replace(config, lora=lora)
  model = nnx.eval_shape(lambda: model_class(cfg)(cfg, key=jax.random.key(0),
                                                   lora_key=None if lora is None else jax.random.key(1)))
  return {name: nnx.graphdef(getattr(model, name)) for name in SUBMODULES if hasattr(model, name)}


def _merged(config: ModelConfig, name: str, state: Params, lora: Params | None = None) -> nnx.Module:
  """The submodule `name` with `state` (and adapters `lora`) merged in, inside the traced function."""
  graph = graphdefs(config, tuple(sorted(lora)) if lora else None)[name]
  return nnx.merge(graph, state, lora) if lora else nnx.merge(graph, state)


def init_params(config: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
  """Random base weights (normal(0, std) matrices, unit norms, zero biases) in `param_dtype`: the state of a
  fresh `model_class(config)`."""
  return nnx.to_pure_dict(nnx.state(model_class(config)(config, key=rng, std=std), nnx.Param))


# ----------------------------------------------------------------------------- blocks

def run_blocks(config: ModelConfig, blocks: Params, x_btd: jax.Array, attention_mask_bt: jax.Array, *,
               lora_blocks: Params | None = None, rng: jax.Array | None = None,
               kv_cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
               positions_bt: jax.Array | None = None, mask_b1ts: jax.Array | None = None,
               prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None):
  """Runs a stack of blocks (leading layer axis, possibly empty) with `lax.scan`, or a Python loop over
  its layers when `config.scan_layers` is False.

  Without a cache, positions and the mask are derived from `attention_mask_bt` ([B, T]); with
  `kv_cache=(k_lbskh, v_lbskh, index)` the caller passes positions and the `[B, 1, T, S]` mask, and
  optionally a read-only `prefix=(k_lbpkh, v_lbpkh, mask_bp)` that groups of rows attend to first
  (`attention.prefix_attention`). Returns `x_btd`, or `(x_btd, (k_lbskh, v_lbskh))` with a cache.
  """
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  if positions_bt is None:
    positions_bt = attn.positions_from_mask(attention_mask_bt)
  if mask_b1ts is None:
    mask_b1ts = attn.self_attention_mask(config, attention_mask_bt)
  rngs = None if rng is None else jax.random.split(rng, num_layers)
  caches = None if kv_cache is None else kv_cache[:2]
  index = None if kv_cache is None else kv_cache[2]
  prefix_kv = None if prefix is None else prefix[:2]

  def step(x, layer):
    p, lp, key, cache, pre = layer
    block = _merged(config, "blocks", p, lp)
    return block(x, positions_bt, mask_b1ts, rng=key, kv_cache=None if cache is None else (*cache, index),
                 prefix=None if pre is None else (*pre, prefix[2]))

  if config.remat:
    step = jax.checkpoint(step)
  layers = (blocks, lora_blocks or None, rngs, caches, prefix_kv)
  if config.scan_layers:
    x, new_caches = jax.lax.scan(step, x_btd, layers)
  else:  # no [L, ...] stacks: under scan, what the backward pass saves is written into them and sliced back out
    x, new_caches = x_btd, []
    for i in range(num_layers):
      x, cache = step(x, jax.tree.map(lambda a: a[i], layers))
      new_caches.append(cache)
    new_caches = (None if kv_cache is None else caches if num_layers == 0
                  else jax.tree.map(lambda *a: jnp.stack(a), *new_caches))
  return x if kv_cache is None else (x, new_caches)


# ----------------------------------------------------------------------------- embeddings and outputs

def embed(config: ModelConfig, params: Params, input_ids_bt: jax.Array) -> jax.Array:
  x = _merged(config, "embed", params["embed"])(input_ids_bt)
  return _merged(config, "embed_norm", params["embed_norm"])(x) if "embed_norm" in graphdefs(config, None) else x


def final_norm(config: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
  """Decoder: final RMSNorm. Encoder: identity (its blocks already end in a LayerNorm)."""
  if "final_norm" not in graphdefs(config, None):
    return x_btd
  return _merged(config, "final_norm", params["final_norm"])(x_btd)


def token_vectors(config: ModelConfig, params: Params) -> jax.Array:
  """`[V, D]` the output token vectors the head scores normed hidden states against (logits = x @ vectors.T):
  the embedding table when tied, else the head's transpose (XLA folds it into the matmul)."""
  return params["embed"]["table_vd"] if config.tie_embeddings else params["head"]["w_io"].T


def lm_head(config: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
  """Logits `[B, T, V]` in fp32 from normed hidden states (tied or untied head)."""
  return jnp.einsum("btd,vd->btv", x_btd, token_vectors(config, params).astype(x_btd.dtype),
                    preferred_element_type=jnp.float32)


def outputs(config: ModelConfig, params: Params, x_btd: jax.Array, *, hidden: bool = False,
            at: jax.Array | None = None) -> jax.Array:
  """Decoder logits `[B, T, V]`, or the final (normed) hidden states `[B, T, D]` when `hidden` or for encoders.

  `at` `[B, R]` asks for the outputs at those positions only, `[B, R, V]` or `[B, R, D]`: training on a short
  response needs a few of the T positions, and the head (V columns, fp32 logits) is the costliest part to spare.
  """
  x = final_norm(config, params, x_btd)
  if at is not None:
    x = jnp.take_along_axis(x, at[..., None], axis=1)
  if not config.is_decoder or hidden:
    return x
  return lm_head(config, params, x)


def item_token_params(params: Params, items_id: jax.Array) -> Params:
  """`params` whose token table is the catalogue's item vectors `[I, D]`: item-as-token inputs, one
  position per history item (UniSRec / LLM2Rec style) instead of ~15 tokens per title."""
  return dict(params, embed=dict(params["embed"], table_vd=items_id))


def mean_pool(hidden_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
  """Sentence embedding `[B, D]`: the mean over real tokens (sentence-transformers pooling)."""
  m = attention_mask_bt.astype(hidden_btd.dtype)[..., None]
  return (hidden_btd * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def pool(config: ModelConfig, hidden_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
  """`[B, D]` one vector per sequence: the last column (decoders and causal encoders, left-padded) or the
  mean over real tokens (encoders). The user representation that training and evaluation share."""
  return hidden_btd[:, -1] if config.left_padded else mean_pool(hidden_btd, attention_mask_bt)


def apply(config: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array | None = None,
          *, lora: Params | None = None, rng: jax.Array | None = None, hidden: bool = False,
          at: jax.Array | None = None, tail_input_btd: jax.Array | None = None) -> jax.Array:
  """The unsplit forward: logits `[B, T, V]` (decoder) or last hidden states `[B, T, D]` (encoder, or a
  decoder with `hidden=True`: after the final norm); `[B, R, V]` or `[B, R, D]` at positions `at` `[B, R]`.

  `rng` enables LoRA dropout (training); without it the forward is deterministic. `tail_input_btd` is
  added to the residual stream before the last block (where the client tail of a split starts).
  """
  if attention_mask_bt is None:
    attention_mask_bt = jnp.ones_like(input_ids_bt)
  x = embed(config, params, input_ids_bt)
  lora_blocks = None if lora is None else lora["blocks"]
  if tail_input_btd is None:
    x = run_blocks(config, params["blocks"], x, attention_mask_bt, lora_blocks=lora_blocks, rng=rng)
  else:
    last = config.num_layers - 1
    rngs = [None, None] if rng is None else list(jax.random.split(rng))
    part = lambda tree, start, stop: None if tree is None else jax.tree.map(lambda y: y[start:stop], tree)
    x = run_blocks(config, part(params["blocks"], 0, last), x, attention_mask_bt,
                   lora_blocks=part(lora_blocks, 0, last), rng=rngs[0])
    x = run_blocks(config, part(params["blocks"], last, None), x + tail_input_btd.astype(x.dtype), attention_mask_bt,
                   lora_blocks=part(lora_blocks, last, None), rng=rngs[1])
  return outputs(config, params, x, hidden=hidden, at=at)


def sequence_representation(config: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
                            lora: Params | None = None, tail_input_btd: jax.Array | None = None) -> jax.Array:
  """`[B, D]` float32: the final-norm hidden state of the last column (decoders and causal encoders, inputs
  left-padded) or the mean over real tokens of the last hidden states (encoders, right-padded)."""
  x_btd = apply(config, params, input_ids_bt, attention_mask_bt, lora=lora, hidden=True, tail_input_btd=tail_input_btd)
  return pool(config, x_btd, attention_mask_bt).astype(jnp.float32)

"""The backbones as Flax NNX modules: a Llama-family decoder and a BERT-family encoder.

`models.Transformer(config, key=...)` holds `embed`, (`embed_norm`), `blocks`, (`final_norm`, `head`). `blocks` is
one `Block` whose variables are created stacked on a leading layer axis L; it runs under `lax.scan`, each
step merging one layer's slice of the state into the per-layer `Block` graph (what `nnx.scan` does, written
with plain `jax` so it works in NNX's graph and tree modes alike). A split of the model is a slice of L.

LoRA adapters are their own variable type, `nnx.LoRAParam` (`a_ir`, `b_ro` on the targeted `Linear`s), so
`nnx.split(model, nnx.LoRAParam, nnx.Param)` gives `(graphdef, lora_state, base_state)` (in that order: a
LoRAParam is a Param). As pure dicts (`nnx.to_pure_dict(state)`), the engine's pytrees:

  decoder: {"embed": {"table_vd"},
            "blocks": {"attn_norm": {"scale_d"}, "q"|"k"|"v"|"o": {"w_io", ["b_o"]},
                       "mlp_norm": {"scale_d"}, "gate"|"up"|"down": {"w_io"}},
            "final_norm": {"scale_d"}, ["head": {"w_io"}]}
  encoder: {"embed": {"table_vd", "position_pd", "type_td"}, "embed_norm": {"scale_d", "bias_d"},
            "blocks": {"q"|"k"|"v"|"o"|"up"|"down": {"w_io", "b_o"},
                       "attn_norm"|"mlp_norm": {"scale_d", "bias_d"}}}
  lora:    {"blocks": {target: {"a_ir": [L, in, r], "b_ro": [L, r, out]}}}

Weights are drawn from an explicit key in a fixed order, one stacked `[L, ...]` draw per matrix (not per layer
under `nnx.vmap`), so a seed always gives the same weights.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from models import attention as attn
from models.config import LORA_TARGETS, LoraConfig, ModelConfig



@dataclasses.dataclass
class Normal:
  """Draws normal(0, std) weights, each from the next key of `keys` (norm scales start at one, biases at zero)."""

  keys: Iterator[jax.Array]
  std: float = 0.02

  def __call__(self, shape: tuple[int, ...], dtype) -> jax.Array:
    return (self.std * jax.random.normal(next(self.keys), shape)).astype(dtype)


class Linear(nnx.Module):
  """`x @ w_io + b_o`, plus `scale * dropout(x) @ a_ir @ b_ro` when created with a LoRA key.

  Variables carry the leading axes `layers` (`(L,)` inside a stacked `Block`). `a_ir` is drawn like PEFT's
  kaiming-uniform default (bound `1/sqrt(in)`) and `b_ro` starts at zero, so a fresh adapter changes nothing.
  """

  def __init__(self, d_in: int, d_out: int, *, init: Normal, dtype, bias: bool,
               layers: tuple[int, ...] = (), lora: LoraConfig | None = None, lora_key: jax.Array | None = None):
    self.w_io = nnx.Param(init((*layers, d_in, d_out), dtype))
    if bias:
      self.b_o = nnx.Param(jnp.zeros((*layers, d_out), dtype))
    if lora_key is not None:
      bound = 1.0 / jnp.sqrt(d_in)
      self.a_ir = nnx.LoRAParam(jax.random.uniform(lora_key, (*layers, d_in, lora.rank), jnp.float32, -bound, bound))
      self.b_ro = nnx.LoRAParam(jnp.zeros((*layers, lora.rank, d_out), jnp.float32))
      self.lora_scale, self.lora_dropout = lora.scale, lora.dropout

  def __call__(self, x_bti: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """Base weights are cast to the compute dtype (`x`'s) here, so they may be stored smaller."""
    dt = x_bti.dtype
    y = x_bti @ self.w_io[...].astype(dt)
    if hasattr(self, "b_o"):
      y = y + self.b_o[...].astype(dt)
    if hasattr(self, "a_ir"):
      x = x_bti
      rate = self.lora_dropout
      if rng is not None and rate > 0:
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0).astype(dt)
      y = y + self.lora_scale * ((x @ self.a_ir[...].astype(dt)) @ self.b_ro[...].astype(dt))
    return y


class RMSNorm(nnx.Module):
  def __init__(self, d: int, *, eps: float, dtype, layers: tuple[int, ...] = ()):
    self.scale_d = nnx.Param(jnp.ones((*layers, d), dtype))
    self.eps = eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale_d[...].astype(jnp.float32)).astype(x_btd.dtype)


class LayerNorm(nnx.Module):
  def __init__(self, d: int, *, eps: float, dtype, layers: tuple[int, ...] = ()):
    self.scale_d = nnx.Param(jnp.ones((*layers, d), dtype))
    self.bias_d = nnx.Param(jnp.zeros((*layers, d), dtype))
    self.eps = eps

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x = x_btd.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (x * self.scale_d[...].astype(jnp.float32) + self.bias_d[...].astype(jnp.float32)).astype(x_btd.dtype)


def norm(config: ModelConfig, layers: tuple[int, ...] = ()) -> RMSNorm | LayerNorm:
  """The config's norm: RMSNorm (decoders) or LayerNorm (encoders)."""
  kind = RMSNorm if config.is_decoder else LayerNorm
  return kind(config.hidden_size, eps=config.norm_eps, dtype=config.param_dtype, layers=layers)


class Block(nnx.Module):
  """One decoder (pre-norm, RoPE, SwiGLU) or encoder (post-norm, GELU) block; `layers=(L,)` stacks L of them.

  With `lora_key`, the projections in `config.lora.targets` get adapters (`lora_keys_of`: one key per target).
  """

  def __init__(self, config: ModelConfig, *, init: Normal, layers: tuple[int, ...] = (),
               lora_key: jax.Array | None = None):
    d, f = config.hidden_size, config.intermediate_size
    nh, kvh = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    bert = not config.is_decoder
    lora_keys = lora_keys_of(config, lora_key)
    dense = lambda name, i, o, bias: Linear(i, o, init=init, dtype=config.param_dtype, bias=bias, layers=layers,
                                            lora=config.lora, lora_key=lora_keys.get(name))
    qkv_bias = config.qkv_bias or bert
    self.attn_norm = norm(config, layers)
    self.q, self.k, self.v = dense("q", d, nh, qkv_bias), dense("k", d, kvh, qkv_bias), dense("v", d, kvh, qkv_bias)
    self.o = dense("o", nh, d, bert)
    self.mlp_norm = norm(config, layers)
    self.up, self.down = dense("up", d, f, bert), dense("down", f, d, bert)
    if not bert:
      self.gate = dense("gate", d, f, False)
    self.config = config

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_b1ts: jax.Array, *, rng: jax.Array | None = None,
               kv_cache=None, prefix=None):
    """`kv_cache` is `None` or `(k_bskh, v_bskh, index)`: new keys/values are written at `index` and attention
    runs over the whole cache, after `prefix` `(k_bpkh, v_bpkh, mask_bp)` when given (`prefix_attention`).
    Returns `(x_btd, (k_bskh, v_bskh) or None)`."""
    config = self.config
    keys = dict(zip(LORA_TARGETS, jax.random.split(rng, 7))) if rng is not None else {}
    proj = lambda name, x: getattr(self, name)(x, keys.get(name))
    b, t, _ = x_btd.shape
    n, kv, h = config.num_heads, config.num_kv_heads, config.head_dim

    h_in = self.attn_norm(x_btd) if config.is_decoder else x_btd
    q = proj("q", h_in).reshape(b, t, n, h)
    k = proj("k", h_in).reshape(b, t, kv, h)
    v = proj("v", h_in).reshape(b, t, kv, h)
    if config.is_decoder:
      inv_freq = attn.rope_frequencies(config)
      q, k = attn.apply_rope(q, positions_bt, inv_freq), attn.apply_rope(k, positions_bt, inv_freq)
    new_cache = None
    if kv_cache is not None:
      cache_k, cache_v, index = kv_cache
      k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
      new_cache = (k, v)
    mixed = attn.attention(q, k, v, mask_b1ts) if prefix is None else attn.prefix_attention(q, k, v, mask_b1ts, *prefix)
    out = proj("o", mixed)

    if config.is_decoder:
      x = x_btd + out
      h_mlp = self.mlp_norm(x)
      x = x + proj("down", jax.nn.silu(proj("gate", h_mlp)) * proj("up", h_mlp))
    else:
      x = self.attn_norm(x_btd + out)
      x = self.mlp_norm(x + proj("down", jax.nn.gelu(proj("up", x), approximate=False)))
    return x, new_cache


class Embedding(nnx.Module):
  """Token table (decoders); token + position + token-type tables (encoders, before `embed_norm`)."""

  def __init__(self, config: ModelConfig, *, init: Normal):
    d, dt = config.hidden_size, config.param_dtype
    self.table_vd = nnx.Param(init((config.vocab_size, d), dt))
    if not config.is_decoder:
      self.position_pd = nnx.Param(init((config.max_positions, d), dt))
      self.type_td = nnx.Param(init((config.type_vocab_size, d), dt))
    self.dtype = config.dtype

  def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
    x = jnp.take(self.table_vd[...], input_ids_bt, axis=0).astype(self.dtype)
    if not hasattr(self, "position_pd"):
      return x
    t = input_ids_bt.shape[-1]
    return x + self.position_pd[:t].astype(self.dtype) + self.type_td[0].astype(self.dtype)


def lora_targets(config: ModelConfig) -> tuple[str, ...]:
  """`config.lora.targets`, checked against the projections this architecture has."""
  if config.lora is None:
    raise ValueError("config.lora is None: set a LoraConfig to create adapters")
  have = LORA_TARGETS if config.is_decoder else tuple(p for p in LORA_TARGETS if p != "gate")
  for target in config.lora.targets:
    if target not in have:
      raise ValueError(f"LoRA target {target!r} is not a projection of this {config.arch} model")
  return config.lora.targets


def lora_keys_of(config: ModelConfig, lora_key: jax.Array | None) -> dict[str, jax.Array]:
  """One key per `config.lora.targets` projection (none without `lora_key`): the adapters a block creates."""
  if lora_key is None:
    return {}
  targets = lora_targets(config)
  return dict(zip(targets, jax.random.split(lora_key, len(targets))))

"""Pure-functional Llama-family decoder and BERT-family encoder over parameter pytrees.

Parameters (leaves are arrays; blocks are stacked on a leading layer axis L):

  decoder: {"embed": {"table_vd"},
            "blocks": {"attn_norm": {"scale_d"}, "q"|"k"|"v"|"o": {"w_io", ["b_o"]},
                       "mlp_norm": {"scale_d"}, "gate"|"up"|"down": {"w_io"}},
            "final_norm": {"scale_d"}, ["head": {"w_io"}]}
  encoder: {"embed": {"table_vd", "position_pd", "type_td"}, "embed_norm": {"scale_d", "bias_d"},
            "blocks": {"q"|"k"|"v"|"o"|"up"|"down": {"w_io", "b_o"},
                       "attn_norm"|"mlp_norm": {"scale_d", "bias_d"}}}

LoRA parameters mirror the blocks: {"blocks": {target: {"a_ir", "b_ro"}}} with the same layer axis, so
slicing the layer axis splits base weights and adapters alike. Blocks run under `lax.scan`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from models.config import ModelConfig

Params = dict[str, Any]
HEAD_KEYS = ("embed", "embed_norm")
TAIL_KEYS = ("final_norm", "head")


# ----------------------------------------------------------------------------- layers

def rms_norm(p: Params, x_btd: jax.Array, eps: float) -> jax.Array:
  x = x_btd.astype(jnp.float32)
  x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return (x * p["scale_d"].astype(jnp.float32)).astype(x_btd.dtype)


def layer_norm(p: Params, x_btd: jax.Array, eps: float) -> jax.Array:
  x = x_btd.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  x = (x - mean) * jax.lax.rsqrt(var + eps)
  return (x * p["scale_d"].astype(jnp.float32) + p["bias_d"].astype(jnp.float32)).astype(x_btd.dtype)


def linear(p: Params, x_bti: jax.Array, lora: Params | None, config: ModelConfig,
           rng: jax.Array | None) -> jax.Array:
  """`x @ w + b`, plus the LoRA path `scale * dropout(x) @ a @ b` when `lora` is given.

  Base weights are cast to the compute dtype here, so they may be stored in a smaller dtype.
  """
  dt = x_bti.dtype
  y = x_bti @ p["w_io"].astype(dt)
  if "b_o" in p:
    y = y + p["b_o"].astype(dt)
  if lora is not None:
    x = x_bti
    rate = config.lora.dropout
    if rng is not None and rate > 0:
      keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
      x = jnp.where(keep, x / (1.0 - rate), 0).astype(dt)
    y = y + config.lora.scale * ((x @ lora["a_ir"].astype(dt)) @ lora["b_ro"].astype(dt))
  return y


def rope_frequencies(config: ModelConfig) -> jax.Array:
  """Inverse frequencies `[head_dim // 2]`, with llama3 long-context scaling when configured."""
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim))
  if config.rope_scaling is None:
    return inv_freq
  factor, low_freq_factor, high_freq_factor, original_max = config.rope_scaling
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_max / low_freq_factor
  high_freq_wavelen = original_max / high_freq_factor
  smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  return jnp.where(wavelen > low_freq_wavelen, inv_freq / factor,
                   jnp.where(wavelen < high_freq_wavelen, inv_freq, smoothed))


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, inv_freq_h: jax.Array) -> jax.Array:
  """HF "rotate half" rotary embedding."""
  angles = positions_bt[..., None].astype(jnp.float32) * inv_freq_h  # [B, T, H/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
  x = x_btnh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x_btnh.dtype)


def attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
  """Grouped-query attention; logits and softmax in fp32. Fully masked rows give a uniform average."""
  b, t, n, h = q_btnh.shape
  kv = k_bskh.shape[2]
  q = q_btnh.reshape(b, t, kv, n // kv, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) / math.sqrt(h)
  logits = jnp.where(mask_b1ts[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_bskh.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
  return out.reshape(b, t, n * h)


def prefix_attention(q_rtnh: jax.Array, k_rskh: jax.Array, v_rskh: jax.Array, mask_r1ts: jax.Array,
                     prefix_k_bpkh: jax.Array, prefix_v_bpkh: jax.Array, prefix_mask_bp: jax.Array) -> jax.Array:
  """`attention` of R = B * J rows, each group of J consecutive rows (a prompt's beams) sharing one
  prefix: the keys are the prefix's `[B, P]` (where `prefix_mask_bp`) then the row's own `[R, S]`
  (where `mask_r1ts`), one softmax over both. The prefix is read once per prompt, never copied per row."""
  r, t, n, h = q_rtnh.shape
  b, s, kv = prefix_k_bpkh.shape[0], k_rskh.shape[1], k_rskh.shape[2]
  j = r // b
  q = q_rtnh.reshape(b, j, t, kv, n // kv, h)
  k_bjskh, v_bjskh = k_rskh.reshape(b, j, s, kv, h), v_rskh.reshape(b, j, s, kv, h)
  low, scale = jnp.finfo(jnp.float32).min, math.sqrt(h)
  logits_p = jnp.einsum("bjtkgh,bpkh->bjkgtp", q, prefix_k_bpkh, preferred_element_type=jnp.float32) / scale
  logits_p = jnp.where(prefix_mask_bp.astype(bool)[:, None, None, None, None, :], logits_p, low)
  logits_s = jnp.einsum("bjtkgh,bjskh->bjkgts", q, k_bjskh, preferred_element_type=jnp.float32) / scale
  logits_s = jnp.where(mask_r1ts.reshape(b, j, 1, 1, t, s), logits_s, low)
  probs = jax.nn.softmax(jnp.concatenate([logits_p, logits_s], axis=-1), axis=-1).astype(v_rskh.dtype)
  p = prefix_k_bpkh.shape[1]
  out = (jnp.einsum("bjkgtp,bpkh->bjtkgh", probs[..., :p], prefix_v_bpkh)
         + jnp.einsum("bjkgts,bjskh->bjtkgh", probs[..., p:], v_bjskh))
  return out.reshape(r, t, n * h)


# ----------------------------------------------------------------------------- masks and positions

def positions_from_mask(attention_mask_bt: jax.Array) -> jax.Array:
  """Token positions that skip left padding: `cumsum(mask) - 1`, clipped at 0."""
  return jnp.maximum(jnp.cumsum(attention_mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def self_attention_mask(config: ModelConfig, attention_mask_bt: jax.Array) -> jax.Array:
  """Boolean `[B, 1, T, T]`: keys that are real tokens, and not in the future for decoders (and causal
  encoders)."""
  valid = attention_mask_bt.astype(bool)[:, None, None, :]
  if not config.left_padded:
    return valid
  t = attention_mask_bt.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
  return valid & causal


# ----------------------------------------------------------------------------- blocks

def _block(config: ModelConfig, x_btd, p: Params, lora: Params | None, rng, positions_bt, mask_b1ts, kv_cache,
           prefix=None):
  """One decoder (pre-norm, RoPE, SwiGLU) or encoder (post-norm, GELU) block.

  `kv_cache` is `None` or `(k_bskh, v_bskh, index)`: new keys/values are written at `index` and
  attention runs over the whole cache, after `prefix` `(k_bpkh, v_bpkh, mask_bp)` when given
  (`prefix_attention`). Returns `(x_btd, (k_bskh, v_bskh) or None)`.
  """
  lora = lora or {}
  keys = dict(zip(("q", "k", "v", "o", "gate", "up", "down"), jax.random.split(rng, 7))) if rng is not None else {}
  proj = lambda name, x: linear(p[name], x, lora.get(name), config, keys.get(name))
  b, t, _ = x_btd.shape
  n, kv, h = config.num_heads, config.num_kv_heads, config.head_dim

  h_in = rms_norm(p["attn_norm"], x_btd, config.norm_eps) if config.is_decoder else x_btd
  q = proj("q", h_in).reshape(b, t, n, h)
  k = proj("k", h_in).reshape(b, t, kv, h)
  v = proj("v", h_in).reshape(b, t, kv, h)
  if config.is_decoder:
    inv_freq = rope_frequencies(config)
    q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
  new_cache = None
  if kv_cache is not None:
    cache_k, cache_v, index = kv_cache
    k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
    v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
    new_cache = (k, v)
  attn = proj("o", attention(q, k, v, mask_b1ts) if prefix is None else prefix_attention(q, k, v, mask_b1ts, *prefix))

  if config.is_decoder:
    x = x_btd + attn
    h_mlp = rms_norm(p["mlp_norm"], x, config.norm_eps)
    x = x + proj("down", jax.nn.silu(proj("gate", h_mlp)) * proj("up", h_mlp))
  else:
    x = layer_norm(p["attn_norm"], x_btd + attn, config.norm_eps)
    x = layer_norm(p["mlp_norm"], x + proj("down", jax.nn.gelu(proj("up", x), approximate=False)), config.norm_eps)
  return x, new_cache


def run_blocks(config: ModelConfig, blocks: Params, x_btd: jax.Array, attention_mask_bt: jax.Array, *,
               lora_blocks: Params | None = None, rng: jax.Array | None = None,
               kv_cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
               positions_bt: jax.Array | None = None, mask_b1ts: jax.Array | None = None,
               prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None):
  """Runs a stack of blocks (leading layer axis, possibly empty) with `lax.scan`.

  Without a cache, positions and the mask are derived from `attention_mask_bt` ([B, T]); with
  `kv_cache=(k_lbskh, v_lbskh, index)` the caller passes positions and the `[B, 1, T, S]` mask, and
  optionally a read-only `prefix=(k_lbpkh, v_lbpkh, mask_bp)` that groups of rows attend to first
  (`prefix_attention`). Returns `x_btd`, or `(x_btd, (k_lbskh, v_lbskh))` with a cache.
  """
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  if positions_bt is None:
    positions_bt = positions_from_mask(attention_mask_bt)
  if mask_b1ts is None:
    mask_b1ts = self_attention_mask(config, attention_mask_bt)
  rngs = None if rng is None else jax.random.split(rng, num_layers)
  caches = None if kv_cache is None else kv_cache[:2]
  index = None if kv_cache is None else kv_cache[2]

  prefix_kv = None if prefix is None else prefix[:2]

  def step(x, layer):
    p, lp, key, cache, pre = layer
    x, new_cache = _block(config, x, p, lp, key, positions_bt, mask_b1ts,
                          None if cache is None else (*cache, index), None if pre is None else (*pre, prefix[2]))
    return x, new_cache

  if config.remat:
    step = jax.checkpoint(step)
  x, new_caches = jax.lax.scan(step, x_btd, (blocks, lora_blocks, rngs, caches, prefix_kv))
  return x if kv_cache is None else (x, new_caches)


# ----------------------------------------------------------------------------- embeddings and outputs

def embed(config: ModelConfig, params: Params, input_ids_bt: jax.Array) -> jax.Array:
  table = params["embed"]["table_vd"]
  x = jnp.take(table, input_ids_bt, axis=0).astype(config.dtype)
  if config.is_decoder:
    return x
  t = input_ids_bt.shape[-1]
  x = x + params["embed"]["position_pd"][:t].astype(config.dtype) + params["embed"]["type_td"][0].astype(config.dtype)
  return layer_norm(params["embed_norm"], x, config.norm_eps)


def final_norm(config: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
  """Decoder: final RMSNorm. Encoder: identity (its blocks already end in a LayerNorm)."""
  return rms_norm(params["final_norm"], x_btd, config.norm_eps) if config.is_decoder else x_btd


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


# ----------------------------------------------------------------------------- initialisation

def init_params(config: ModelConfig, rng: jax.Array, std: float = 0.02) -> Params:
  """Random weights (normal(0, std) matrices, unit norms, zero biases) in `param_dtype`."""
  d, f, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
  nh, kvh = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  dt = jnp.dtype(config.param_dtype)
  keys = iter(jax.random.split(rng, 16))
  normal = lambda *shape: (std * jax.random.normal(next(keys), shape)).astype(dt)
  ones = lambda *shape: jnp.ones(shape, dt)
  zeros = lambda *shape: jnp.zeros(shape, dt)
  bert = not config.is_decoder

  def dense(i, o, bias):
    return {"w_io": normal(L, i, o)} | ({"b_o": zeros(L, o)} if bias else {})

  def norm():
    return {"scale_d": ones(L, d)} | ({"bias_d": zeros(L, d)} if bert else {})

  qkv_bias = config.qkv_bias or bert
  blocks = {"attn_norm": norm(), "q": dense(d, nh, qkv_bias), "k": dense(d, kvh, qkv_bias),
            "v": dense(d, kvh, qkv_bias), "o": dense(nh, d, bert), "mlp_norm": norm(),
            "up": dense(d, f, bert), "down": dense(f, d, bert)}
  if bert:
    return {"embed": {"table_vd": normal(v, d), "position_pd": normal(config.max_positions, d),
                      "type_td": normal(config.type_vocab_size, d)},
            "embed_norm": {"scale_d": ones(d), "bias_d": zeros(d)}, "blocks": blocks}
  blocks["gate"] = dense(d, f, False)
  params = {"embed": {"table_vd": normal(v, d)}, "blocks": blocks, "final_norm": {"scale_d": ones(d)}}
  if not config.tie_embeddings:
    params["head"] = {"w_io": normal(d, v)}
  return params

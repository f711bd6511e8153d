"""Parameter-free pieces of the attention layers: rotary embeddings, (prefix) attention, masks and positions.

Shapes: b batch, t query positions, s key positions, n query heads, k key/value heads, h head size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from models.config import ModelConfig


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

"""Defenses at the split cut: what the client does to the activations before the server receives them.

`--mode=attack` showed that a server which trains an inverter on public text reads the clients' prompts
back from the cut activations at every k. Three defenses, each applied inside the real split step
(`federated.client.split_value_and_grad`), so the server still receives only activations, the padding
mask and its own adapters:

  noise (`--cut_noise=r`, `--cut_clip=C`): each token's activation is clipped to L2 norm C, then Gaussian
    noise with per-coordinate std `r * C / sqrt(D)` is added, so the noise vector's expected norm is r
    times the clip (the noise-to-signal ratio). Without `--cut_clip` nothing is clipped and the std is
    `r * ||x_t|| / sqrt(D)` per token (the ratio exact for every token). This is NOT an (epsilon, delta)
    guarantee: with clipping, one token's activation has L2 sensitivity 2C, so the per-token Gaussian
    mechanism's noise multiplier is `r / (2 sqrt(D))` (0.02 at r = 1, D = 576), far below the ~1 that a
    meaningful epsilon needs, and no accounting over tokens, steps or rounds is done. It is a knob whose
    effect `--mode=attack` measures against a server that knows it and trains its inverter on noised
    public activations.
  NoPeek (`--cut_nopeek=w`): the client adds `w * dCor(embeddings, head output)` to its training objective
    (Vepakomma et al., "NoPeek", 2020), the distance correlation over the tokens of each sequence,
    averaged over sequences, so the head adapters learn activations less tied to the tokens. The training
    loss clients report (and FELLRec's warm weights use) stays the plain loss. With no head blocks (k = 0)
    or no head adapters there is nothing for it to train.
  private response (`--private_response`): the server never receives activations at or after the first
    label position of a row (the response, with teacher forcing, is the next item's title; a causal head
    mixes it into every later position). Those positions are zeroed and masked out of what the server
    gets, and the client runs the whole sequence through its own copy of the body blocks' frozen base
    weights, without adapters, taking those positions' body outputs from its copy. Costs: the client holds
    and runs the body's base weights (the split's memory saving is gone; the server still holds and trains
    its adapters), and response positions see the body without its adapters. What still reaches the
    server: the activation gradients at prompt positions, which depend on the labels through the tail's
    loss (the last prompt position predicts the first response token) and its attention.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
NOISE_STREAM = 0x6375  # folded into a micro-batch key for the cut noise; the dropout keys stay as they were


@dataclasses.dataclass(frozen=True)
class CutDefense:
  """Static defense settings of a split step (see the module docstring); the default does nothing."""

  noise: float = 0.0
  clip: float | None = None
  nopeek: float = 0.0
  private_response: bool = False

  def __post_init__(self):
    if not (self.noise >= 0 and math.isfinite(self.noise)):
      raise ValueError(f"cut noise-to-signal ratio must be finite and >= 0, got {self.noise}")
    if self.clip is not None and not self.clip > 0:
      raise ValueError(f"cut clip must be > 0, got {self.clip}")
    if not self.nopeek >= 0:
      raise ValueError(f"NoPeek weight must be >= 0, got {self.nopeek}")

  @property
  def masks_server(self) -> bool:
    """Whether the server's input differs from the head's output (clipping, noise or hidden positions)."""
    return self.noise > 0 or self.clip is not None or self.private_response


def defense_of(cfg) -> CutDefense:
  """The defense a `RunConfig`'s `--cut_*` and `--private_response` flags ask for."""
  return CutDefense(cfg.cut_noise, cfg.cut_clip, cfg.cut_nopeek, cfg.private_response)


def clip_tokens(act_btd: jax.Array, clip: float) -> jax.Array:
  """`act_btd` with every token's vector scaled to L2 norm <= clip."""
  norm = jnp.linalg.norm(act_btd.astype(jnp.float32), axis=-1, keepdims=True)
  return act_btd * jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12)).astype(act_btd.dtype)


def add_cut_noise(act_btd: jax.Array, key: jax.Array, ratio: float, clip: float | None) -> jax.Array:
  """`act + N(0, s^2)` with `s = ratio * scale / sqrt(D)`, scale = the clip, else each token's own norm
  (held constant in the backward pass: the noise is an additive input, not a function to train through)."""
  d = act_btd.shape[-1]
  scale = (clip if clip is not None
           else jax.lax.stop_gradient(jnp.linalg.norm(act_btd.astype(jnp.float32), axis=-1, keepdims=True)))
  noise = jax.random.normal(key, act_btd.shape, jnp.float32) * (ratio * scale / math.sqrt(d))
  return act_btd + noise.astype(act_btd.dtype)


def visible_positions(attention_mask_bt: jax.Array, target_index_br: jax.Array, target_mask_br: jax.Array) -> jax.Array:
  """`[B, T]` int32: the real positions before each row's first label token (the token after a target
  position). A row without targets is visible whole."""
  t = attention_mask_bt.shape[-1]
  first_label = jnp.min(jnp.where(target_mask_br > 0, target_index_br + 1, t), axis=-1, keepdims=True)
  return attention_mask_bt * (jnp.arange(t)[None] < first_label).astype(attention_mask_bt.dtype)


def to_server(defense: CutDefense, act_btd: jax.Array, visible_bt: jax.Array | None, key: jax.Array | None):
  """What the server receives instead of the head output `act_btd`: clipped, noised, and zero outside
  `visible_bt` (private response). Identity for the default defense."""
  out = act_btd
  if defense.clip is not None:
    out = clip_tokens(out, defense.clip)
  if defense.noise > 0:
    if key is None:
      raise ValueError("--cut_noise > 0 needs the step's random key (the split step was called with rng=None)")
    out = add_cut_noise(out, key, defense.noise, defense.clip)
  if defense.private_response:
    out = out * visible_bt[..., None].astype(out.dtype)
  return out


def through_cut(defense: CutDefense, body_fn: Callable, copy_fn: Callable, lora_body: PyTree, act_up: jax.Array,
                visible_bt: jax.Array | None, rng: jax.Array | None):
  """`jax.vjp(body_fn, lora_body, act_up)` with the defense between the head and the server.

  Returns `(act_down, vjp, sent, server_out)`: `vjp(grad_down) -> (grad_lora_body, grad_act_up, grad_server)`,
  `grad_server` being the gradient the server receives for its output; `sent` the server's input. With a
  private response, `act_down` takes the positions outside `visible_bt` from `copy_fn(act_up)` (the client's
  adapter-free copy of the body) and `body_fn` is called as `body_fn(lora, sent, visible_bt)`.
  """
  if not defense.masks_server:
    act_down, vjp = jax.vjp(body_fn, lora_body, act_up)
    return act_down, lambda g: (*vjp(g), g), act_up, act_down
  key = None if rng is None else jax.random.fold_in(rng, NOISE_STREAM)
  sent, send_vjp = jax.vjp(lambda a: to_server(defense, a, visible_bt, key), act_up)
  if not defense.private_response:
    server_out, server_vjp = jax.vjp(body_fn, lora_body, sent)

    def noised_vjp(grad_down):
      grad_lora, grad_sent = server_vjp(grad_down)
      return grad_lora, send_vjp(grad_sent)[0], grad_down
    return server_out, noised_vjp, sent, server_out
  server_out, server_vjp = jax.vjp(lambda lb, s: body_fn(lb, s, visible_bt), lora_body, sent)
  own, own_vjp = jax.vjp(copy_fn, act_up)
  keep = visible_bt[..., None].astype(server_out.dtype)
  act_down = server_out * keep + own * (1 - keep)

  def vjp(grad_down):
    grad_server = grad_down * keep
    grad_lora, grad_sent = server_vjp(grad_server)
    return grad_lora, send_vjp(grad_sent)[0] + own_vjp(grad_down * (1 - keep))[0], grad_server
  return act_down, vjp, sent, server_out


# ----------------------------------------------------------------------------- NoPeek

def _centred_distances(x_nd: jax.Array, w_n: jax.Array) -> jax.Array:
  """`[N, N]` double-centred Euclidean distances among the rows with weight 1 in `w_n` (others ignored).
  The diagonal (and distances that round to 0) carry no gradient: d||x||/dx is undefined at 0."""
  x = x_nd.astype(jnp.float32)
  sq_n = jnp.sum(x * x, axis=-1)
  sq = sq_n[:, None] + sq_n[None, :] - 2.0 * x @ x.T
  d = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, jnp.sqrt(jnp.maximum(sq, 1e-12)))
  n = jnp.maximum(jnp.sum(w_n), 1.0)
  row = d @ w_n / n
  grand = w_n @ row / n
  return d - row[:, None] - row[None, :] + grand


def distance_correlation(x_nd: jax.Array, y_nd: jax.Array, w_n: jax.Array) -> jax.Array:
  """Sample distance correlation (Szekely et al. 2007) of the rows of x and y with weight 1 in `w_n`
  (0/1); 0 when fewer than two rows count or either side is constant."""
  w = w_n.astype(jnp.float32)
  a, b = _centred_distances(x_nd, w), _centred_distances(y_nd, w)
  ww = w[:, None] * w[None, :]
  cov, var_x, var_y = (jnp.sum(ww * p * q) for p, q in ((a, b), (a, a), (b, b)))
  dcor_sq = cov / jnp.sqrt(jnp.maximum(var_x * var_y, 1e-30))
  return jnp.where((jnp.sum(w) >= 2) & (var_x > 0) & (var_y > 0), jnp.sqrt(jnp.maximum(dcor_sq, 1e-30)), 0.0)


def sequence_dcor(emb_btd: jax.Array, act_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
  """Mean over rows with >= 2 real tokens of the distance correlation between a row's token embeddings
  and its cut activations, over its real tokens."""
  per_row = jax.vmap(distance_correlation)(emb_btd, act_btd, attention_mask_bt)
  counted = (jnp.sum(attention_mask_bt, axis=-1) >= 2).astype(jnp.float32)
  return jnp.sum(per_row * counted) / jnp.maximum(jnp.sum(counted), 1.0)

"""What a client minimises: the generative next-token loss and the discriminative full-softmax loss over
items, with the scores users and items are ranked by. Losses share the signature `(outputs, batch,
vectors) -> (loss_sum, count)`: the model's final hidden states and the vectors they are scored against
(the output token vectors, or the items); `model_outputs` asks the model for the states a loss needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import models
from models.config import ModelConfig

Batch = dict[str, jax.Array]


HEAD_CHUNK_ROWS = 128  # rows of fp32 logits live at once in `token_nll`: [128, V] (24 MiB at V = 49,152)


def generative_loss(hidden_brd: jax.Array, batch: Batch, vectors_vd: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the target positions, and the number of target tokens.

  `hidden_brd` are the final (normed) hidden states at `batch["target_index"]` only (`model_outputs` asks the
  model for those), scored against the output token vectors `vectors_vd` (`models.token_vectors`) by
  `token_nll`, which never holds the `[B, R, V]` logits.
  """
  targets_br = jnp.take_along_axis(batch["input_ids"], batch["target_index"] + 1, axis=-1)
  mask = batch["target_mask"] * batch["example_mask"][..., None]
  nll = token_nll(hidden_brd.reshape(-1, hidden_brd.shape[-1]), vectors_vd, targets_br.reshape(-1))
  return jnp.sum(nll.reshape(mask.shape) * mask), jnp.sum(mask).astype(jnp.float32)


def _row_chunks(x, rows: int):
  """`[N, ...]` -> `[ceil(N / rows), rows, ...]`, zero-padded."""
  pad = -x.shape[0] % rows
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  return x.reshape(-1, rows, *x.shape[1:])


def _chunk_nll(h_rd, vectors_vd, t_r):
  """`(nll [r], d nll / d logits [r, V])` of one chunk of rows, logits in fp32."""
  logits = jnp.einsum("rd,vd->rv", h_rd, vectors_vd.astype(h_rd.dtype), preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, t_r[:, None], axis=-1)[:, 0]
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_r[:, None]
  return nll, jnp.exp(logits - lse[:, None]) - onehot


def _token_nll_fwd(hidden_nd, vectors_vd, targets_n):
  """One pass over row chunks: each chunk's logits give its nll and, while they are in cache, the
  gradient of its nll w.r.t. its hidden states (`softmax - onehot`) @ vectors; the `[N, V]` logits are
  never held, and the softmax is evaluated once (autodiff of a plain cross-entropy holds the logits and
  exponentiates them again in the backward pass)."""
  n, rows = hidden_nd.shape[0], min(HEAD_CHUNK_ROWS, hidden_nd.shape[0])

  def chunk(_, xs):
    h, t = xs
    nll, dlogits = _chunk_nll(h, vectors_vd, t)
    return None, (nll, (dlogits @ vectors_vd.astype(jnp.float32)).astype(h.dtype))
  _, (nll, dh) = jax.lax.scan(chunk, None, (_row_chunks(hidden_nd, rows), _row_chunks(targets_n, rows)))
  return nll.reshape(-1)[:n], (dh.reshape(-1, dh.shape[-1])[:n], hidden_nd, vectors_vd, targets_n)


def _token_nll_bwd(residuals, g_n):
  """Hidden-state cotangents from the forward's saved gradient; the vectors' cotangent recomputes each
  chunk's softmax (dead code, removed by XLA, when the head is frozen, as under LoRA)."""
  dh_nd, hidden_nd, vectors_vd, targets_n = residuals
  rows = min(HEAD_CHUNK_ROWS, hidden_nd.shape[0])

  def chunk(acc, xs):
    h, t, g = xs
    _, dlogits = _chunk_nll(h, vectors_vd, t)
    return acc + jnp.einsum("rv,rd->vd", dlogits * g[:, None], h.astype(jnp.float32)), None
  dv, _ = jax.lax.scan(chunk, jnp.zeros(vectors_vd.shape, jnp.float32),
                       (_row_chunks(hidden_nd, rows), _row_chunks(targets_n, rows), _row_chunks(g_n, rows)))
  return (dh_nd * g_n[:, None].astype(dh_nd.dtype)), dv.astype(vectors_vd.dtype), None


@jax.custom_vjp
def token_nll(hidden_nd: jax.Array, vectors_vd: jax.Array, targets_n: jax.Array) -> jax.Array:
  """`[N]` next-token negative log-likelihoods of rows `hidden_nd` `[N, D]` whose logits are
  `hidden_nd @ vectors_vd.T` (fp32), computed `HEAD_CHUNK_ROWS` rows at a time (see `_token_nll_fwd`)."""
  return _token_nll_fwd(hidden_nd, vectors_vd, targets_n)[0]


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def model_outputs(hidden: bool, batch: Batch) -> dict[str, Any]:
  """The output keywords of `models.apply` / `models.client_tail` a loss needs: final hidden states at every
  position (discriminative), or at the batch's target positions (generative, scored by `generative_loss`)."""
  return {"hidden": True} if hidden else {"hidden": True, "at": batch["target_index"]}


def item_scores(user_bd: jax.Array, items_id: jax.Array, score: str = "cosine") -> jax.Array:
  """`[..., I]` scores of users `[..., D]` against items: "cosine" (RecFormer) or "dot" (SASRec; vector
  norms can carry popularity)."""
  if score == "dot":
    return user_bd @ items_id.T
  return cosine_scores(user_bd, items_id)


def cosine_scores(user_bd: jax.Array, items_id: jax.Array) -> jax.Array:
  """Cosine similarities `[..., I]` of users `[..., D]` and items: the score the discriminative evaluation
  ranks by."""
  # rsqrt of a clamped square norm: `linalg.norm`'s gradient at a zero row (a padded example's mean-pooled
  # user) is 0/0, a NaN that masking the row's loss afterwards cannot remove
  unit = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-12))
  return unit(user_bd) @ unit(items_id).T


def discriminative_loss(config: ModelConfig, temperature: float = 0.05, score: str = "cosine"):
  """Full-softmax cross-entropy over every item: `item_scores(user, item) / temperature` against the target.

  Prompt batches (target `[B]`): the user is the last column's hidden state (left-padded inputs) or the mean
  over real tokens (encoders), as `models.sequence_representation`. Item-as-token batches (target `[B, T]`,
  the next item at every position): every real position is a user state and predicts its next item, so a
  sequence of T items trains T examples at once (SASRec). Batch: input_ids, attention_mask [B, T], target,
  example_mask [B]. Returns `(loss_sum, examples)`.
  """
  def loss(hidden_btd, batch, items_id):
    h = hidden_btd.astype(jnp.float32)
    example_mask = batch["example_mask"].astype(jnp.float32)
    if batch["target"].ndim == 2:
      user, mask = h, batch["attention_mask"].astype(jnp.float32) * example_mask[:, None]
    else:
      user = models.pool(config, h, batch["attention_mask"])
      mask = example_mask
    logits = item_scores(user, items_id.astype(jnp.float32), score) / temperature
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
    return jnp.sum(nll * mask), jnp.sum(mask)
  return loss

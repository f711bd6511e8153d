"""What a client minimises: the generative next-token loss and the discriminative full-softmax loss over
items, with the scores users and items are ranked by. Losses share the signature `(outputs, batch,
items_id) -> (loss_sum, count)`; `model_outputs` asks the model for the outputs a loss needs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import models
from models.config import ModelConfig

Batch = dict[str, jax.Array]


def generative_loss(logits_brv: jax.Array, batch: Batch, items_id: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the target positions, and the number of target tokens.

  `logits_brv` are the logits at `batch["target_index"]` only (`model_outputs` asks the model for those).
  Losses share the signature `(outputs, batch, items_id) -> (loss_sum, count)`; this one has no item side.
  """
  targets_br = jnp.take_along_axis(batch["input_ids"], batch["target_index"] + 1, axis=-1)
  mask = batch["target_mask"] * batch["example_mask"][..., None]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits_brv.astype(jnp.float32), targets_br)
  return jnp.sum(nll * mask), jnp.sum(mask).astype(jnp.float32)


def model_outputs(hidden: bool, batch: Batch) -> dict[str, Any]:
  """The output keywords of `models.apply` / `models.client_tail` a loss needs: final hidden states
  (discriminative), or logits at the batch's target positions (generative)."""
  return {"hidden": True} if hidden else {"logits_at": batch["target_index"]}


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

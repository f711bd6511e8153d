"""Fitting a random-init base to public text (the item catalogue), so tiny presets can spell titles.

A random decoder cannot learn recommendation through LoRA alone: its frozen embeddings and head know
no language. Real backbones arrive pretrained; for `tiny-llama` we fit the base on public catalogue
text only (never on user histories), which plays the part of pretraining.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models.config import ModelConfig
from models.transformer import Params, apply


def fit_causal_lm(config: ModelConfig, params: Params, input_ids: np.ndarray, attention_mask: np.ndarray, *,
                  steps: int = 300, batch_size: int = 32, learning_rate: float = 3e-3, seed: int = 0) -> tuple[Params, float]:
  """Full-parameter next-token training on rows `[N, T]`; returns `(params, final mean loss)`."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=0.0)

  def loss_fn(p, ids, mask):
    logits = apply(config, p, ids, mask)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    m = mask[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * m) / jnp.maximum(m.sum(), 1.0)

  @jax.jit
  def train(p, key, ids_nt, mask_nt):  # the rows are arguments, not constants baked into the program
    def step(carry, k):
      p, opt = carry
      idx = jax.random.randint(k, (batch_size,), 0, ids_nt.shape[0])
      loss, g = jax.value_and_grad(loss_fn)(p, ids_nt[idx], mask_nt[idx])
      updates, opt = tx.update(g, opt, p)
      return (optax.apply_updates(p, updates), opt), loss
    (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, steps))
    return p, jnp.mean(losses[-max(steps // 10, 1):])

  fitted, loss = train(params, jax.random.key(seed), jnp.asarray(input_ids), jnp.asarray(attention_mask))
  return fitted, float(loss)

"""The chunked next-token loss against a plain cross-entropy over full logits (independent: optax's)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from federated import losses


def _plain_nll(hidden_nd, vectors_vd, targets_n):
  logits = jnp.einsum("nd,vd->nv", hidden_nd, vectors_vd, preferred_element_type=jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets_n)


@pytest.mark.parametrize("rows", [3, 7, 128])  # chunks that do not divide N = 10, and one chunk larger than N
def test_token_nll_matches_full_logits_value_and_gradients(monkeypatch, rows):
  monkeypatch.setattr(losses, "HEAD_CHUNK_ROWS", rows)
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden, vectors = jax.random.normal(k1, (10, 16)), jax.random.normal(k2, (37, 16))
  targets, weights = jax.random.randint(k3, (10,), 0, 37), jax.random.uniform(k4, (10,))
  np.testing.assert_allclose(losses.token_nll(hidden, vectors, targets), _plain_nll(hidden, vectors, targets),
                             rtol=1e-5, atol=1e-5)
  # a weighted sum, as the masked loss is: the cotangent reaching the rows is not all ones
  ours = jax.grad(lambda h, v: jnp.sum(weights * losses.token_nll(h, v, targets)), argnums=(0, 1))(hidden, vectors)
  plain = jax.grad(lambda h, v: jnp.sum(weights * _plain_nll(h, v, targets)), argnums=(0, 1))(hidden, vectors)
  for got, want in zip(ours, plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(ours[1]).max()) > 1e-3  # the vectors' gradient is computed, not left at zero


def test_token_nll_under_vmap_equals_per_client_calls(monkeypatch):
  monkeypatch.setattr(losses, "HEAD_CHUNK_ROWS", 4)
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  hidden, vectors = jax.random.normal(k1, (3, 9, 8)), jax.random.normal(k2, (21, 8))
  targets = jax.random.randint(k3, (3, 9), 0, 21)
  grad = jax.grad(lambda h, t: jnp.sum(losses.token_nll(h, vectors, t)))
  batched = jax.vmap(grad)(hidden, targets)
  for c in range(3):
    np.testing.assert_allclose(batched[c], grad(hidden[c], targets[c]), rtol=1e-5, atol=1e-6)

"""DP on client uploads: clipping bounds the norm, the noise has the right std, epsilon moves the right way,
and clipped + noised federated training still learns."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import brentq
from scipy.stats import norm

import models
from federated import client, strategies
from fellrec_jax import privacy


def _tree(seed, scale=1.0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"a": scale * jax.random.normal(k1, (3, 40, 8)), "b": {"c": scale * jax.random.normal(k2, (3, 8, 5))}}


def test_clipping_bounds_the_norm_and_keeps_small_updates():
  big = _tree(0, scale=10.0)
  clipped, norm = privacy.clip_update(big, 1.5)
  assert float(norm) > 1.5
  np.testing.assert_allclose(float(optax.tree.norm(clipped)), 1.5, rtol=1e-5)
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  np.testing.assert_allclose(flat(clipped) / np.linalg.norm(flat(clipped)), flat(big) / np.linalg.norm(flat(big)),
                             rtol=1e-5, atol=1e-7)  # direction kept
  small = _tree(1, scale=1e-3)
  same, _ = privacy.clip_update(small, 1.5)
  for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(small)):
    np.testing.assert_array_equal(x, y)


def test_noise_std_is_multiplier_times_clip():
  zeros = {"w": jnp.zeros((200, 500)), "v": jnp.zeros((1000,))}
  clip, z = 0.5, 1.3
  noisy, norm = jax.jit(lambda d, k: privacy.privatize_update(d, k, clip, z))(zeros, jax.random.key(3))
  x = np.concatenate([np.ravel(v) for v in jax.tree.leaves(noisy)])
  assert float(norm) == 0.0
  # 101,000 samples: the sample std's relative error is ~1/sqrt(2n) = 0.2%; 2% is > 9 sigma
  np.testing.assert_allclose(x.std(), z * clip, rtol=0.02)
  assert abs(x.mean()) < 5 * z * clip / math.sqrt(x.size)
  # leaves get independent noise
  assert abs(np.corrcoef(np.ravel(noisy["w"])[:1000], np.ravel(noisy["v"]))[0, 1]) < 0.15


def test_privatize_uploads_per_client_and_participation():
  anchor = _tree(0)
  lora = jax.tree.map(lambda x: x + 5.0, anchor)  # every client moved far: its delta gets clipped
  participating = jnp.asarray([True, False, True])
  out, norms = jax.jit(lambda l, a, k, p: privacy.privatize_uploads(l, a, k, 1.0, 0.0, p))(
      lora, anchor, jax.random.key(0), participating)
  delta = jax.tree.map(lambda o, a: o - a, out, anchor)
  per_client = [float(optax.tree.norm(jax.tree.map(lambda x: x[c], delta))) for c in range(3)]
  np.testing.assert_allclose([per_client[0], per_client[2]], [1.0, 1.0], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(lora)):  # the absent client uploads nothing
    np.testing.assert_array_equal(x[1], y[1])
  assert norms.shape == (3,) and float(norms.min()) > 1.0
  noisy, _ = privacy.privatize_uploads(lora, anchor, jax.random.key(0), 1.0, 1.0)
  a, b = (np.ravel(noisy["a"][c] - lora["a"][c]) for c in (0, 2))
  assert not np.allclose(a, b)  # clients draw different noise


def test_epsilon_monotone_in_noise_rounds_and_sampling():
  eps = lambda z, r, q=1.0, acc="rdp": privacy.epsilon(z, r, sampling_rate=q, delta=1e-5, accountant=acc)
  assert eps(0.8, 10) > eps(1.5, 10) > eps(4.0, 10) > 0
  assert eps(1.0, 5) < eps(1.0, 20) < eps(1.0, 80)
  assert eps(1.0, 20, 0.2) < eps(1.0, 20)
  assert eps(0.0, 10) == math.inf and eps(1.0, 0) == 0.0
  assert eps(1.0, 10, acc="pld") <= eps(1.0, 10) * 1.01  # PLD is the tighter accountant
  # one Gaussian release: PLD equals the exact (Balle & Wang 2018) epsilon, solved here independently from
  # delta(eps) = Phi(1/(2z) - eps z) - e^eps Phi(-1/(2z) - eps z); RDP is an upper bound
  for z in (1.0, 2.0):
    gap = lambda e: (norm.cdf(1 / (2 * z) - e * z) - math.exp(e) * norm.cdf(-1 / (2 * z) - e * z)) - 1e-5
    exact = brentq(gap, 1e-3, 50)
    np.testing.assert_allclose(eps(z, 1, acc="pld"), exact, rtol=1e-3)
    assert exact <= eps(z, 1) < 1.2 * exact
  report = privacy.dp_report(clip=1.0, noise_multiplier=1.0, rounds=10, num_clients=5, clients_per_round=2)
  assert report["sampling_rate"] == 0.4 and report["epsilon_amplified"] < report["epsilon"]
  assert report["delta"] == 1e-5


@pytest.mark.slow  # local training rounds with DP uploads (~15 s cold)
def test_training_with_dp_uploads_still_lowers_the_loss():
  """FedAvg over 3 tiny-llama clients with every upload clipped and noised: the loss still drops."""
  cfg = dataclasses.replace(models.tiny_llama(vocab_size=61, num_layers=2),
                            lora=models.LoraConfig(rank=4, alpha=8, dropout=0.0, targets=("q", "v", "down")))
  base = models.init_params(cfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  C, S, B, T = 3, 4, 4, 12
  ids = np.tile(rng.integers(3, 61, size=(C, 1, 1, B, T)), (1, S, 1, 1, 1)).astype(np.int32)  # memorisable
  ones = np.ones((C, S, 1, B, T), np.int32)
  batches = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(ones),
             "target_index": jnp.broadcast_to(jnp.arange(T - 1, dtype=jnp.int32), (C, S, 1, B, T - 1)),
             "target_mask": jnp.ones((C, S, 1, B, T - 1), jnp.int32),
             "example_mask": jnp.ones((C, S, 1, B), jnp.int32)}
  tx = optax.adam(3e-2)
  update = jax.jit(client.over_clients(client.make_local_update(client.LocalSpec(cfg, split_k=1), tx)))
  lora0 = jax.tree.map(lambda x: jnp.broadcast_to(x, (C, *x.shape)), models.init_lora(cfg, jax.random.key(1)))
  opt0 = jax.vmap(tx.init)(lora0)
  # The noise's norm is z * clip * sqrt(#adapter params) (~4.6k here) against a signal of at most clip, so
  # with 3 clients only a small z lets training through; meaningful epsilon needs many clients per round.
  clip, z = 2.0, 0.02
  privatize = jax.jit(lambda l, a, k: privacy.privatize_uploads(l, a, k, clip, z))

  def train(dp: bool):
    lora, opt = lora0, opt0
    losses = []
    for r in range(8):
      anchor = lora
      lora, opt, stats = update(base, lora, opt, batches, jax.random.split(jax.random.key(r), C))
      losses.append(float(stats["loss"].mean()))
      if dp:
        lora, _ = privatize(lora, anchor, jax.random.key(100 + r))
      lora = jax.tree.map(lambda x: jnp.broadcast_to(x.mean(0), x.shape), lora)  # FedAvg of the (noised) uploads
    return losses

  with_dp, without = train(True), train(False)
  assert with_dp[0] == without[0]  # the same first round: the noise only acts from the first aggregation on
  # Against the same run without DP rather than a fitted figure: noise of std z * clip = 0.04 per entry
  # is small against Adam's 8 x 4 steps of up to lr = 0.03 each, so DP keeps at least half of the noiseless
  # drop (measured 0.41 of 0.55), and the noiseless run itself learns (a drop of 0.1 nats is far above noise).
  assert without[0] - without[-1] > 0.1, without
  assert with_dp[0] - with_dp[-1] > 0.5 * (without[0] - without[-1]), (with_dp, without)
  eps = privacy.epsilon(z, 8, delta=1e-5)
  assert math.isfinite(eps) and eps > 0


def test_uploaded_losses_noise_and_quantisation_and_what_fellrec_weights_do_with_them():
  """Off: the losses as they are. Rounding to a step s moves each loss by <= s/2, so each client's softmax
  share exp(l_i / T) / sum_j exp(l_j / T) moves by at most a factor exp(s / T): the bound is checked on
  FELLRec's warm weights' share, and clients whose losses round alike get the same warm weight. The noise
  has the std asked for."""
  losses = np.asarray([2.301, 2.312, 2.298, 2.33, 2.27], np.float32)  # close: the weights below 1
  key = jax.random.key(0)
  np.testing.assert_array_equal(privacy.uploaded_losses(losses, key, 0.0, None), losses)
  step, temperature = 0.05, 0.05
  rounded = privacy.uploaded_losses(losses, key, 0.0, step)
  np.testing.assert_allclose(rounded / step, np.round(rounded / step), atol=1e-4)
  assert np.abs(rounded - losses).max() <= step / 2 + 1e-6
  share = lambda l: np.exp(l / temperature) / np.exp(l / temperature).sum()  # written out, not the library's
  ratio = share(rounded) / share(losses)
  assert np.all((ratio <= math.exp(step / temperature) + 1e-4) & (ratio >= math.exp(-step / temperature) - 1e-4))
  weights = lambda l: np.asarray(strategies.warm_weights(jnp.asarray(l), 0, alpha=0.7, beta=5.0,
                                                         temperature=temperature))
  # the library's warm weights are tanh(alpha / share ** (t + 1 / beta)) of that share (round t = 0)
  np.testing.assert_allclose(weights(rounded), np.tanh(0.7 / share(rounded) ** (1 / 5.0)), rtol=1e-4)
  w = weights(rounded)
  assert w[0] == w[1] == w[2] and not np.allclose(weights(losses)[:3], weights(losses)[0])
  noisy = privacy.uploaded_losses(np.zeros(20000, np.float32), key, 0.3, None)
  assert abs(noisy.std() - 0.3) < 0.01 and abs(noisy.mean()) < 0.01

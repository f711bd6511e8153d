"""Defenses at the split cut (`federated.cut_defense`), as functions and inside the real split step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from federated import client, cut_defense
from federated.cut_defense import CutDefense
from test_attack import T, _batch, _server_inputs, _tiny


def _dcor_numpy(x, y):
  """Szekely, Rizzo & Bakirov (2007), eq. 2.8, written out on the rows given."""
  def centred(z):
    d = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    return d - d.mean(0, keepdims=True) - d.mean(1, keepdims=True) + d.mean()
  a, b = centred(x.astype(np.float64)), centred(y.astype(np.float64))
  return np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))


def test_distance_correlation_equals_the_textbook_formula_on_the_real_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 5)).astype(np.float32)
  y = (np.tanh(x @ rng.normal(size=(5, 7))) + 0.3 * rng.normal(size=(12, 7))).astype(np.float32)
  w = np.ones(12, np.float32)
  w[[3, 8]] = 0  # padding rows: ignored, whatever they hold
  got = cut_defense.distance_correlation(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
  np.testing.assert_allclose(got, _dcor_numpy(x[w > 0], y[w > 0]), rtol=1e-5)
  assert 0.3 < float(got) < 0.99
  # a rotation and scaling of x is perfectly dependent on x; independent draws are not (the sample statistic
  # is biased upward: measured 0.20 at n = 400)
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  np.testing.assert_allclose(cut_defense.distance_correlation(x, 3 * x @ q + 1, w), 1.0, rtol=1e-5)
  big = rng.normal(size=(400, 4)).astype(np.float32)
  assert float(cut_defense.distance_correlation(big, rng.normal(size=(400, 4)), np.ones(400))) < 0.3
  # the gradient exists on rows that repeat (a token twice in a sequence has distance 0 to itself)
  g = jax.grad(lambda z: cut_defense.distance_correlation(jnp.asarray(x), z, jnp.asarray(w)))(jnp.asarray(x[[0] * 12]))
  assert np.isfinite(np.asarray(g)).all()


def test_noise_has_the_stated_noise_to_signal_ratio_after_clipping():
  d = 4096  # many coordinates: the noise vector's norm concentrates at its mean
  act = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, d)) * np.asarray([0.5, 3, 40])[None, :, None],
                    jnp.float32)
  norms = np.linalg.norm(np.asarray(act), axis=-1)
  key = jax.random.key(0)
  clipped = np.asarray(cut_defense.to_server(CutDefense(clip=60.0), act, None, key))
  np.testing.assert_allclose(np.linalg.norm(clipped, axis=-1), np.minimum(norms, 60.0), rtol=1e-5)
  for clip, scale in ((60.0, np.minimum(norms, 60.0) * 0 + 60.0), (None, norms)):
    sent = np.asarray(cut_defense.to_server(CutDefense(noise=0.5, clip=clip), act, None, key))
    signal = clipped if clip else np.asarray(act)
    np.testing.assert_allclose(np.linalg.norm(sent - signal, axis=-1) / scale, 0.5, rtol=0.05)
  with pytest.raises(ValueError, match="needs the step's random key"):
    cut_defense.to_server(CutDefense(noise=0.5), act, None, None)
  with pytest.raises(ValueError, match="noise-to-signal ratio must be finite and >= 0"):
    CutDefense(noise=-1.0)


def test_visible_positions_end_at_each_rows_first_label():
  mask = jnp.asarray([[1] * 8, [1] * 6 + [0] * 2, [1] * 8])
  # targets: row 0 scores positions 4..6 (labels 5..7); row 1 positions 2..4; row 2 none
  index = jnp.asarray([[4, 5, 6], [2, 3, 4], [0, 0, 0]])
  tmask = jnp.asarray([[1, 1, 1], [1, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(cut_defense.visible_positions(mask, index, tmask),
                                [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5, [1] * 8])


def _todays_split_step(spec, base, lora, batch, rng):
  """The split step as it was before the defenses (head -> body -> tail joined by `jax.vjp`, the step key
  split three ways for the segments' dropout), transcribed: loss sum, count and gradients."""
  cfg, k = spec.config, spec.split_k
  lora_head, lora_body, lora_tail = models.split(cfg, lora, k)
  head_fn, body_fn, tail_fn = client.split_segments(spec, models.split(cfg, base, k), batch,
                                                    rngs=list(jax.random.split(rng, 3)))
  act_up, head_vjp = jax.vjp(head_fn, lora_head)
  act_down, body_vjp = jax.vjp(body_fn, lora_body, act_up)
  loss_sum, tail_vjp, count = jax.vjp(tail_fn, lora_tail, act_down, None, has_aux=True)
  grad_tail, grad_down, _ = tail_vjp(jnp.ones_like(loss_sum))
  grad_body, grad_up = body_vjp(grad_down)
  grads = jax.tree.map(lambda *xs: jnp.concatenate(xs), head_vjp(grad_up)[0], grad_body, grad_tail)
  return loss_sum, count, grads


def _step(spec):
  return jax.jit(lambda b, l, x, r: client.split_value_and_grad(spec, b, l, x, r)[:3])


@pytest.mark.slow  # ~26 s on 2 shared cores: three split steps compiled
def test_zero_noise_is_todays_split_step_bit_for_bit():
  """With dropout on, so the step key's use is checked too; a 1e-3 ratio already moves the loss."""
  cfg, base, lora = _tiny()
  lora = jax.tree.map(lambda x: x + 0.01, lora)  # B != 0: the adapters act
  batch, key = _batch(), jax.random.key(3)
  spec = client.LocalSpec(cfg, split_k=2)
  want = jax.jit(lambda b, l, x, r: _todays_split_step(spec, b, l, x, r))(base, lora, batch, key)
  got = _step(dataclasses.replace(spec, defense=CutDefense(noise=0.0)))(base, lora, batch, key)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(x, y)
  noised = _step(dataclasses.replace(spec, defense=CutDefense(noise=1e-3)))(base, lora, batch, key)
  assert noised[0] != want[0]


@pytest.mark.slow  # two split steps compiled with and without the regulariser (~18 s cold)
def test_nopeek_adds_its_weighted_gradient_to_the_head_only():
  """The NoPeek step's gradients are today's plus `w * count * grad dCor(embeddings, head(lora_head))` on the
  head blocks, the latter taken here by `jax.grad` through the head directly; loss and count unchanged."""
  cfg, base, lora = _tiny()
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  batch, k, w = _batch(), 2, 0.5
  plain = _step(client.LocalSpec(cfg, split_k=k))(base, lora, batch, None)
  got = _step(client.LocalSpec(cfg, split_k=k, defense=CutDefense(nopeek=w)))(base, lora, batch, None)
  head = models.split(cfg, base, k)[0]
  emb = models.embed(cfg, head, batch["input_ids"])

  def dcor(lora_head):
    act = models.client_head(cfg, head, batch["input_ids"], batch["attention_mask"], lora=lora_head)
    return cut_defense.sequence_dcor(emb, act, batch["attention_mask"])

  extra = jax.grad(dcor)(models.split(cfg, lora, k)[0])
  assert float(dcor(models.split(cfg, lora, k)[0])) > 0.1
  np.testing.assert_array_equal(got[0], plain[0])
  np.testing.assert_array_equal(got[1], plain[1])
  for g, p, e in zip(jax.tree.leaves(got[2]["blocks"]), jax.tree.leaves(plain[2]["blocks"]),
                     jax.tree.leaves(extra["blocks"]), strict=True):
    np.testing.assert_allclose(g[:k], p[:k] + w * float(plain[1]) * e, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(g[k:], p[k:])


def test_private_response_server_never_receives_a_label_position(monkeypatch):
  """A spy records every array the server function receives inside the jitted split step: zero activations
  and a zero mask from each row's first label position on, bit-identical when the response tokens change
  (and changed when a prompt token does)."""
  cfg, base, lora = _tiny()
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
  batch = _batch()
  spec = client.LocalSpec(cfg, split_k=1, defense=CutDefense(private_response=True))
  first = np.asarray(cut_defense.visible_positions(batch["attention_mask"], batch["target_index"],
                                                   batch["target_mask"])).sum(-1)
  assert first.tolist() == [4, 4]  # _batch: targets at positions 3.., so labels from 4
  got = _server_inputs(monkeypatch, spec, base, lora, batch)
  for r, f in enumerate(first):
    assert not np.any(got["act"][r, f:]) and not np.any(got["mask"][r, f:])
    assert np.all(np.abs(got["act"][r, :f]).sum(-1) > 0)
  later = np.arange(T)[None] >= first[:, None]
  other = dict(batch, input_ids=jnp.where(later, (batch["input_ids"] + 5) % 97, batch["input_ids"]))
  again = _server_inputs(monkeypatch, spec, base, lora, other)
  for key in ("act", "mask"):
    np.testing.assert_array_equal(again[key], got[key])
  prompt_changed = dict(batch, input_ids=batch["input_ids"].at[0, 2].add(1))
  assert np.any(_server_inputs(monkeypatch, spec, base, lora, prompt_changed)["act"][0, 2] != got["act"][0, 2])


@pytest.mark.slow  # ~22 s on 2 shared cores: four split steps compiled
def test_private_response_with_frozen_server_adapters_trains_the_same_function():
  """Without server adapters the client's copy of the body computes what the server would: the loss and
  gradients equal the plain split step's (to float rounding), though the server saw only the prompts."""
  cfg, base, lora = _tiny()
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  spec = client.LocalSpec(cfg, split_k=1, server_lora="frozen")
  want = _step(spec)(base, lora, _batch(), None)
  got = _step(dataclasses.replace(spec, defense=CutDefense(private_response=True)))(base, lora, _batch(), None)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
  # with per-client server adapters the response positions skip them: a different function
  per_client = client.LocalSpec(cfg, split_k=1)
  assert _step(dataclasses.replace(per_client, defense=CutDefense(private_response=True)))(
      base, lora, _batch(), None)[0] != _step(per_client)(base, lora, _batch(), None)[0]

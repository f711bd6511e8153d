"""The clients' AdamW: fp32 moments are optax's AdamW bit for bit; bf16 moments are stored in bf16, rounded
without bias, and track fp32 AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from federated import engine, optimizer
from fellrec_jax.config import RunConfig, option_fields


def _toy_problem(seed=0):
  """Least squares `|X w - y|^2 / n` with w `{"a": [8, 4], "b": [4]}`: gradients of mixed scales."""
  rng = np.random.default_rng(seed)
  x, y = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32), jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
  params = {"a": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
  loss = lambda p: jnp.mean(jnp.sum((x @ p["a"] + p["b"] - y) ** 2, axis=-1))
  return loss, params


def _train(tx, steps, seed=0):
  """`(params, opt_state)` after `steps` AdamW steps on the toy problem (one jitted step)."""
  loss, params = _toy_problem(seed)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_float32_moments_are_optax_adamw_bit_for_bit():
  schedule = optax.linear_schedule(1e-2, 0.0, 20)
  ours = _train(optimizer.adamw(schedule, 0.01, "float32"), 10)
  ref = _train(optax.adamw(schedule, weight_decay=0.01), 10)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  cfg_tx = engine.make_optimizer(RunConfig(learning_rate=1e-2, weight_decay=0.01), 20)
  default = _train(cfg_tx, 3)  # the run's default config builds the same fp32 optimizer
  same = _train(engine.make_optimizer(RunConfig(learning_rate=1e-2, weight_decay=0.01, moments_dtype="float32"), 20), 3)
  for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(same)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bf16_moments_are_stored_in_bf16_and_track_fp32_adamw():
  steps, lr = 20, 1e-2
  params16, state16 = _train(optimizer.adamw(lr, 0.01, "bfloat16"), steps)
  params32, _ = _train(optax.adamw(lr, weight_decay=0.01), steps)
  adam = state16[0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  assert adam.count.dtype == jnp.int32 and int(adam.count) == steps
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params16))  # only the moments are narrowed
  # A bf16 moment is rounded to within one spacing (at most 2^-7 of itself) at every step, without bias;
  # those errors persist as the moments decay (mu by 0.9, nu by 0.999 per step), so over 20 steps each
  # moment drifts about 2^-8 (0.4%) from its fp32 value, and each step's m / sqrt(v) with it, in a sign
  # that holds from step to step. An Adam step moves a parameter by about lr, so the parameters agree to
  # ~0.5% of the distance moved, steps * lr (measured 0.49-0.52% at 20 steps over 4 rounding seeds,
  # 0.64-0.75% at 40): 1% of it bounds that, while the parameters move 100x as far.
  tolerance = 0.01 * steps * lr
  for a, b in zip(jax.tree.leaves(params16), jax.tree.leaves(params32)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tolerance)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(params32),
                                                              jax.tree.leaves(_toy_problem()[1])))
  assert moved > 50 * tolerance  # the tolerance is small against how far training went


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
  x = jnp.float32(1.0 + 2.0 ** -9 + 2.0 ** -11)  # 5/16 of the way from 1 to the next bf16, 1 + 2^-7
  got = optimizer.round_to_bf16(jnp.full((100_000,), x), jax.random.key(3)).astype(jnp.float32)
  assert set(np.unique(np.asarray(got)).tolist()) == {1.0, 1.0 + 2.0 ** -7}
  # P(up) = 5/16, so the mean is x; the standard error of the mean is at most 2^-7 * sqrt(0.25 / n)
  assert abs(float(jnp.mean(got)) - float(x)) < 5 * 2.0 ** -7 * np.sqrt(0.25 / 100_000)
  neg = optimizer.round_to_bf16(-jnp.full((100_000,), x), jax.random.key(4)).astype(jnp.float32)
  assert abs(float(jnp.mean(neg)) + float(x)) < 5 * 2.0 ** -7 * np.sqrt(0.25 / 100_000)


def test_bf16_second_moment_decays_like_fp32_where_round_to_nearest_would_freeze_it():
  """One unit gradient, then zero gradients: fp32 nu decays by b2 = 0.999 per step, 0.1% each, under
  bf16's spacing. Rounded to nearest it would stay put forever; stochastically rounded, its mean decays."""
  tx16, tx32 = optimizer.scale_by_adam_stored("bfloat16"), optax.scale_by_adam()
  params = jnp.zeros((20_000,), jnp.float32)
  s16, s32 = tx16.init(params), tx32.init(params)
  update16, update32 = jax.jit(tx16.update), jax.jit(tx32.update)
  for g in [jnp.ones_like(params)] + [jnp.zeros_like(params)] * 100:
    s16, s32 = update16(g, s16)[1], update32(g, s32)[1]
  nu32 = float(s32.nu[0])
  assert nu32 == pytest.approx(1e-3 * 0.999 ** 100, rel=1e-5)
  nearest = np.float32(1e-3)
  for _ in range(100):  # what round-to-nearest storage gives: every step's decay is rounded away
    nearest = np.float32(jnp.asarray(0.999 * nearest, jnp.float32).astype(jnp.bfloat16))
  assert nearest == np.float32(jnp.asarray(1e-3, jnp.float32).astype(jnp.bfloat16))
  assert float(jnp.mean(s16.nu.astype(jnp.float32))) == pytest.approx(nu32, rel=2e-3)


def test_engine_state_holds_bf16_moments():
  """`--moments_dtype=bfloat16` reaches the engine's optimizer: the stacked moments are bf16."""
  tx = engine.make_optimizer(RunConfig(moments_dtype="bfloat16"), 10)
  lora = {"a": jnp.zeros((3, 4, 2)), "b": jnp.zeros((3, 2, 5))}  # 3 clients
  adam = jax.vmap(tx.init)(lora)[0]
  assert all(x.dtype == jnp.bfloat16 and x.shape[0] == 3 for x in jax.tree.leaves((adam.mu, adam.nu)))
  assert option_fields()["moments_dtype"] == optimizer.MOMENTS_DTYPES  # the flag offers what the optimizer takes

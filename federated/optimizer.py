"""The clients' AdamW, with its two moments optionally stored in bfloat16 (`--moments_dtype`).

Each simulated client carries its own moments, 2x its adapters in fp32: they are most of a client's
state, so storing them in bf16 is what lets more clients share one host. The arithmetic stays fp32: the
stored moments are widened, optax's Adam step runs on them, and the new moments are narrowed again.

The narrowing rounds stochastically. With b2 = 0.999 a step changes nu by 0.1% of itself, under bf16's
relative spacing (2^-8 = 0.39%): rounded to nearest, nu could only grow (by a gradient well above its
square root) and never decay, so a client's steps would stay small after one large gradient. Rounding up
with probability equal to the distance keeps each moment unbiased, so it decays as in fp32 on average.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fellrec_jax.config import MOMENTS_DTYPES

PyTree = Any

ROUNDING_SEED = 0  # the stochastic rounding's base key; each step folds in the step count and the leaf


def round_to_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
  """`x` (float32, any shape) as bfloat16, rounded up or down at random with probability by distance:
  uniform 16-bit noise added below bf16's last mantissa bit, then those 16 bits dropped (a bf16 is the
  top half of a float32), so E[result] = x."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def _narrow(tree: PyTree, key: jax.Array) -> PyTree:
  """Every leaf of `tree` stochastically rounded to bf16, each with its own key."""
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([round_to_bf16(x, jax.random.fold_in(key, i)) for i, x in enumerate(leaves)])


def scale_by_adam_stored(dtype: str, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                         ) -> optax.GradientTransformation:
  """`optax.scale_by_adam` whose state keeps mu and nu in `dtype` ("bfloat16"; "float32" is optax's own):
  the step widens them to fp32, runs optax's update, and stochastically rounds the new moments back."""
  inner = optax.scale_by_adam(b1, b2, eps)
  if dtype == "float32":
    return inner
  if dtype != "bfloat16":
    raise ValueError(f"moments dtype must be one of {MOMENTS_DTYPES}, got {dtype!r}")
  widen = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)

  def init(params):
    state = inner.init(params)
    cast = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
    return state._replace(mu=cast(state.mu), nu=cast(state.nu))

  def update(updates, state, params=None):
    updates, new = inner.update(updates, state._replace(mu=widen(state.mu), nu=widen(state.nu)), params)
    key = jax.random.fold_in(jax.random.key(ROUNDING_SEED), new.count)
    k_mu, k_nu = jax.random.split(key)
    return updates, new._replace(mu=_narrow(new.mu, k_mu), nu=_narrow(new.nu, k_nu))

  return optax.GradientTransformation(init, update)


def adamw(learning_rate: optax.ScalarOrSchedule, weight_decay: float,
          moments_dtype: str = "float32") -> optax.GradientTransformation:
  """AdamW as `optax.adamw` (the same chain), its moments stored in `moments_dtype`; "float32" returns
  `optax.adamw` itself."""
  if moments_dtype == "float32":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  return optax.chain(scale_by_adam_stored(moments_dtype), optax.add_decayed_weights(weight_decay),
                     optax.scale_by_learning_rate(learning_rate))

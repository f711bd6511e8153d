"""Client-level differential privacy for what clients upload for aggregation.

Mechanism (per client, per round; DP-FedAvg's clip-and-noise, applied to each upload separately):
  delta   = adapters after local training - adapters the round started from      (a pytree)
  clipped = delta * min(1, clip / ||delta||_2)      the L2 norm is over the whole pytree
  upload  = anchor + clipped + N(0, (noise_multiplier * clip)^2 I)

Why per client and not on the sum: FELLRec has no global model. Every client's adapter is mixed into
every other client's with its own weights (similarity x warm weight), and the server sees each upload.
Noising each upload makes everything downstream (FedAvg, FELLRec's weights, the similarity matrix)
post-processing, whatever the aggregation weights, and protects a client against the server itself.

Accounting: one round is a Gaussian mechanism with noise multiplier z = noise_multiplier on an
add/remove-one-client neighbouring relation (sensitivity = clip: a client's upload is either its
clipped delta or nothing). Rounds compose; with client sampling at rate q the composition is of
Poisson-subsampled Gaussians. Amplification by sampling only holds against an adversary that does not
see who took part; the server here does see who uploads, so `dp_report` gives both epsilon without
amplification (the guarantee against the server) and with it (against third parties that see only
the released models). Uses Google's `dp_accounting` (RDP by default, PLD on request).

What this does not cover: the activations crossing the split cut (see `federated.attack`; defenses
without a guarantee in `federated.cut_defense`). The per-client training losses that FELLRec's warm
weights use can be noised and quantised (`uploaded_losses`), also without accounting: a mean token loss
has no bounded sensitivity unless the per-token losses are clipped, which training does not do.

Pure functions: `clip_update`, `add_noise`, `privatize_update`, `privatize_uploads` are jit-able.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def clip_update(delta: PyTree, clip: float) -> tuple[PyTree, jax.Array]:
  """`(delta * min(1, clip / ||delta||), ||delta||)`; the clipped tree has norm <= clip."""
  norm = optax.tree.norm(delta)
  scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12))
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), delta), norm


def add_noise(tree: PyTree, rng: jax.Array, std: float | jax.Array) -> PyTree:
  """`tree + N(0, std^2)` elementwise, independent per leaf (one key per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(rng, max(len(leaves), 1))
  noisy = [x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype) for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def privatize_update(delta: PyTree, rng: jax.Array, clip: float, noise_multiplier: float) -> tuple[PyTree, jax.Array]:
  """One client's clipped and noised delta (std = noise_multiplier * clip), and its pre-clip norm."""
  clipped, norm = clip_update(delta, clip)
  return add_noise(clipped, rng, noise_multiplier * clip), norm


def privatize_uploads(stacked_lora: PyTree, anchor_lora: PyTree, rng: jax.Array, clip: float,
                      noise_multiplier: float, participating: jax.Array | None = None) -> tuple[PyTree, jax.Array]:
  """The engine hook: what each client uploads, `anchor + privatized(lora - anchor)`, over a clients axis.

  Args:
    stacked_lora: adapters after local training, leaves `[C, ...]`.
    anchor_lora: the adapters each client started the round from, same structure.
    rng: one key for the round; client c uses `fold_in(rng, c)`.
    clip, noise_multiplier: the clipping norm and z (noise std = z * clip).
    participating: `[C]` bool; clients that did not train this round upload nothing and are returned
      unchanged (no noise: they release nothing).
  Returns:
    (privatized stacked adapters `[C, ...]`, pre-clip delta norms `[C]` for logging).
  """
  num_clients = jax.tree.leaves(stacked_lora)[0].shape[0]
  delta = jax.tree.map(lambda x, a: x - a, stacked_lora, anchor_lora)
  keys = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(num_clients))
  noisy, norms = jax.vmap(lambda d, k: privatize_update(d, k, clip, noise_multiplier))(delta, keys)
  out = jax.tree.map(lambda a, d: a + d, anchor_lora, noisy)
  if participating is not None:
    keep = jnp.asarray(participating, bool)
    out = jax.tree.map(lambda o, x: jnp.where(keep.reshape(-1, *[1] * (x.ndim - 1)), o, x), out, stacked_lora)
  return out, norms


def uploaded_losses(losses_c, rng: jax.Array, noise: float, step: float | None) -> np.ndarray:
  """`[C]` the training losses clients upload: `loss + N(0, noise^2)`, then rounded to a multiple of `step`
  (`step=None`: not rounded). Unchanged, as float32, when neither applies."""
  out = np.asarray(losses_c, np.float32)
  if noise > 0:
    out = out + noise * np.asarray(jax.random.normal(rng, out.shape, jnp.float32))
  if step is not None:
    out = (np.round(out / step) * step).astype(np.float32)
  return out


# ----------------------------------------------------------------------------- accounting

# Renyi orders >= 2: the library's default fractional orders below 2 fail to converge for subsampled
# Gaussians (it then drops them with a warning); they only matter for very large epsilon.
RDP_ORDERS = tuple([2.0 + i / 4 for i in range(40)] + list(range(12, 64)) + [96, 128, 256, 512])


def default_delta(num_clients: int) -> float:
  """1e-5, or smaller when there are so many clients that 1e-5 is not well below 1/num_clients."""
  return min(1e-5, 1.0 / (10.0 * num_clients))


def epsilon(noise_multiplier: float, rounds: int, *, sampling_rate: float = 1.0, delta: float = 1e-5,
            accountant: str = "rdp") -> float:
  """Epsilon of `rounds` compositions of a (Poisson-subsampled at `sampling_rate`) Gaussian mechanism.

  `noise_multiplier` is std / sensitivity. Returns inf for z = 0 (no noise) and 0 for no rounds.
  accountant: "rdp" (Renyi DP, fast, slightly loose) or "pld" (privacy loss distributions, tight).
  """
  import dp_accounting  # a dependency of DP runs only

  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
  if rounds <= 0:
    return 0.0
  if noise_multiplier <= 0:
    return math.inf
  event = dp_accounting.GaussianDpEvent(noise_multiplier)
  if sampling_rate < 1:
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
  event = dp_accounting.SelfComposedDpEvent(event, rounds)
  if accountant == "rdp":
    acc = dp_accounting.rdp.RdpAccountant(orders=RDP_ORDERS)
  elif accountant == "pld":
    acc = dp_accounting.pld.PLDAccountant()
  else:
    raise ValueError(f"unknown accountant {accountant!r}; expected 'rdp' or 'pld'")
  return float(acc.compose(event).get_epsilon(delta))


def dp_report(*, clip: float, noise_multiplier: float, rounds: int, num_clients: int,
              clients_per_round: int | None = None, delta: float | None = None, accountant: str = "rdp") -> dict:
  """The `results.json["dp"]` entry: settings and epsilon with and without sampling amplification."""
  delta = default_delta(num_clients) if delta is None else delta
  q = 1.0 if clients_per_round is None else min(1.0, clients_per_round / num_clients)
  eps = epsilon(noise_multiplier, rounds, delta=delta, accountant=accountant)
  return {"clip": clip, "noise_multiplier": noise_multiplier, "noise_std": noise_multiplier * clip,
          "rounds": rounds, "sampling_rate": q, "delta": delta, "accountant": accountant,
          "neighbouring": "add/remove one client",
          "epsilon": eps,
          "epsilon_amplified": eps if q == 1.0 else epsilon(noise_multiplier, rounds, sampling_rate=q, delta=delta,
                                                            accountant=accountant)}

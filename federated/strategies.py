"""Aggregation strategies: small pure functions behind one interface.

A strategy is `Strategy(name, aggregate, local_penalty)`:
  aggregate(stacked, losses_c, weights_c, participating_c, round_index, anchor) -> (stacked, info)
      `stacked` is any pytree whose leaves carry a leading clients axis C; `losses_c` are the clients'
      mean local training losses, `weights_c` their training-example counts, `participating_c` marks
      the clients sampled this round (the others do not contribute; under FELLRec they keep their own
      parameters, under FedAvg every client receives the participants' average); `anchor` holds the
      parameters each client started the round from (same structure as `stacked`), so
      `stacked - anchor` is what each client learned this round. `info` is a dict of arrays the run
      logs each round (FELLRec: its similarity and warm weights; empty for the others), computed by
      the same pass that aggregates.
  local_penalty(params, anchor) -> scalar added to a client's local loss (FedProx), or None.

Every client keeps its own parameter copy; FedAvg-style strategies give all clients the same average.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  aggregate: Callable[..., PyTree]
  local_penalty: Callable[[PyTree, PyTree], jax.Array] | None = None


def mix(stacked: PyTree, weights_cc: jax.Array) -> PyTree:
  """Row-normalised mixing: `theta_i <- sum_j a_ij theta_j / sum_j a_ij`, leaf by leaf."""
  a = weights_cc / jnp.sum(weights_cc, axis=1, keepdims=True)
  return jax.tree.map(lambda x: jnp.einsum("ij,j...->i...", a.astype(jnp.float32), x.astype(jnp.float32)).astype(x.dtype),
                      stacked)


def gram_matrix(stacked: PyTree) -> jax.Array:
  """`G[i, j] = <v_i, v_j>` of the clients' flattened parameters, summed leaf by leaf (no flat copy)."""
  def leaf_gram(x):
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
    return flat @ flat.T
  return sum(leaf_gram(x) for x in jax.tree.leaves(stacked))


def parameter_similarity(stacked: PyTree) -> jax.Array:
  """`s_ij = (cos(v_i, v_j) + 1) / 2` in [0, 1]; `s_ii = 1` for non-zero clients."""
  g = gram_matrix(stacked)
  norms = jnp.sqrt(jnp.diag(g))
  cos = g / jnp.maximum(norms[:, None] * norms[None, :], 1e-12)
  return (cos + 1.0) / 2.0


def warm_weights(losses_c: jax.Array, round_index, *, alpha: float, beta: float, temperature: float = 0.05,
                 variant: str = "code", participating_c: jax.Array | None = None) -> jax.Array:
  """Curriculum-heating weights `w_i = tanh(alpha / L_i ** e_t)` with `L = softmax(losses / T)`.

  `variant="code"`: `e_t = t + 1/beta` (the released code's operator precedence);
  `variant="paper"`: `e_t = (t + 1) / beta`. Since `L_i < 1`, `w_i` rises toward 1 over rounds.
  Clients not participating get no share of the softmax.
  """
  logits = losses_c.astype(jnp.float32) / temperature
  if participating_c is not None:
    logits = jnp.where(participating_c, logits, -jnp.inf)
  share = jax.nn.softmax(logits)
  t = jnp.asarray(round_index, jnp.float32)
  exponent = t + 1.0 / beta if variant == "code" else (t + 1.0) / beta
  return jnp.tanh(alpha / share ** exponent)


def fellrec_weights(stacked: PyTree, losses_c, round_index, *, alpha: float, beta: float, temperature: float = 0.05,
                    variant: str = "code", participating_c=None, reference: PyTree | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """FELLRec's mixing matrix `a` (`a_ii = 1`, `a_ij = w_i s_ij`) with the similarity and warm weights.

  The released BIGRec code applies the warm weight only when `beta != 1`; `variant="code"` keeps that
  gate, `variant="paper"` always applies it. The similarity compares the parameters themselves (as
  released) or, with `reference`, the clients' updates `stacked - reference`.
  """
  if variant not in ("code", "paper"):
    raise ValueError(f"unknown FELLRec variant {variant!r}; expected 'code' or 'paper'")
  compared = stacked if reference is None else jax.tree.map(jnp.subtract, stacked, reference)
  s = parameter_similarity(compared)
  w = warm_weights(losses_c, round_index, alpha=alpha, beta=beta, temperature=temperature, variant=variant,
                   participating_c=participating_c)
  applied = w if (variant == "paper" or beta != 1) else jnp.ones_like(w)
  c = s.shape[0]
  eye = jnp.eye(c, dtype=bool)
  a = jnp.where(eye, 1.0, applied[:, None] * s)
  if participating_c is not None:
    both = participating_c[:, None] & participating_c[None, :]
    a = jnp.where(eye | both, a, 0.0)
  return a, s, w


def fellrec_aggregate(stacked: PyTree, losses, round_index, *, alpha: float, beta: float, temperature: float = 0.05,
                      variant: str = "code", participating=None, reference: PyTree | None = None) -> PyTree:
  """FELLRec dynamic-balance aggregation: each client gets its own personalised aggregate.

  `stacked`: pytree with leading clients axis C; `losses`: `[C]` mean local training losses;
  `round_index`: 0-based round; `reference` (optional, like `stacked`): measure similarity on
  `stacked - reference` instead of the parameters. Returns the new stacked pytree.
  """
  a, _, _ = fellrec_weights(stacked, jnp.asarray(losses), round_index, alpha=alpha, beta=beta,
                            temperature=temperature, variant=variant, participating_c=participating,
                            reference=reference)
  return mix(stacked, a)


def fedavg_aggregate(stacked: PyTree, weights_c, participating_c=None) -> PyTree:
  """Example-count-weighted average over the participating clients, given to every client."""
  w = jnp.asarray(weights_c, jnp.float32)
  if participating_c is not None:
    w = jnp.where(participating_c, w, 0.0)
  return mix(stacked, jnp.broadcast_to(w, (w.shape[0], w.shape[0])))


def proximal_penalty(mu: float) -> Callable[[PyTree, PyTree], jax.Array]:
  """FedProx's `mu/2 * ||theta - theta_round_start||^2`."""
  def penalty(params, anchor):
    sq = jax.tree.map(lambda p, a: jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))), params, anchor)
    return 0.5 * mu * sum(jax.tree.leaves(sq))
  return penalty


def make_strategy(name: str, *, fellrec_alpha: float = 0.7, fellrec_beta: float = 1.0,
                  fellrec_temperature: float = 0.05, fellrec_variant: str = "code",
                  fellrec_similarity: str = "params", fedprox_mu: float = 0.01) -> Strategy:
  """The named strategy with its hyper-parameters bound.

  `fellrec_similarity`: "params" compares the adapters themselves (as released); "update" compares
  what each client learned this round (`stacked - anchor`).
  """
  if fellrec_similarity not in ("params", "update"):
    raise ValueError(f"unknown FELLRec similarity {fellrec_similarity!r}; expected 'params' or 'update'")
  keep = lambda stacked, losses, weights, participating, round_index, anchor: (stacked, {})
  fedavg = lambda stacked, losses, weights, participating, round_index, anchor: (
      fedavg_aggregate(stacked, weights, participating), {})
  if name == "fellrec":
    def aggregate(stacked, losses, weights, participating, round_index, anchor):
      a, s, w = fellrec_weights(stacked, jnp.asarray(losses), round_index, alpha=fellrec_alpha, beta=fellrec_beta,
                                temperature=fellrec_temperature, variant=fellrec_variant,
                                participating_c=participating,
                                reference=anchor if fellrec_similarity == "update" else None)
      return mix(stacked, a), {"similarity": s, "warm_weights": w}
    return Strategy("fellrec", aggregate)
  if name == "fedavg":
    return Strategy("fedavg", fedavg)
  if name == "fedprox":
    return Strategy("fedprox", fedavg, proximal_penalty(fedprox_mu))
  if name in ("local", "centralized"):
    return Strategy(name, keep)
  raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}")


STRATEGY_NAMES = ("fellrec", "fedavg", "fedprox", "local", "centralized")

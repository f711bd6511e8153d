"""Aggregation strategies: small pure functions behind one interface.

A strategy is `Strategy(name, aggregate, local_penalty, shares)`:
  aggregate(stacked, losses_c, weights_c, participating_c, round_index, anchor[, item_counts_ci])
      -> (stacked, info)
      `stacked` is any pytree whose leaves carry a leading clients axis C; `losses_c` are the clients'
      mean local training losses, `weights_c` their training-example counts, `participating_c` marks
      the clients sampled this round (the others do not contribute; under FELLRec they keep their own
      parameters, under FedAvg every client receives the participants' average); `anchor` holds the
      parameters each client started the round from (same structure as `stacked`), so
      `stacked - anchor` is what each client learned this round. `info` is a dict of arrays the run
      logs each round (FELLRec: its similarity and warm weights; empty for the others), computed by
      the same pass that aggregates. A run with a trainable item table (`stacked["items"]`) also passes
      `item_counts_ci`, each client's training count of each item: the built-in strategies mix each
      table row with the clients' weights times their counts of that item (`mix`), so a row moves
      toward the clients whose users interacted with it, not toward the average of every client's
      (Adam-normalised) step on it.
  local_penalty(params, anchor) -> scalar added to a client's local loss (FedProx), or None.
  shares: whether clients exchange parameters (False for local and centralized training: there is no
      server step to take, `--server_lr` does not apply).
  pooled: centralized training: one client trains on every client's examples, and its adapter is every
      client's for evaluation.

Every client keeps its own parameter copy; FedAvg-style strategies give all clients the same average.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fellrec_jax.config import STRATEGIES as STRATEGY_NAMES

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Strategy:
  name: str
  aggregate: Callable[..., PyTree]
  local_penalty: Callable[[PyTree, PyTree], jax.Array] | None = None
  shares: bool = True
  pooled: bool = False  # one training client holds every client's examples; its adapter serves them all
  reads_anchor: bool = False  # `aggregate` reads `anchor`: the engine keeps a copy of the round's starting adapters


# Leaves of `stacked["items"]` whose axis 1 indexes items: the full table `[C, I, D]`, the item factor
# of a low-rank correction `[C, I, r]` and the item-ID input embeddings `[C, I, D]`.
ITEM_ROW_LEAVES = ("table_id", "u_ir", "embed_id")
# A client's weight on an item it never trained on, relative to one training example of it: rows no
# participating client has seen fall back to the plain mixing weights.
ITEM_COUNT_PRIOR = 1e-3


def without_items(tree: PyTree) -> PyTree:
  """`tree` without its trainable item rows (`tree["items"]`): the model's adapters."""
  has_items = isinstance(tree, dict) and "items" in tree
  return {key: x for key, x in tree.items() if key != "items"} if has_items else tree


def mix(stacked: PyTree, weights_cc: jax.Array, item_counts_ci: jax.Array | None = None) -> PyTree:
  """Row-normalised mixing: `theta_i <- sum_j a_ij theta_j / sum_j a_ij`, leaf by leaf.

  With `item_counts_ci` `[C, I]`, each row r of the item leaves (`ITEM_ROW_LEAVES` under "items") mixes
  with `a_ij (n_jr + prior)` instead: `theta_i[r] <- sum_j a_ij n_jr theta_j[r] / sum_j a_ij n_jr`.
  """
  a = weights_cc.astype(jnp.float32)
  plain = lambda x: jnp.einsum("ij,j...->i...", a / jnp.sum(a, axis=1, keepdims=True),
                               x.astype(jnp.float32)).astype(x.dtype)
  adapters = without_items(stacked)
  if item_counts_ci is None or adapters is stacked:
    return jax.tree.map(plain, stacked)
  w_cci = a[:, :, None] * (item_counts_ci.astype(jnp.float32) + ITEM_COUNT_PRIOR)[None]
  w_cci = w_cci / jnp.sum(w_cci, axis=1, keepdims=True)
  by_rows = lambda x: jnp.einsum("ijr,jr...->ir...", w_cci, x.astype(jnp.float32)).astype(x.dtype)
  items = {name: (by_rows if name in ITEM_ROW_LEAVES else plain)(x) for name, x in stacked["items"].items()}
  return jax.tree.map(plain, adapters) | {"items": items}


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
  released) or, with `reference`, the clients' updates `stacked - reference`: the model's adapters only.
  A trainable item table (`stacked["items"]`) is left out: it starts from the same title embeddings on
  every client and is orders of magnitude larger, so it would make every pair look alike.
  """
  if variant not in ("code", "paper"):
    raise ValueError(f"unknown FELLRec variant {variant!r}; expected 'code' or 'paper'")
  compared = without_items(stacked)
  if reference is not None:
    compared = jax.tree.map(jnp.subtract, compared, without_items(reference))
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
                      variant: str = "code", participating=None, reference: PyTree | None = None,
                      item_counts=None) -> PyTree:
  """FELLRec dynamic-balance aggregation: each client gets its own personalised aggregate.

  `stacked`: pytree with leading clients axis C; `losses`: `[C]` mean local training losses;
  `round_index`: 0-based round; `reference` (optional, like `stacked`): measure similarity on
  `stacked - reference` instead of the parameters; `item_counts` `[C, I]`: see `mix`. Returns the new
  stacked pytree.
  """
  a, _, _ = fellrec_weights(stacked, jnp.asarray(losses), round_index, alpha=alpha, beta=beta,
                            temperature=temperature, variant=variant, participating_c=participating,
                            reference=reference)
  return mix(stacked, a, item_counts)


def fedavg_aggregate(stacked: PyTree, weights_c, participating_c=None, item_counts_ci=None) -> PyTree:
  """Example-count-weighted average over the participating clients, given to every client (item table
  rows: weighted by the clients' counts of that item, as `mix`). Every client receives the same mean, so
  it is computed once, O(C P), not as a C x C mix, O(C^2 P)."""
  w = jnp.asarray(weights_c, jnp.float32)
  if participating_c is not None:
    w = jnp.where(participating_c, w, 0.0)
  w = w / jnp.sum(w)
  average = lambda x: jnp.broadcast_to(jnp.einsum("j,j...->...", w, x.astype(jnp.float32)).astype(x.dtype), x.shape)
  adapters = without_items(stacked)
  if item_counts_ci is None or adapters is stacked:
    return jax.tree.map(average, stacked)
  w_ci = w[:, None] * (item_counts_ci.astype(jnp.float32) + ITEM_COUNT_PRIOR)
  w_ci = w_ci / jnp.sum(w_ci, axis=0, keepdims=True)
  by_rows = lambda x: jnp.broadcast_to(
      jnp.einsum("jr,jr...->r...", w_ci, x.astype(jnp.float32)).astype(x.dtype), x.shape)
  items = {name: (by_rows if name in ITEM_ROW_LEAVES else average)(x) for name, x in stacked["items"].items()}
  return jax.tree.map(average, adapters) | {"items": items}


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
  keep = lambda stacked, losses, weights, participating, round_index, anchor, item_counts=None: (stacked, {})
  fedavg = lambda stacked, losses, weights, participating, round_index, anchor, item_counts=None: (
      fedavg_aggregate(stacked, weights, participating, item_counts), {})
  if name == "fellrec":
    def aggregate(stacked, losses, weights, participating, round_index, anchor, item_counts=None):
      a, s, w = fellrec_weights(stacked, jnp.asarray(losses), round_index, alpha=fellrec_alpha, beta=fellrec_beta,
                                temperature=fellrec_temperature, variant=fellrec_variant,
                                participating_c=participating,
                                reference=anchor if fellrec_similarity == "update" else None)
      return mix(stacked, a, item_counts), {"similarity": s, "warm_weights": w}
    return Strategy("fellrec", aggregate, reads_anchor=fellrec_similarity == "update")
  if name == "fedavg":
    return Strategy("fedavg", fedavg)
  if name == "fedprox":
    return Strategy("fedprox", fedavg, proximal_penalty(fedprox_mu))
  if name == "local":
    return Strategy(name, keep, shares=False)
  if name == "centralized":
    return Strategy(name, keep, shares=False, pooled=True)
  raise ValueError(f"unknown strategy {name!r}; expected one of {STRATEGY_NAMES}")


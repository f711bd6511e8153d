"""Top-K ranking metrics with multi-item ground truth, per-client summaries and balance across clients.

Conventions follow BIGRec's `computeTopNAccuracy` (FELLRec's released evaluation):
  recall@K = |top-K ∩ GT| / |GT|
  ndcg@K   = DCG@K / IDCG@K, DCG = sum over hit positions j (0-based) of 1 / log2(j + 2), and IDCG the
             DCG of min(|GT|, K) hits at the top
  hr@K     = 1 if any of the top K is in GT
GT is a set (duplicate target ids count once) and must be non-empty. A ranked list is `[U, Kmax]` item
ids, best first; -1 marks an empty slot (fewer candidates than Kmax), and slots past Kmax are misses,
so a list shorter than K is scored as if padded with misses.

Aggregation: a client's metric is the mean over its evaluated users; "overall" is the mean over all
users pooled, which equals the per-client means weighted by user counts (as released). Balance is the
spread of the per-client means over clients that have users.

Pure NumPy/JAX: nothing here knows about models or clients' training.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METRICS = ("recall", "ndcg", "hr")
DEFAULT_KS = (5, 10, 20)
USERS_KEY = "test_users"  # evaluated users of a client (of the evaluated part, "valid" or "test")


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
  """`["recall@5", "ndcg@5", "hr@5", "recall@10", ...]`."""
  return [f"{m}@{k}" for k in ks for m in METRICS]


def _padded_targets(targets: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Unique targets left-aligned in `[U, G]` (pad -1) and their counts `[U]`."""
  sets = [np.unique(np.asarray(t, np.int64)) for t in targets]
  if any(len(s) == 0 for s in sets):
    raise ValueError("every user needs at least one ground-truth item")
  width = max((len(s) for s in sets), default=1)
  out = np.full((len(sets), width), -1, np.int64)
  for u, s in enumerate(sets):
    out[u, :len(s)] = s
  return out, np.asarray([len(s) for s in sets], np.int64)


def _discounts(n: int) -> np.ndarray:
  """`[n]` position discounts 1 / log2(j + 2)."""
  return 1.0 / np.log2(np.arange(n) + 2.0)


def _idcg(num_targets_u: np.ndarray, k: int) -> np.ndarray:
  """`[U]` DCG of min(|GT|, k) hits at the top."""
  return np.cumsum(_discounts(k))[np.minimum(num_targets_u, k) - 1]


def user_metrics(ranked_uk: np.ndarray, targets: Sequence[np.ndarray],
                 ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
  """Per-user metrics `{"recall@k", "ndcg@k", "hr@k"}` -> `[U]` float64.

  Args:
    ranked_uk: `[U, Kmax]` int item ids, best first (-1: empty slot).
    targets: U arrays of ground-truth item ids (each non-empty).
  """
  ranked_uk = np.asarray(ranked_uk, np.int64)
  gt_ug, num_targets_u = _padded_targets(targets)
  if ranked_uk.shape[0] != gt_ug.shape[0]:
    raise ValueError(f"{ranked_uk.shape[0]} ranked lists but {gt_ug.shape[0]} target sets")
  hit_uk = (ranked_uk >= 0) & (ranked_uk[:, :, None] == gt_ug[:, None, :]).any(-1)
  out = {}
  for k in ks:
    hit = hit_uk[:, :k]
    num_hits = hit.sum(1)
    out[f"recall@{k}"] = num_hits / num_targets_u
    out[f"ndcg@{k}"] = (hit * _discounts(hit.shape[1])).sum(1) / _idcg(num_targets_u, k)
    out[f"hr@{k}"] = (num_hits > 0).astype(np.float64)
  return out


def balance(values: Sequence[float]) -> dict[str, float]:
  """Spread of a per-client metric: std (population), min, max, range = max - min, cv = std / mean
  (0 when the mean is 0)."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("balance of no clients")
  mean, std = float(v.mean()), float(v.std())
  return {"std": std, "min": float(v.min()), "max": float(v.max()), "range": float(v.max() - v.min()),
          "cv": std / mean if mean else 0.0}


def summarize(per_client: Sequence[dict[str, np.ndarray]]) -> dict:
  """Per-client per-user metrics -> `{"overall", "clients", "balance"}`.

  Args:
    per_client: for each client, `{metric: [U_c] per-user values}` (all clients the same metrics).
  Returns:
    overall: `{metric: mean over all users, "test_users": sum U_c}`.
    clients: per client `{metric: mean over its users, "test_users": U_c}`; a client with no users has
      only `"test_users": 0` and takes no part in the balance.
    balance: `{metric: balance(per-client means)}`.
  """
  names = list(next((m for m in per_client if m), {}))
  counts = [len(next(iter(m.values()), ())) for m in per_client]
  clients = [({name: float(np.mean(m[name])) for name in names} if n else {}) | {USERS_KEY: n}
             for m, n in zip(per_client, counts)]
  if not sum(counts):
    raise ValueError("no client has any evaluated user")
  pooled = {name: np.concatenate([m[name] for m, n in zip(per_client, counts) if n]) for name in names}
  overall = {name: float(v.mean()) for name, v in pooled.items()} | {USERS_KEY: int(sum(counts))}
  with_users = [c for c in clients if c[USERS_KEY]]
  return {"overall": overall, "clients": clients,
          "balance": {name: balance([c[name] for c in with_users]) for name in names}}


# ----------------------------------------------------------------------------- ranking

def exclusion_mask(items_per_user: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[U, I]` bool, True on each user's listed items (ids outside [0, I) are ignored)."""
  mask = np.zeros((len(items_per_user), num_items), bool)
  for u, items in enumerate(items_per_user):
    items = np.asarray(items, np.int64)
    mask[u, items[(items >= 0) & (items < num_items)]] = True
  return mask


@functools.partial(jax.jit, static_argnames="k")
def top_k(scores_ui: jax.Array, exclude_ui: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The k best-scoring non-excluded items per row: `(ids [U, k] int32, scores [U, k])`.

  Higher is better; ties go to the lower id. Slots past a row's candidates hold id -1 and score -inf.
  """
  masked_ui = jnp.where(exclude_ui, -jnp.inf, scores_ui)
  best_uk, ids_uk = jax.lax.top_k(masked_ui, k)
  return jnp.where(best_uk > -jnp.inf, ids_uk, -1).astype(jnp.int32), best_uk


def popularity(train_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[I]` float32 interaction counts over all users' training sequences."""
  items = np.concatenate([np.asarray(s, np.int64) for s in train_sequences] + [np.zeros(0, np.int64)])
  return np.bincount(items, minlength=num_items).astype(np.float32)


def random_user_metrics(num_candidates: np.ndarray, num_targets: np.ndarray, num_reachable: np.ndarray,
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
  """Per-user expected metrics (`[U]` float64) of a uniformly random order of each user's candidates.

  Args:
    num_candidates: `[U]` N, items a user's ranking may contain (the catalogue minus excluded items).
    num_targets: `[U]` |GT| (the recall denominator and IDCG length).
    num_reachable: `[U]` r <= |GT|, targets among the candidates (excluded targets can never hit).
  Each of the top K' = min(K, N) slots holds a reachable target with probability r / N, so
  E[recall@K] = r K' / (N |GT|), E[ndcg@K] = (r / N) sum_{j<K'} 1/log2(j+2) / IDCG, and
  E[hr@K] = 1 - prod_{j<K'} (N - r - j) / (N - j) (no reachable target in the top K').
  """
  n = np.asarray(num_candidates, np.float64)
  g = np.asarray(num_targets, np.int64)
  r = np.asarray(num_reachable, np.float64)[:, None]
  p_hit = np.divide(r[:, 0], n, out=np.zeros_like(n), where=n > 0)
  out = {}
  for k in ks:
    k_eff = np.minimum(k, n).astype(np.int64)
    dcg_prefix = np.concatenate([[0.0], np.cumsum(_discounts(k))])  # [j] = sum of the first j discounts
    j = np.arange(k)[None, :]
    # P(slot j misses | slots before it missed) while j < K'; past K' a factor 1.
    miss_uk = np.where(j < k_eff[:, None], (n[:, None] - r - j) / np.maximum(n[:, None] - j, 1), 1.0)
    out[f"recall@{k}"] = p_hit * k_eff / g
    out[f"ndcg@{k}"] = p_hit * dcg_prefix[k_eff] / _idcg(g, k)
    out[f"hr@{k}"] = 1.0 - np.prod(np.clip(miss_uk, 0.0, 1.0), axis=1)
  return out

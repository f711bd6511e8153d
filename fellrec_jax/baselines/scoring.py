"""What every baseline is and how it is tuned: a `ScoreFn(users [U], histories) -> scores [U, I]`
(higher is better) wrapped with facts about its fit in `Fitted`, the histories it is given, and the
validation ndcg@TUNE_K that chooses item-kNN's k and SASRec's epoch.

Histories (oldest first): for "valid" the user's training sequence, for "test" the training sequence
followed by their validation targets (what a sequential model would have seen before the test item).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from fellrec_jax import metrics
from fellrec_jax.data.preprocess import Split

TUNE_K = 10  # validation ndcg@TUNE_K chooses item-kNN's k and SASRec's epoch

ScoreFn = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Fitted:
  """A fitted baseline: `score(users [U], histories) -> [U, I]` float32 and facts about the fit (chosen
  k, epochs, validation ndcg, seconds)."""

  score: ScoreFn
  info: dict[str, Any]


def eval_histories(split: Split, users: Sequence[int], part: str) -> list[np.ndarray]:
  """Per user (oldest first): `train[u]` for "valid"; `train[u] ++ valid_targets[u]` for "test"."""
  if part not in ("valid", "test"):
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
  if part == "valid":
    return [np.asarray(split.train[u], np.int32) for u in users]
  return [np.concatenate([split.train[u], split.valid_targets[u]]).astype(np.int32) for u in users]


def _excluded(split: Split, u: int, part: str) -> np.ndarray:
  """As `federated.evaluation.excluded_items`: eval history ∪ train (∪ valid targets for "test")."""
  hist = split.valid_history[u] if part == "valid" else split.test_history[u]
  parts = [hist, split.train[u]] + ([split.valid_targets[u]] if part == "test" else [])
  return np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts]))


def split_ndcg(split: Split, num_items: int, score: ScoreFn, part: str = "valid", *, k: int = TUNE_K,
               batch_size: int = 512) -> float:
  """Mean ndcg@k of `score` over every user with a `part` target (full ranking, the evaluation's
  exclusions), used to tune the baselines on "valid"."""
  targets = split.valid_targets if part == "valid" else split.test_targets
  users = np.asarray([u for u in range(split.num_users) if len(targets[u])], np.int64)
  values = []
  for s in range(0, len(users), batch_size):
    batch = users[s:s + batch_size]
    exclude_ui = metrics.exclusion_mask([_excluded(split, u, part) for u in batch], num_items)
    ranked, _ = metrics.top_k(score(batch, eval_histories(split, batch, part)), exclude_ui, min(k, num_items))
    values.append(metrics.user_metrics(np.asarray(ranked), [targets[u] for u in batch], (k,))[f"ndcg@{k}"])
  return float(np.concatenate(values).mean()) if values else 0.0

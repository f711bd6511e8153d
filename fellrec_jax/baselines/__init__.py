"""Conventional reference recommenders: most-popular (here), item-kNN and SASRec
(full-softmax cross-entropy), fitted together by `fit_baselines`.

They are the quality bar: every comparison reports them on the same split, users and
masking as the LLM evaluation. Each baseline is fitted on the users' training sequences
(`split.train[u]`) and turned into a `ScoreFn(users [U], histories) -> scores [U, I]` (higher is
better); `federated.evaluation.score_baseline` ranks those scores with the evaluation's own exclusions
and metrics, and `eval_histories` gives the histories it passes.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fellrec_jax import metrics
from fellrec_jax.baselines.item_knn import KNN_KS, fit_item_knn
from fellrec_jax.baselines.sasrec import SASRecConfig, TrainConfig, train_sasrec
# eval_histories: `federated.evaluation` reads it off this package
from fellrec_jax.baselines.scoring import Fitted, ScoreFn, eval_histories  # noqa: F401
from fellrec_jax.data.preprocess import Split

NAMES = ("most_popular", "item_knn", "sasrec")


def most_popular(train_seqs: Sequence[np.ndarray], num_items: int) -> ScoreFn:
  """Every user scores items by their training interaction counts (`metrics.popularity`)."""
  pop_i = metrics.popularity(train_seqs, num_items)
  return lambda users, histories: np.broadcast_to(pop_i, (len(users), num_items))


def fit_baselines(split: Split, num_items: int, names: Sequence[str] = NAMES, *, seed: int = 0,
                  knn_ks: Sequence[int | None] = KNN_KS, sasrec_model: SASRecConfig | None = None,
                  sasrec_train: TrainConfig = TrainConfig(), log: Callable[[str], None] | None = None
                  ) -> dict[str, Fitted]:
  """Fits the named baselines (a subset of `NAMES`, in that order) on `split.train`."""
  unknown = set(names) - set(NAMES)
  if unknown:
    raise ValueError(f"unknown baselines {sorted(unknown)} (expected some of {NAMES})")
  out: dict[str, Fitted] = {}
  for name in (n for n in NAMES if n in names):
    if name == "most_popular":
      out[name] = Fitted(most_popular(split.train, num_items), {})
    elif name == "item_knn":
      out[name] = fit_item_knn(split, num_items, ks=knn_ks)
    else:
      out[name] = train_sasrec(split, num_items, seed=seed, model=sasrec_model, train=sasrec_train, log=log)
    if log:
      log(f"{name}: {_brief(out[name].info)}")
  return out


def _brief(info: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                   if not isinstance(v, dict))

"""Implicit feedback, de-duplication, k-core filtering, and train/valid/test splits.

A `Split` is per user (indexed by dense user id): the training item sequence, and for validation
and test a history (the last `history_len` items before the period, oldest first) plus the set of
target items. Users without a valid (test) target have empty valid (test) arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from fellrec_jax.data.sources import Dataset


def preprocess(ds: Dataset, *, min_rating: float | None = None, k_core: int = 5) -> Dataset:
  """Implicit feedback -> dedup -> k-core, returned in chronological order per user.

  Args:
    min_rating: keep interactions rated >= this (None keeps all; sources without ratings ignore it).
    k_core: iteratively drop users and items with fewer than k interactions until none remain
      (0 or 1 disables).
  Returns:
    A Dataset sorted by (user, timestamp, original order) with dense ids re-assigned.
  """
  keep = np.ones(ds.num_interactions, bool)
  if min_rating is not None and ds.rating is not None:
    keep &= ds.rating >= min_rating
  ds = ds.select(keep)
  # Chronological order; the stable sort keeps file order among equal timestamps.
  order = np.lexsort((np.arange(ds.num_interactions), ds.timestamp, ds.user))
  ds = dataclasses.replace(ds, user=ds.user[order], item=ds.item[order], timestamp=ds.timestamp[order],
                           rating=None if ds.rating is None else ds.rating[order])
  # Dedup (user, item) keeping the first (earliest) occurrence: np.unique returns first indices.
  pair = ds.user.astype(np.int64) * ds.num_items + ds.item
  _, first = np.unique(pair, return_index=True)
  keep = np.zeros(ds.num_interactions, bool)
  keep[first] = True
  if not keep.all():
    logging.info("%s: dropped %d duplicate (user, item) interactions", ds.name, (~keep).sum())
  user, item = ds.user, ds.item
  while k_core > 1:
    u_cnt = np.bincount(user[keep], minlength=ds.num_users)
    i_cnt = np.bincount(item[keep], minlength=ds.num_items)
    new = keep & (u_cnt[user] >= k_core) & (i_cnt[item] >= k_core)
    if (new == keep).all():
      break
    keep = new
  if not keep.any():
    raise ValueError(f"{ds.name}: nothing left after {k_core}-core filtering")
  return ds.select(keep)


@dataclasses.dataclass(frozen=True)
class Split:
  """Per-user split; every field is a tuple of length U of int32 item-id arrays (oldest first)."""

  kind: str
  history_len: int
  train: tuple[np.ndarray, ...]
  valid_history: tuple[np.ndarray, ...]
  valid_targets: tuple[np.ndarray, ...]
  test_history: tuple[np.ndarray, ...]
  test_targets: tuple[np.ndarray, ...]

  @property
  def num_users(self) -> int:
    return len(self.train)

  def valid_users(self) -> np.ndarray:
    """[U] bool: user has a validation target (and so a non-empty history)."""
    return np.array([len(t) > 0 for t in self.valid_targets])

  def test_users(self) -> np.ndarray:
    return np.array([len(t) > 0 for t in self.test_targets])


def _sequences(ds: Dataset) -> list[np.ndarray]:
  """[U] per-user item sequences, assuming `ds` is sorted by (user, time) as `preprocess` leaves it."""
  bounds = np.searchsorted(ds.user, np.arange(ds.num_users + 1))
  return [ds.item[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _eval_part(before: np.ndarray, targets: np.ndarray, h: int) -> tuple[np.ndarray, np.ndarray]:
  # A user with no earlier item cannot be prompted, so they get no target in this period.
  if len(before) == 0 or len(targets) == 0:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return before[-h:], targets


def temporal_split(ds: Dataset, *, history_len: int = 10, fractions: tuple[float, float] = (0.8, 0.9)) -> Split:
  """FELLRec's global temporal split: cut times at the `fractions` quantiles of all timestamps
  (t_valid = sorted_ts[int(0.8 N)], t_test = sorted_ts[int(0.9 N)]); train ts < t_valid <= valid
  ts < t_test <= test. Valid targets: all of a user's valid-period items, history = the last
  `history_len` train items. Test targets: all test-period items, history = the last `history_len`
  train+valid items. Requires `ds` sorted per user by time (the output of `preprocess`)."""
  ts = np.sort(ds.timestamp)
  t_valid, t_test = (ts[min(int(f * len(ts)), len(ts) - 1)] for f in fractions)
  logging.info("%s temporal split: valid from t=%d, test from t=%d", ds.name, t_valid, t_test)
  bounds = np.searchsorted(ds.user, np.arange(ds.num_users + 1))
  parts = {k: [] for k in ("train", "vh", "vt", "th", "tt")}
  for a, b in zip(bounds[:-1], bounds[1:]):
    items, t = ds.item[a:b], ds.timestamp[a:b]
    tr, va, te = items[t < t_valid], items[(t >= t_valid) & (t < t_test)], items[t >= t_test]
    parts["train"].append(tr)
    vh, vt = _eval_part(tr, va, history_len)
    th, tt = _eval_part(np.concatenate([tr, va]), te, history_len)
    for k, v in zip(("vh", "vt", "th", "tt"), (vh, vt, th, tt)):
      parts[k].append(v)
  return Split("temporal", history_len, *(tuple(parts[k]) for k in ("train", "vh", "vt", "th", "tt")))


def leave_one_out_split(ds: Dataset, *, history_len: int = 10) -> Split:
  """Per user: last item = test target, second-to-last = valid target, the rest = train.
  Valid history = last `history_len` train items; test history = last `history_len` items before the
  test item. Users with fewer than 3 interactions keep everything in train (no valid/test)."""
  e = np.zeros(0, np.int32)
  train, vh, vt, th, tt = [], [], [], [], []
  for seq in _sequences(ds):
    if len(seq) < 3:
      for lst, v in zip((train, vh, vt, th, tt), (seq, e, e, e, e)):
        lst.append(v)
      continue
    train.append(seq[:-2])
    vh.append(seq[:-2][-history_len:])
    vt.append(seq[-2:-1])
    th.append(seq[:-1][-history_len:])
    tt.append(seq[-1:])
  return Split("loo", history_len, tuple(train), tuple(vh), tuple(vt), tuple(th), tuple(tt))


def make_split(ds: Dataset, kind: str, *, history_len: int = 10) -> Split:
  """kind: "temporal" or "loo"."""
  if kind == "temporal":
    return temporal_split(ds, history_len=history_len)
  if kind == "loo":
    return leave_one_out_split(ds, history_len=history_len)
  raise ValueError(f"unknown split {kind!r} (expected 'temporal' or 'loo')")

"""Ranking metrics, summaries and balance against hand-computed values."""

import math

import numpy as np
import pytest

from fellrec_jax import metrics

L3, L5 = 1 / math.log2(3), 1 / math.log2(5)  # discounts of 0-based positions 1 and 3


def test_multi_target_hand_computed():
  # GT {1, 5}: hits at 0-based positions 1 and 3.
  m = metrics.user_metrics(np.array([[3, 1, 7, 5, 9]]), [np.array([5, 1])], ks=(1, 3, 5))
  assert m["recall@1"][0] == 0 and m["ndcg@1"][0] == 0 and m["hr@1"][0] == 0
  assert m["recall@3"][0] == pytest.approx(0.5)
  assert m["ndcg@3"][0] == pytest.approx(L3 / (1 + L3))  # IDCG over min(|GT|=2, 3) positions
  assert m["hr@3"][0] == 1
  assert m["recall@5"][0] == pytest.approx(1.0)
  assert m["ndcg@5"][0] == pytest.approx((L3 + L5) / (1 + L3))


def test_more_targets_than_k_idcg_uses_k_positions():
  m = metrics.user_metrics(np.array([[2, 4, 1]]), [np.array([2, 4, 6, 8])], ks=(2,))
  assert m["recall@2"][0] == pytest.approx(0.5)
  assert m["ndcg@2"][0] == pytest.approx(1.0)
  assert m["hr@2"][0] == 1


def test_empty_slots_short_lists_and_duplicate_targets():
  m = metrics.user_metrics(np.array([[-1, -1], [5, -1]]), [np.array([0]), np.array([5, 6, 6])], ks=(3,))
  np.testing.assert_allclose(m["recall@3"], [0.0, 0.5])  # |GT| counts 6 once; K=3 > Kmax=2 counts misses
  np.testing.assert_allclose(m["ndcg@3"], [0.0, 1 / (1 + L3)])
  np.testing.assert_allclose(m["hr@3"], [0.0, 1.0])


def test_rejects_empty_ground_truth():
  with pytest.raises(ValueError, match="ground-truth"):
    metrics.user_metrics(np.array([[1]]), [np.array([], np.int32)])


def test_metric_names_follow_user_metrics():
  m = metrics.user_metrics(np.array([[0]]), [np.array([0])], ks=(5, 10))
  assert list(m) == metrics.metric_names((5, 10)) == ["recall@5", "ndcg@5", "hr@5", "recall@10", "ndcg@10", "hr@10"]


def test_balance():
  b = metrics.balance([0.1, 0.3])
  assert b == pytest.approx({"std": 0.1, "min": 0.1, "max": 0.3, "range": 0.2, "cv": 0.5})
  assert metrics.balance([0.0, 0.0])["cv"] == 0.0


def test_summarize_pools_users_and_skips_empty_clients():
  per_client = [{"recall@1": np.array([1.0, 0.0, 0.0])}, {}, {"recall@1": np.array([1.0])}]
  s = metrics.summarize(per_client)
  assert s["overall"] == pytest.approx({"recall@1": 0.5, "test_users": 4})  # = (3 * 1/3 + 1 * 1) / 4
  assert s["clients"][0] == pytest.approx({"recall@1": 1 / 3, "test_users": 3})
  assert s["clients"][1] == {"test_users": 0}
  assert s["balance"]["recall@1"] == pytest.approx(metrics.balance([1 / 3, 1.0]))


def test_top_k_masks_fills_and_breaks_ties_by_id():
  scores = np.array([[0.5, 0.9, 0.9, 0.1], [1.0, 2.0, 3.0, 4.0]], np.float32)
  exclude = metrics.exclusion_mask([np.array([0]), np.array([1, 2, 3, 7])], 4)
  np.testing.assert_array_equal(exclude, [[1, 0, 0, 0], [0, 1, 1, 1]])
  ids, best = metrics.top_k(scores, exclude, 3)
  np.testing.assert_array_equal(ids, [[1, 2, 3], [0, -1, -1]])
  assert np.isneginf(np.asarray(best)[1, 1:]).all()


def test_popularity_counts_training_interactions():
  np.testing.assert_array_equal(metrics.popularity([np.array([0, 2]), np.array([2]), np.array([], np.int32)], 4),
                                [1, 0, 2, 0])


def test_random_expectation_hand_case_and_monte_carlo():
  # N=4 candidates, one reachable target, K=2: the target is in the top 2 with probability 1/2.
  m = metrics.random_user_metrics(np.array([4]), np.array([1]), np.array([1]), ks=(2,))
  assert m["recall@2"][0] == pytest.approx(0.5) and m["hr@2"][0] == pytest.approx(0.5)
  assert m["ndcg@2"][0] == pytest.approx((1 + L3) / 4)

  # 9 candidates, GT of 3 with one target excluded (unreachable), K=4 and K=20 > N.
  n, gt, reachable, ks = 9, 3, 2, (4, 20)
  expected = metrics.random_user_metrics(np.array([n]), np.array([gt]), np.array([reachable]), ks)
  rng = np.random.default_rng(0)
  ranked = np.stack([rng.permutation(n) for _ in range(20000)])  # targets are items 0, 1 and excluded 99
  sampled = metrics.user_metrics(ranked, [np.array([0, 1, 99])] * len(ranked), ks)
  for name in metrics.metric_names(ks):
    assert sampled[name].mean() == pytest.approx(expected[name][0], abs=0.01), name

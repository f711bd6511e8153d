"""Reference recommenders (fellrec_jax.baselines) against plain-NumPy transcriptions, a learnable synthetic
pattern, and the evaluation harness's shared floor loop."""

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fellrec_jax import baselines as bl
from fellrec_jax.baselines import item_knn, sasrec, scoring
from fellrec_jax import metrics
from fellrec_jax.data import prepare_dataset
from fellrec_jax.data.preprocess import Split

ML_SMALL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"


def _split(seqs, history_len=50):
  """Leave-one-out Split of full sequences (last = test, second-to-last = valid)."""
  seqs = [np.asarray(s, np.int32) for s in seqs]
  return Split("loo", history_len, tuple(s[:-2] for s in seqs), tuple(s[:-2][-history_len:] for s in seqs),
               tuple(s[-2:-1] for s in seqs), tuple(s[:-1][-history_len:] for s in seqs),
               tuple(s[-1:] for s in seqs))


# ----------------------------------------------------------------------------- item-kNN

TINY_USERS = [[0, 1], [0, 1, 2], [1, 2, 3], [3, 4, 4]]  # item 4 repeated: the matrix is binary


def _numpy_cosine(users, num_items):
  sets = [{u for u, items in enumerate(users) if i in items} for i in range(num_items)]
  sim = np.zeros((num_items, num_items))
  for i in range(num_items):
    for j in range(num_items):
      if i != j and sets[i] and sets[j]:
        sim[i, j] = len(sets[i] & sets[j]) / np.sqrt(len(sets[i]) * len(sets[j]))
  return sim


def test_cosine_similarity_by_hand():
  sim = item_knn.cosine_similarity([np.asarray(u) for u in TINY_USERS], 6)  # item 5: never seen
  # Item 0 is held by users {0, 1}, item 1 by {0, 1, 2}, item 4 by {3} (once, despite the repeat).
  assert sim[0, 1] == pytest.approx(2 / np.sqrt(6))
  assert sim[3, 4] == pytest.approx(1 / np.sqrt(2))
  assert sim[0, 3] == 0.0 and np.all(np.diag(sim) == 0.0) and np.all(sim[5] == 0.0)
  np.testing.assert_allclose(sim, _numpy_cosine(TINY_USERS, 6), rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, None])
def test_item_knn_scores_match_numpy(k):
  num_items = 5
  sim = _numpy_cosine(TINY_USERS, num_items)
  kept = np.zeros_like(sim)
  for i in range(num_items):
    order = sorted(range(num_items), key=lambda j: (-sim[i, j], j))  # ties: lower id
    for j in order[:num_items if k is None else k]:
      kept[i, j] = sim[i, j]
  histories = [np.asarray([0]), np.asarray([1, 3, 3]), np.asarray([], np.int32)]
  # Candidate j sums its kept similarities to the user's distinct history items.
  expected = np.asarray([[sum(kept[j, i] for i in set(h.tolist())) for j in range(num_items)] for h in histories])
  score = item_knn.item_knn_scores([np.asarray(u) for u in TINY_USERS], num_items, k=k)
  np.testing.assert_allclose(score(np.arange(3), histories), expected, rtol=1e-6)


def test_item_knn_k_is_tuned_on_validation():
  # Two disjoint item communities: neighbours inside the user's community predict the held-out items.
  rng = np.random.default_rng(0)
  seqs = [rng.permutation(np.arange(10) + 10 * (u % 2))[:8] for u in range(30)]
  fitted = item_knn.fit_item_knn(_split(seqs), 20, ks=(1, 5, None))
  assert fitted.info["k"] in (1, 5, "all")
  best = fitted.info["valid_ndcg@10"][str(fitted.info["k"])]
  assert best == max(fitted.info["valid_ndcg@10"].values())
  assert scoring.split_ndcg(_split(seqs), 20, fitted.score, "test") > 0.2  # chance ~ 10 / 14 of 20 items: 0.1


# ----------------------------------------------------------------------------- SASRec forward

def _np_layer_norm(p, x, eps=1e-8):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_sasrec_logits(cfg, params, ids):
  """Loop-by-loop transcription of the original SASRec forward (no dropout), float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d, h = cfg.dim, cfg.num_heads
  c = d // h
  out = []
  for row in ids:
    valid = row > 0
    t_len = len(row)
    x = np.stack([p["item_emb"][i] * np.sqrt(d) + p["pos_emb"][t] for t, i in enumerate(row)]) * valid[:, None]
    for blk in p["blocks"]:
      q_in = _np_layer_norm(blk["ln_attn"], x)
      q = q_in @ blk["q"]["w"] + blk["q"]["b"]
      k = x @ blk["k"]["w"] + blk["k"]["b"]
      v = x @ blk["v"]["w"] + blk["v"]["b"]
      att = np.zeros((t_len, d))
      for head in range(h):
        sl = slice(head * c, (head + 1) * c)
        for t in range(t_len):
          keys = [s for s in range(t + 1) if valid[s]]
          if not keys:
            continue  # a padding query with no valid key: zeroed below anyway
          logits = np.asarray([q[t, sl] @ k[s, sl] for s in keys]) / np.sqrt(c)
          w = np.exp(logits - logits.max())
          att[t, sl] = (w / w.sum()) @ v[keys, sl]
      x = _np_layer_norm(blk["ln_ffn"], q_in + att)
      f = np.maximum(x @ blk["ffn1"]["w"] + blk["ffn1"]["b"], 0.0) @ blk["ffn2"]["w"] + blk["ffn2"]["b"]
      x = (x + f) * valid[:, None]
    x = _np_layer_norm(p["ln_final"], x)
    out.append(x @ p["item_emb"][1:].T)
  return np.stack(out)


def test_sasrec_logits_match_numpy():
  cfg = sasrec.SASRecConfig(num_items=11, max_len=6, dim=8, num_blocks=2, num_heads=2, dropout=0.5)
  params = sasrec.init_sasrec(cfg, jax.random.key(3))
  rng = np.random.default_rng(1)
  # Non-trivial norms and biases, so a mix-up of scale/bias or of the normalized residual shows.
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.normal(size=a.shape).astype(np.float32), params)
  params["item_emb"][0] = 0.0
  ids = sasrec.left_pad([np.asarray([3, 7, 1, 10]), np.asarray([5]), np.arange(11)], cfg.max_len)
  logits = jax.jit(sasrec.sasrec_logits, static_argnums=0)  # one compilation instead of per-op dispatch
  got = np.asarray(logits(cfg, params, ids))
  want = _np_sasrec_logits(cfg, params, ids)
  valid = ids > 0
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-4, atol=1e-4)
  last = np.asarray(sasrec.sasrec_last_logits(cfg, params, ids))
  np.testing.assert_allclose(last, got[:, -1], rtol=1e-5, atol=1e-5)
  # Dropout is on with a key, off without one.
  assert not np.allclose(np.asarray(logits(cfg, params, ids, jax.random.key(0)))[valid], got[valid])


def test_training_chunks_cover_every_transition_once():
  seqs = [np.arange(12), np.asarray([4, 2]), np.asarray([9])]
  inputs, targets = sasrec.training_chunks(seqs, 5)
  pairs = sorted((int(a) - 1, int(b) - 1) for x, y in zip(inputs, targets) for a, b in zip(x, y) if b > 0)
  expected = sorted([(i, i + 1) for i in range(11)] + [(4, 2)])
  assert pairs == expected
  assert inputs.shape == targets.shape == (4, 5)  # 12 items -> chunks of 5, 5, 1 transitions; [4, 2] -> 1
  assert ((inputs > 0) == (targets > 0)).all()


# ----------------------------------------------------------------------------- SASRec training

def test_sasrec_learns_a_successor_pattern():
  # Item i is always followed by i + 1 (mod I): the next item is determined by the last one.
  num_items = 24
  rng = np.random.default_rng(0)
  seqs = [(rng.integers(num_items) + np.arange(rng.integers(6, 16))) % num_items for _ in range(64)]
  split = _split(seqs, history_len=8)
  model = sasrec.SASRecConfig(num_items, max_len=8, dim=32, dropout=0.1)
  train = sasrec.TrainConfig(learning_rate=5e-3, batch_size=32, max_epochs=30, eval_every=5, patience=2,
                         time_budget_s=60)
  fitted = sasrec.train_sasrec(split, num_items, seed=0, model=model, train=train)
  print(fitted.info)
  assert fitted.info["valid_ndcg@10"] > 0.95
  assert scoring.split_ndcg(split, num_items, fitted.score, "test") > 0.95
  # Reproducible for a seed (a short run: the same compiled epoch).
  short = dataclasses.replace(train, max_epochs=2, eval_every=1)
  users = np.arange(4)
  a, b = (sasrec.train_sasrec(split, num_items, seed=0, model=model, train=short).score(
      users, scoring.eval_histories(split, users, "test")) for _ in range(2))
  np.testing.assert_array_equal(a, b)


def test_eval_histories():
  split = _split([np.arange(6), np.arange(10, 14)])
  assert scoring.eval_histories(split, [0, 1], "valid")[1].tolist() == [10, 11]
  assert scoring.eval_histories(split, [0, 1], "test")[0].tolist() == [0, 1, 2, 3, 4]
  with pytest.raises(ValueError):
    scoring.eval_histories(split, [0], "train")


# ----------------------------------------------------------------------------- evaluation harness

@pytest.fixture(scope="module")
def synthetic():
  prep, _ = prepare_dataset("synthetic", num_clients=2, partition="random",
                            synthetic_kwargs=dict(num_users=40, num_items=40, interactions_per_user=12))
  return prep


def _old_popularity_baseline(ev, prep, part, ks, max_users=None):
  """The loop `popularity_baseline` had before the shared `score_baseline`."""
  pop = metrics.popularity(prep.split.train, len(prep.titles))
  per_client = []
  for windows, targets, excluded in ev._all_clients(prep, part, max_users):
    if not len(windows):
      per_client.append({})
      continue
    exclude_ui = metrics.exclusion_mask(excluded, len(prep.titles))
    ranked, _ = metrics.top_k(np.broadcast_to(pop, exclude_ui.shape), exclude_ui, min(max(ks), len(prep.titles)))
    per_client.append(metrics.user_metrics(np.asarray(ranked), targets, ks))
  return metrics.summarize(per_client)


@pytest.mark.parametrize("part,max_users", [("test", None), ("valid", 3)])
def test_popularity_through_the_shared_loop_is_unchanged(synthetic, part, max_users):
  from federated import evaluation as ev
  old = _old_popularity_baseline(ev, synthetic, part, (5, 10), max_users)
  assert ev.popularity_baseline(synthetic, part, (5, 10), max_users=max_users) == old
  score = bl.most_popular(synthetic.split.train, len(synthetic.titles))
  assert ev.score_baseline(synthetic, part, score, (5, 10), max_users=max_users) == old


def test_reference_rows_schema(synthetic):
  from federated import evaluation as ev
  rows = ev.reference_rows(synthetic, "test", ("item_knn", "sasrec"), (5, 10), knn_ks=(5, None),
                           sasrec_model=sasrec.SASRecConfig(len(synthetic.titles), max_len=8, dim=16),
                           sasrec_train=sasrec.TrainConfig(max_epochs=2, eval_every=1))
  assert list(rows) == ["most_popular", "item_knn", "sasrec"]
  pop = ev.popularity_baseline(synthetic, "test", (5, 10))
  assert {k: v for k, v in rows["most_popular"].items() if k != "fit"} == pop
  for row in rows.values():
    assert set(row) == {"overall", "clients", "balance", "fit"}
    assert row["overall"]["test_users"] == pop["overall"]["test_users"]
  assert rows["item_knn"]["fit"]["k"] in (5, "all")
  assert rows["sasrec"]["fit"]["epochs"] == 2


# ----------------------------------------------------------------------------- real data (optional)

@pytest.mark.slow
@pytest.mark.skipif(not ML_SMALL.exists(), reason=f"{ML_SMALL} absent (shared data not laid out)")
def test_item_knn_beats_popularity_on_ml_latest_small():
  prep, _ = prepare_dataset("movielens", ML_SMALL, num_clients=5, split="loo", partition="random")
  num_items = len(prep.titles)
  start = time.perf_counter()
  knn = item_knn.fit_item_knn(prep.split, num_items)
  assert time.perf_counter() - start < 120
  pop = scoring.split_ndcg(prep.split, num_items, bl.most_popular(prep.split.train, num_items), "test")
  assert scoring.split_ndcg(prep.split, num_items, knn.score, "test") > 1.2 * pop

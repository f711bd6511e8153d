"""Data layer on ml-latest-small and the synthetic default: filtering, splits, partition, batches."""

import collections
import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fellrec_jax.data import examples, pipeline, preprocess, prepare_dataset, sources, tokenization
from fellrec_jax.data.sources import synthetic_data

ML = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small"
needs_ml = pytest.mark.skipif(not (ML / "ratings.csv").exists(), reason=f"ml-latest-small not found at {ML}")


class WordTokenizer:
  """Whitespace tokenizer growing its vocabulary on the fly; ids 0/1/2 are pad/bos/eos."""

  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self):
    self.vocab = {}

  def encode(self, text):
    return [self.vocab.setdefault(w, len(self.vocab) + 3) for w in text.split()]


@pytest.fixture(scope="module")
def ml_loo():
  return prepare_dataset("movielens", ML, num_clients=5, partition="kmeans", seed=0, bpr_steps=300)


@pytest.fixture(scope="module")
def ml_dataset():
  return preprocess.preprocess(sources.read_movielens(ML), k_core=5)


def plain_five_core(k=5):
  with open(ML / "movies.csv", encoding="utf-8", newline="") as f:
    titled = {r["movieId"] for r in csv.DictReader(f)}
  with open(ML / "ratings.csv", encoding="utf-8", newline="") as f:
    edges = {(r["userId"], r["movieId"]) for r in csv.DictReader(f) if r["movieId"] in titled}
  while True:
    uc = collections.Counter(u for u, _ in edges)
    ic = collections.Counter(i for _, i in edges)
    kept = {(u, i) for u, i in edges if uc[u] >= k and ic[i] >= k}
    if kept == edges:
      return len({u for u, _ in edges}), len({i for _, i in edges}), len(edges)
    edges = kept


def plain_temporal_test_users(k=5, test_from=0.9):
  """Users with a test target under the global temporal split, counted in plain Python from the CSVs:
  the 5-core's interactions (first rating of each user-movie pair), the test period from the timestamp at
  position int(0.9 N) of all N sorted timestamps, and a test user has an interaction in that period and
  one before it (a history to prompt with)."""
  with open(ML / "movies.csv", encoding="utf-8", newline="") as f:
    titled = {r["movieId"] for r in csv.DictReader(f)}
  first = {}
  with open(ML / "ratings.csv", encoding="utf-8", newline="") as f:
    for r in csv.DictReader(f):
      if r["movieId"] in titled:
        key, t = (r["userId"], r["movieId"]), int(r["timestamp"])
        first[key] = min(t, first.get(key, t))
  edges = set(first)
  while True:
    uc = collections.Counter(u for u, _ in edges)
    ic = collections.Counter(i for _, i in edges)
    kept = {(u, i) for u, i in edges if uc[u] >= k and ic[i] >= k}
    if kept == edges:
      break
    edges = kept
  ts = sorted(first[e] for e in edges)
  t_test = ts[min(int(test_from * len(ts)), len(ts) - 1)]
  late = {u for (u, i) in edges if first[u, i] >= t_test}
  early = {u for (u, i) in edges if first[u, i] < t_test}
  return len(late & early)


@needs_ml
def test_five_core_counts_match_plain_python(ml_loo):
  _, stats = ml_loo
  assert (stats["users"], stats["items"], stats["interactions"]) == plain_five_core()
  assert sum(c["users"] for c in stats["clients"]) == stats["users"]
  assert sum(c["interactions"] for c in stats["clients"]) == stats["interactions"]


@needs_ml
def test_temporal_split_periods_are_ordered(ml_dataset):
  ds = ml_dataset
  sp = preprocess.temporal_split(ds, history_len=10)
  ts = {(u, i): t for u, i, t in zip(ds.user, ds.item, ds.timestamp)}
  period_ts = {"train": [], "valid": [], "test": []}
  for u in range(ds.num_users):
    period_ts["train"] += [ts[u, i] for i in sp.train[u]]
    period_ts["valid"] += [ts[u, i] for i in sp.valid_targets[u]]
    period_ts["test"] += [ts[u, i] for i in sp.test_targets[u]]
    # Histories are the most recent earlier items, in time order.
    if len(sp.valid_targets[u]):
      np.testing.assert_array_equal(sp.valid_history[u], sp.train[u][-10:])
    if len(sp.test_targets[u]):
      assert all(ts[u, h] < min(ts[u, t] for t in sp.test_targets[u]) for h in sp.test_history[u])
      assert len(sp.test_history[u]) <= 10
  assert max(period_ts["train"]) < min(period_ts["valid"])
  assert max(period_ts["valid"]) < min(period_ts["test"])
  # Users without history get no targets; the rest of the interactions land in exactly one period.
  assert sp.test_users().sum() == plain_temporal_test_users()  # 29, the count quoted in issue 3
  assert len(period_ts["train"]) + len(period_ts["valid"]) + len(period_ts["test"]) <= ds.num_interactions


@needs_ml
def test_leave_one_out_split(ml_loo):
  prep, stats = ml_loo
  sp, ds = prep.split, prep.dataset
  assert sp.kind == "loo" and stats["split"] == "loo"
  seqs = preprocess._sequences(ds)
  for u in range(ds.num_users):
    np.testing.assert_array_equal(np.concatenate([sp.train[u], sp.valid_targets[u], sp.test_targets[u]]), seqs[u])
    np.testing.assert_array_equal(sp.test_history[u], seqs[u][:-1][-10:])
  assert all(c["valid_users"] == c["test_users"] == c["users"] for c in stats["clients"])


@needs_ml
def test_every_user_on_exactly_one_client(ml_loo):
  prep, stats = ml_loo
  assert prep.clients.shape == (prep.dataset.num_users,)
  assert set(np.unique(prep.clients)) == set(range(5))
  users = np.concatenate([prep.client_users(c) for c in range(5)])
  assert np.array_equal(np.sort(users), np.arange(prep.dataset.num_users))
  windows = sum(len(prep.client_windows(c)) for c in range(5))
  assert windows == len(prep.train) == sum(c["train_examples"] for c in stats["clients"])


@needs_ml
def test_generative_batches_shapes_and_masks():
  prep, stats = prepare_dataset("movielens", ML, num_clients=3, partition="random", seed=1, max_train_samples=40)
  tok = WordTokenizer()
  clients = pipeline.generative_clients(prep, tok, cutoff=512)
  n = [c["train_examples"] for c in stats["clients"]]
  assert [len(c) for c in clients] == n and sum(n) == 40
  bsz = 4
  steps = pipeline.steps_per_epoch(clients, bsz)
  assert list(steps) == [-(-k // bsz) for k in n]
  batches = list(pipeline.epoch_batches(clients, batch_size=bsz, seed=0, epoch=0))
  assert len(batches) == steps.max()
  t, num_targets = clients[0].seq_len, clients[0].num_targets
  assert num_targets < t
  seen = [0] * 3
  for s, b in enumerate(batches):
    assert b["input_ids"].shape == b["attention_mask"].shape == (3, bsz, t)
    assert b["target_index"].shape == b["target_mask"].shape == (3, bsz, num_targets)
    assert b["example_mask"].shape == (3, bsz)
    assert all(v.dtype == np.int32 for v in b.values())
    for c in range(3):
      real = min(bsz, max(0, n[c] - s * bsz))
      np.testing.assert_array_equal(b["example_mask"][c], [1] * real + [0] * (bsz - real))
      seen[c] += real
      pad = b["example_mask"][c] == 0
      assert not b["attention_mask"][c][pad].any() and not b["target_mask"][c][pad].any()
      assert (b["input_ids"][c][pad] == tok.pad_id).all()
      for r in np.flatnonzero(~pad):
        ids, am = b["input_ids"][c, r], b["attention_mask"][c, r]
        lm = _loss_mask(b, c, r, t)
        length = am.sum()
        assert am[:length].all() and ids[0] == tok.bos_id and ids[length - 1] == tok.eos_id
        # loss_mask[t] = 1 iff input_ids[t+1] is a response token: the quoted title, then eos.
        predicted = ids[1:][lm[:-1] == 1]
        assert lm[-1] == 0 and lm[length - 1:].sum() == 0
        title_ids = predicted[:-1]
        assert predicted[-1] == tok.eos_id
        assert np.array_equal(ids[length - len(predicted):length], predicted)  # response is a suffix
        words = {v: k for k, v in tok.vocab.items()}
        assert " ".join(words[i] for i in title_ids).startswith('"')
  assert seen == n


def _loss_mask(batch, c, r, t):
  """Row r of client c's targets as a [T] mask: 1 at t when token t+1 is predicted."""
  index, mask = batch["target_index"][c, r], batch["target_mask"][c, r]
  assert np.all(np.diff(index[mask == 1]) > 0) and not index[mask == 0].any()  # in order, zeros after
  out = np.zeros(t, np.int32)
  out[index[mask == 1]] = 1
  return out


def test_tokenize_truncation_keeps_response():
  tok = WordTokenizer()
  ids, p = tokenization.tokenize(tok, " ".join(f"w{i}" for i in range(50)), "a b c", cutoff=10)
  assert len(ids) == 10 and ids[0] == tok.bos_id and p == 6
  assert ids[-4:] == tok.encode("a b c") + [tok.eos_id]
  assert ids[1:p] == tok.encode(" ".join(f"w{i}" for i in range(45, 50)))
  ids, p = tokenization.tokenize(tok, "x y", "a b", cutoff=512)
  assert ids == [tok.bos_id] + tok.encode("x y a b") + [tok.eos_id] and p == 3


def test_train_on_inputs_masks_everything_after_first_token():
  prep, _ = prepare_dataset("synthetic", seed=0, num_clients=2, partition="random", max_train_samples=6)
  clients = pipeline.generative_clients(prep, WordTokenizer(), train_on_inputs=True)
  b = pipeline.batch_at(clients, batch_size=4, seed=0, epoch=0, step=0)
  length = b["attention_mask"].sum(-1)
  np.testing.assert_array_equal(b["target_mask"].sum(-1), np.maximum(length - 1, 0))
  assert (length - 1).max() <= b["target_index"].shape[-1] < b["input_ids"].shape[-1]


def test_item_sequence_iteration_covers_each_position_once_and_resumes_exactly():
  prep, stats = prepare_dataset("synthetic", seed=3, num_clients=4, partition="random")
  clients = pipeline.item_sequence_clients(prep, seq_len=10)
  bsz = 8
  n_steps = int(pipeline.steps_per_epoch(clients, bsz).max())
  it = pipeline.iterate(clients, batch_size=bsz, state={"seed": 0, "epoch": 0, "step": 0})
  run = [next(it) for _ in range(2 * n_steps + 3)]
  b0 = run[0][0]
  assert b0["input_ids"].shape == b0["attention_mask"].shape == b0["target"].shape == (4, bsz, 10)
  assert b0["example_mask"].shape == (4, bsz)
  for c in range(4):  # one epoch trains every (item -> next item) step of the client's users exactly once
    got = sorted((int(i), int(t)) for b, _ in run[:n_steps]
                 for ids, m, tg in zip(b["input_ids"][c], b["attention_mask"][c], b["target"][c])
                 for i, t in zip(ids[m > 0], tg[m > 0]))
    seqs = [prep.split.train[u] for u in prep.client_users(c)]
    assert got == sorted((int(s[j - 1]), int(s[j])) for s in seqs for j in range(1, len(s)))
  assert run[n_steps - 1][1] == {"seed": 0, "epoch": 1, "step": 0}
  # Epochs reshuffle; resuming from a saved state reproduces the same batches.
  assert not np.array_equal(run[0][0]["target"], run[n_steps][0]["target"])
  state = run[n_steps + 1][1]
  resumed = pipeline.iterate(clients, batch_size=bsz, state=state)
  for (want, _), (got, _) in zip(run[n_steps + 2:], resumed):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  # Training windows (prompts): left-padded, and the target follows the last history item.
  w = prep.train
  assert (w.history_mask[:, -1] == 1).all()
  for u, h, m, t in zip(w.user, w.history, w.history_mask, w.target):
    seq = list(prep.split.train[u])
    p = seq.index(t)
    assert list(h[m == 1]) == seq[max(0, p - 10):p]


def test_synthetic_default_is_deterministic_for_seed():
  a, b, c = sources.synthetic(seed=7), sources.synthetic(seed=7), sources.synthetic(seed=8)
  assert a.titles == b.titles and a.categories == b.categories
  for f in ("user", "item", "timestamp"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert a.titles != c.titles or not np.array_equal(a.item, c.item)
  assert a.num_users == 200 and a.num_items == 120 and 15 * 200 <= a.num_interactions <= 25 * 200
  pa, sa = prepare_dataset("synthetic", seed=7, bpr_steps=200)
  pb, sb = prepare_dataset("synthetic", seed=7, bpr_steps=200)
  assert sa == sb and np.array_equal(pa.clients, pb.clients)
  assert len(set(a.titles)) == a.num_items


def test_synthetic_is_learnable():
  """A first-order transition count model beats popularity on the synthetic test targets."""
  prep, _ = prepare_dataset("synthetic", seed=0, partition="random")
  sp, n_items = prep.split, prep.dataset.num_items
  trans = np.zeros((n_items, n_items))
  pop = np.zeros(n_items)
  for seq in sp.train:
    np.add.at(trans, (seq[:-1], seq[1:]), 1)
    np.add.at(pop, seq, 1)
  hits = {"markov": [], "pop": []}
  for h, targets in zip(sp.test_history, sp.test_targets):
    if len(targets):
      for name, score in (("markov", trans[h[-1]] + 1e-3 * pop), ("pop", pop.copy())):
        score[h] = -np.inf
        hits[name].append(np.isin(np.argsort(-score)[:10], targets).any())
  assert np.mean(hits["markov"]) > np.mean(hits["pop"]) + 0.15


def test_bigrec_prompt_format():
  rec = examples.bigrec_prompt(["A", "B, the sequel"], "C", "movie")
  assert rec["instruction"].startswith("Given a list of movies the user has interacted with before, please recommend a new movie")
  assert rec["input"].endswith(': "A", "B, the sequel"') and rec["output"] == '"C"'
  assert sources.parse_titles(rec["input"]) == ["A", "B, the sequel"]
  prompt, response = examples.prompt_text(rec)
  assert prompt.endswith("### Response:\n") and response == '"C"'


def test_sequence_prompt_format():
  prompt, response = examples.sequence_prompt(["A", "B, the sequel"], ["C", "D"], "movie")
  assert prompt == 'The user has interacted with the following movies, oldest first, one per line:\n"A"\n"B, the sequel"\n'
  assert response == '"C"\n"D"\n'
  assert examples.sequence_prompt(["A"], [], "movie")[1] == ""


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 12, 25])
def test_sequence_chunks_make_every_position_a_target_once(n):
  h = 3
  seq = np.arange(100, 100 + n)
  targets, contexts = [], []
  for start in examples.chunk_starts(n, h):
    context, chunk_targets = examples.sequence_chunk(seq, start, h)
    targets.extend(chunk_targets.tolist())
    # the context is the items just before the chunk's targets, at most h of them
    np.testing.assert_array_equal(context, seq[max(0, start - h):start])
    contexts.append(len(context))
  assert targets == seq[1:].tolist()
  assert all(1 <= c <= h for c in contexts)


def test_sequence_chunk_starts_cap_and_clients():
  prep, _ = prepare_dataset("synthetic", seed=0, num_clients=3, partition="random")
  prep = dataclasses.replace(prep, prompt="sequence")
  every = pipeline.sequence_chunk_starts(prep)
  total = sum(map(len, every))
  assert total == sum(len(examples.chunk_starts(len(s), prep.split.history_len)) for s in prep.split.train)
  for c, starts in enumerate(every):
    assert all(prep.clients[u] == c for u, _ in starts)
  capped = pipeline.sequence_chunk_starts(prep, max_chunks=total // 4, seed=1)
  assert sum(map(len, capped)) == total // 4
  assert capped == pipeline.sequence_chunk_starts(prep, max_chunks=total // 4, seed=1)  # seeded
  assert all(set(k) <= set(e) for k, e in zip(capped, every))
  # a chunk renders its context as the prompt and all its targets as the response
  (u, start), = capped[0][:1]
  context, targets = examples.sequence_chunk(prep.split.train[u], start, prep.split.history_len)
  prompt, response = prep.sequence_prompts(0, [(u, start)])[0]
  assert response == "".join(examples.title_line(prep.titles[i]) for i in targets)
  assert prompt.endswith("".join(examples.title_line(prep.titles[i]) for i in context))


def test_sequence_prompt_of_verbatim_records_is_an_error():
  prep, _ = prepare_dataset("synthetic", seed=0, num_clients=2, partition="random")
  w = prep.train.take(np.arange(2))
  w = dataclasses.replace(w, text=tuple({"instruction": "i", "input": "x", "output": "y"} for _ in range(2)))
  with pytest.raises(sources.DataError, match="--prompt=sequence"):
    dataclasses.replace(prep, prompt="sequence").prompts(w)


def test_eval_examples_render_prompts_without_answer():
  prep, stats = prepare_dataset("synthetic", seed=0, num_clients=2, partition="random")
  for c in range(2):
    w, targets = prep.eval_examples(c, "test")
    assert len(w) == len(targets) == stats["clients"][c]["test_users"]
    recs = examples.window_records(w, prep.titles, prep.dataset.item_noun)
    for rec, u, h, m in zip(recs, w.user, w.history, w.history_mask):
      assert rec["output"] == ""
      assert sources.parse_titles(rec["input"]) == [prep.titles[i] for i in prep.split.test_history[u]]
      np.testing.assert_array_equal(h[m == 1], prep.split.test_history[u])


def _synthetic_taste_groups(ds, *, num_users=200, num_items=120, num_groups=5, num_categories=6, seed=0):
  """Each user's latent taste group in `sources.synthetic`, by replaying its random stream (titles, item
  genres, each group's liked genres and cycle, then the users' groups). The replay is checked against
  the generated item genres, so a change of the generator fails here instead of scoring wrong groups."""
  rng = np.random.default_rng(seed)
  rng.permutation(len(synthetic_data._ADJECTIVES) * len(synthetic_data._NOUNS))
  cat = rng.integers(num_categories, size=num_items)
  for _ in range(num_groups):
    liked = np.isin(cat, rng.choice(num_categories, size=2, replace=False))
    rng.permutation(np.flatnonzero(liked))
  group = rng.integers(num_groups, size=num_users)
  assert [synthetic_data._GENRES[cat[int(k[1:])]] for k in ds.item_keys] == list(ds.categories)
  return np.asarray([group[int(k[1:])] for k in ds.user_keys])


def test_bpr_kmeans_partition_puts_the_synthetic_taste_groups_together():
  """FELLRec's partition (BPR-MF user embeddings + k-means) on the default synthetic data (5 taste groups,
  5 clients): purity = share of users in their client's majority group, against random partitions of
  the same client sizes."""
  prep, _ = prepare_dataset("synthetic", num_clients=5, partition="kmeans", seed=0)
  groups = _synthetic_taste_groups(prep.dataset)
  purity = lambda clients: sum(np.bincount(groups[clients == c]).max() for c in np.unique(clients)) / len(groups)
  null = [purity(np.random.default_rng(i).permutation(prep.clients)) for i in range(200)]
  # 0.25 above the best of 200 random partitions (whose mean is ~0.29): a quarter of all users more sit
  # with their taste group than chance ever puts there (measured 0.94 against a null maximum of 0.34)
  assert purity(prep.clients) > max(null) + 0.25, (purity(prep.clients), max(null))

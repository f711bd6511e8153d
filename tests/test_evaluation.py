"""Generative (BIGRec grounding) and discriminative evaluation on a tiny synthetic setup."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

import models
from fellrec_jax import metrics
from fellrec_jax.data import examples, pipeline, prepare_dataset, tokenization
from federated import evaluation as ev
from federated import representations
from models.tokenizer import pad_rows

C = 2


@pytest.fixture(scope="module")
def setup():
  prep, _ = prepare_dataset("synthetic", num_clients=C, partition="random",
                            synthetic_kwargs=dict(num_users=40, num_items=40, interactions_per_user=12))
  config, base, tokenizer = models.load("tiny-llama", corpus=list(prep.titles) + [examples.ALPACA_TEMPLATE],
                                        num_layers=2, lora=models.LoraConfig(rank=4, targets=("q", "v")))
  adapters = [models.init_lora(config, jax.random.key(c)) for c in range(C)]
  lora_c = jax.tree.map(lambda *xs: np.stack(xs), *adapters)
  item_emb = representations.item_embeddings(config, base, tokenizer, prep.titles)
  return prep, config, base, tokenizer, lora_c, item_emb


def _check_schema(result, prep, part, ks=(5, 10)):
  names = metrics.metric_names(ks)
  users = [len(prep.eval_examples(c, part)[0]) for c in range(C)]
  assert result["overall"]["test_users"] == sum(users)
  assert [c["test_users"] for c in result["clients"]] == users
  for row in [result["overall"], *result["clients"]]:
    assert set(row) == set(names) | {"test_users"}
    assert all(0.0 <= row[n] <= 1.0 for n in names)
  assert set(result["balance"]) == set(names)
  for b in result["balance"].values():
    assert set(b) == {"std", "min", "max", "range", "cv"}
    assert b["range"] == pytest.approx(b["max"] - b["min"])


def test_decoder_rows_match_training_tokenization(setup):
  prep, config, _, tokenizer, _, _ = setup
  title = prep.titles[0]
  assert tokenization.text_rows(config, tokenizer, [title], 64) == [[tokenizer.bos_id] + tokenizer.encode(title)]
  long_row = tokenization.text_rows(config, tokenizer, [title * 20], 8)[0]  # truncation keeps bos and the end
  assert long_row == [tokenizer.bos_id] + tokenizer.encode(title * 20)[-7:]


def test_representation_ignores_left_padding(setup):
  prep, config, base, tokenizer, _, item_emb = setup
  alone = representations.embed_texts(config, base, tokenizer, [prep.titles[3]], batch_size=1)
  np.testing.assert_allclose(alone[0], item_emb[3], atol=1e-5)
  wide = representations.embed_texts(config, base, tokenizer, [prep.titles[3]], batch_size=1, width=64)
  np.testing.assert_allclose(wide[0], item_emb[3], atol=1e-5)


def test_exact_title_grounds_first_at_distance_zero(setup):
  prep, config, base, tokenizer, _, item_emb = setup
  texts = [prep.titles[7], prep.titles[0], "not a catalogue title"]
  exclude = np.zeros((3, len(prep.titles)), bool)
  ids, dist = ev.ground(config, base, tokenizer, texts, item_emb, prep.titles, exclude, 5)
  assert ids[0, 0] == 7 and dist[0, 0] == 0.0
  assert ids[1, 0] == 0 and dist[1, 0] == 0.0
  assert (np.diff(dist, axis=1) >= 0).all()
  assert (dist[2] > 0).all()


def test_clean_response_strips_quotes_and_whitespace():
  assert ev.clean_response(' "Brave Fox Jazz"\n') == "Brave Fox Jazz"


def test_history_items_never_ranked(setup):
  prep, config, base, tokenizer, _, item_emb = setup
  windows, _ = prep.eval_examples(0, "test")
  excluded = ev.excluded_items(prep, windows, "test")
  u = windows.user[0]
  history = windows.history[0][windows.history_mask[0] > 0]
  expected = np.concatenate([history, prep.split.train[u], prep.split.valid_targets[u]])
  assert set(expected.tolist()) == set(excluded[0].tolist())
  # Generations that are exactly history titles still never surface a history item.
  texts = [prep.titles[i] for i in history[:4]]
  exclude = metrics.exclusion_mask(excluded[:1] * len(texts), len(prep.titles))
  ids, _ = ev.ground(config, base, tokenizer, texts, item_emb, prep.titles, exclude, 20)
  assert not np.isin(ids, excluded[0]).any()


def test_evaluate_generative_end_to_end(setup):
  prep, config, base, tokenizer, lora_c, item_emb = setup
  result = ev.evaluate_generative(config, base, tokenizer, lora_c, prep, "test", ks=(5, 10), num_beams=2,
                                  max_new_tokens=8, batch_size=8, item_emb=item_emb)
  _check_schema(result, prep, "test")


def test_evaluate_discriminative_end_to_end(setup):
  prep, config, base, tokenizer, lora_c, item_emb = setup
  result = ev.evaluate_discriminative(config, base, tokenizer, lora_c, prep, "valid", ks=(5, 10), batch_size=8,
                                      item_emb=item_emb)
  _check_schema(result, prep, "valid")


def test_each_client_uses_its_own_adapter(setup):
  prep, config, base, tokenizer, lora_c, item_emb = setup
  # Client 0 keeps a fresh adapter (B = 0: the base model); client 1's is perturbed.
  rng = np.random.default_rng(0)
  perturbed = jax.tree.map(lambda x: np.asarray(x).copy(), lora_c)
  for ab in perturbed["blocks"].values():
    ab["b_ro"][1] = rng.normal(0, 0.5, ab["b_ro"].shape[1:])
  run = lambda lora: ev.evaluate_discriminative(config, base, tokenizer, lora, prep, "test", ks=(10,),
                                                item_emb=item_emb)["clients"]
  plain, adapted = run(None), run(perturbed)
  assert adapted[0] == plain[0]
  assert adapted[1] != plain[1]
  with pytest.raises(ValueError, match="clients axis"):
    ev.evaluate_discriminative(config, base, tokenizer, jax.tree.map(lambda x: x[:1], lora_c), prep, "test")


@pytest.mark.parametrize("prompt", [pytest.param("alpaca", marks=pytest.mark.slow), "sequence"])
def test_constrained_ranks_first_the_title_a_model_was_tuned_to_emit(setup, prompt):
  prep, config, _, tokenizer, _, _ = setup
  prep = dataclasses.replace(prep, prompt=prompt)
  # With training's init std (0.02) the final norm caps every logit near 1, so no adapter can make the
  # model sure of a title; a larger std lets it.
  base = models.init_params(config, jax.random.key(1), std=0.2)
  windows, _ = prep.eval_examples(0, "test")
  windows = windows.take(np.arange(8))
  excluded = ev.excluded_items(prep, windows, "test")
  target = next(i for i in range(len(prep.titles)) if not any(i in ex for ex in excluded))
  # Training's (prompt, response) of each window answered with the target, tokenized as training does.
  pairs = prep.prompts(dataclasses.replace(windows, target=np.full(len(windows), target, np.int32)))
  tokenized = [tokenization.tokenize(tokenizer, p, r) for p, r in pairs]
  ids_bt, mask_bt = pad_rows([ids for ids, _ in tokenized], tokenizer.pad_id, "right")
  # Next-token targets at the response positions only.
  loss_mask_bt = np.zeros_like(mask_bt)
  for b, (row, p) in enumerate(tokenized):
    loss_mask_bt[b, p - 1:len(row) - 1] = 1

  def loss_fn(lora):
    logits = models.apply(config, base, ids_bt, mask_bt, lora=lora)[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids_bt[:, 1:])
    return (nll * loss_mask_bt[:, :-1]).sum() / loss_mask_bt.sum()

  lora = models.init_lora(config, jax.random.key(0))
  tx = optax.adam(1e-2)
  opt_state = tx.init(lora)
  step = jax.jit(lambda lora, opt: (lambda g: (optax.apply_updates(lora, tx.update(g, opt)[0]), tx.update(g, opt)[1]))(
      jax.grad(loss_fn)(lora)))
  trie = ev.catalogue_trie(tokenizer, prep.titles, prompt)
  prompt_ids, prompt_mask = pad_rows(tokenization.text_rows(config, tokenizer, [p for p, _ in pairs], 512), tokenizer.pad_id,
                                     "left")
  exclude = metrics.exclusion_mask(excluded, len(prep.titles))
  end = ev.response_end(tokenizer, prompt)
  rank = lambda lora: np.asarray(models.constrained_beam_search(config, base, prompt_ids, prompt_mask, trie, exclude,
                                                                num_beams=5, eos_id=end, lora=lora)[0])
  assert (rank(lora)[:, 0] != target).any()
  for _ in range(60):
    lora, opt_state = step(lora, opt_state)
  assert float(loss_fn(lora)) < 0.3  # from ~6.6
  np.testing.assert_array_equal(rank(lora)[:, 0], target)
  exclude[:, target] = True  # excluded, the tuned title never appears, and the other beams are still items
  ranked = rank(lora)
  assert (ranked != target).all() and (ranked >= 0).all()


@pytest.mark.parametrize("model", ["tiny-llama", pytest.param("smollm2-135m", marks=pytest.mark.slow)])
def test_sequence_chunks_tokenize_as_the_trie(setup, model):
  """A training chunk's response lines, encoded together, are its titles' trie sequences end to end, so
  constrained decoding searches exactly the sequences training taught."""
  tokenizer = setup[3]
  if model != "tiny-llama":
    try:
      tokenizer = models.load(model)[2]
    except FileNotFoundError as e:  # the weights package is optional
      pytest.skip(str(e))
  prep = dataclasses.replace(setup[0], prompt="sequence")
  starts = pipeline.sequence_chunk_starts(prep)[0][:20]
  end = ev.response_end(tokenizer, "sequence")
  trie_rows = {t: tokenizer.encode(examples.title_line(t)) for t in prep.titles}
  assert all(row[-1] == end and end not in row[:-1] for row in trie_rows.values())
  ex = pipeline.tokenize_clients([prep.sequence_prompts(0, starts)], tokenizer, cutoff=4096)[0]
  for n, (u, start) in enumerate(starts):
    _, targets = examples.sequence_chunk(prep.split.train[u], start, prep.split.history_len)
    response = ex.tokens[ex.offsets[n] + ex.loss_start[n]:ex.offsets[n + 1]].tolist()
    assert response == [i for t in targets for i in trie_rows[prep.titles[t]]] + [tokenizer.eos_id]


def test_baselines_schema_and_popularity_beats_random(setup):
  prep = setup[0]
  pop = ev.popularity_baseline(prep, "test", ks=(5, 10))
  rnd = ev.random_baseline(prep, "test", ks=(5, 10))
  _check_schema(pop, prep, "test")
  _check_schema(rnd, prep, "test")
  assert pop["overall"]["recall@10"] > rnd["overall"]["recall@10"]


def test_encoder_discriminative(setup):
  prep = setup[0]
  config, base, tokenizer = models.load("tiny-bert", corpus=list(prep.titles), num_layers=1,
                                        lora=models.LoraConfig(rank=2))
  rows = tokenization.text_rows(config, tokenizer, ["x" * 600], 32)
  assert len(rows[0]) <= 32 and rows[0][0] == tokenizer.backend.token_to_id("[CLS]")
  lora_c = jax.tree.map(lambda x: np.stack([x] * C), models.init_lora(config, jax.random.key(0)))
  result = ev.evaluate_discriminative(config, base, tokenizer, lora_c, prep, "test", ks=(5, 10), max_users=3)
  assert [c["test_users"] for c in result["clients"]] == [3, 3]


def _oracle_rankers(prep, part):
  """Rankers that know each evaluated user's targets from the user's history row: an oracle that ranks them
  first, and its reverse that ranks them after every other candidate."""
  target_of = {}
  for c in range(C):
    windows, targets = prep.eval_examples(c, part)
    for h, m, t in zip(windows.history, windows.history_mask, targets):
      target_of[tuple(h[m > 0])] = t

  def ranker(reverse):
    def rank(ids_bt, mask_bt, exclude_bi):
      scores = np.zeros(exclude_bi.shape)
      for b, (ids, mask) in enumerate(zip(ids_bt, mask_bt)):
        scores[b, target_of[tuple(ids[mask > 0])]] = -1.0 if reverse else 1.0  # all of the user's targets
      ranked, _ = metrics.top_k(scores, exclude_bi, exclude_bi.shape[1])
      return np.asarray(ranked)
    return lambda lora: rank
  return ranker


@pytest.mark.parametrize("part", ["valid", "test"])
def test_discriminative_evaluation_oracle_and_reversed_controls(setup, part):
  """Positive control: scores that put each user's targets first give recall = hr = ndcg = 1 through the
  evaluation's batching, padding and exclusions (recall at K >= the most targets of a user). Negative
  control: the same scores reversed give 0 at every K below the number of other candidates."""
  prep, config = setup[0], dataclasses.replace(setup[1], causal=True)
  ranker = _oracle_rankers(prep, part)
  run = lambda reverse: ev._evaluate(config, setup[3], None, prep, part, ks=(1, 5, 10), batch_size=4,
                                     max_users=None, max_prompt_len=64, ranker=ranker(reverse), item_inputs=True)
  best, worst = run(False)["overall"], run(True)["overall"]
  targets = prep.split.valid_targets if part == "valid" else prep.split.test_targets
  assert max(len(targets[u]) for u in range(len(targets))) <= 5 < len(prep.titles) - 20  # so K=5, 10 can be exact
  assert all(best[m] == 1.0 for m in metrics.metric_names((1, 5, 10)) if m != "recall@1")
  assert all(worst[m] == 0.0 for m in metrics.metric_names((1, 5, 10)))
  # the same controls through the reference-row path (score(users, histories) -> [U, I])
  oracle = lambda users, _: np.stack([np.isin(np.arange(len(prep.titles)), targets[u]) for u in users]).astype(float)
  assert ev.score_baseline(prep, part, oracle, (1, 10))["overall"]["ndcg@10"] == 1.0
  assert ev.score_baseline(prep, part, lambda u, h: -oracle(u, h), (1, 10))["overall"]["hr@10"] == 0.0

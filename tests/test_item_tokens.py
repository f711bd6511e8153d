"""Item-as-token discriminative training: chunks, the causal encoder, the trainable item table through the
real split, and training that raises the validation ranking metric."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from fellrec_jax.data import pipeline, tokenization
from federated import client, losses, representations

I, D, B, T = 30, 32, 3, 6
# Jitted once per spec: eager op-by-op dispatch of these scans and vjps is what makes a test slow.
split_value_and_grad = jax.jit(client.split_value_and_grad, static_argnums=(0, 5))
unsplit_value_and_grad = jax.jit(client.unsplit_value_and_grad, static_argnums=(0, 5))
apply = jax.jit(models.apply, static_argnames="config")


def _setup(num_layers=4, items="table"):
  config = models.tiny_bert(vocab_size=64, hidden_size=D, num_layers=num_layers, num_heads=2, num_kv_heads=2,
                            head_dim=16, intermediate_size=48, causal=True,
                            lora=models.LoraConfig(rank=4, dropout=0.0, targets=("q", "v", "up")))
  base = models.init_params(config, jax.random.key(0))
  lora = models.init_lora(config, jax.random.key(1))
  lora = jax.tree.map(lambda x: x + 0.02, lora)  # B != 0, so every adapter gets a gradient
  frozen = jax.random.normal(jax.random.key(2), (I, D))
  base["items"] = {"input_id": jax.random.normal(jax.random.key(3), (I, D)), "table_id": frozen}
  lora["items"] = ({"table_id": frozen + 0.1} if items.startswith("table") else
                   {"u_ir": jax.random.normal(jax.random.key(4), (I, 3)), "v_rd": jnp.full((3, D), 0.05)})
  if items.endswith("+ids"):  # item-ID embeddings added where the client tail starts
    lora["items"]["embed_id"] = 0.1 * jax.random.normal(jax.random.key(5), (I, D))
  rng = np.random.default_rng(0)
  mask = (np.arange(T) >= np.asarray([[0], [2], [4]])).astype(np.int32)
  batch = {"input_ids": jnp.asarray(rng.integers(0, I, (B, T)) * mask, jnp.int32), "attention_mask": jnp.asarray(mask),
           "target": jnp.asarray(rng.integers(0, I, (B, T)) * mask, jnp.int32),
           "example_mask": jnp.asarray([1, 1, 0], jnp.int32)}
  return config, base, lora, batch


def test_sequence_chunks_train_every_position_once():
  seqs = [np.arange(10, 17), np.asarray([3, 4]), np.asarray([5])]
  ex = pipeline.sequence_chunks(seqs, seq_len=4)
  pairs = sorted((int(i), int(t)) for ids, m, tg in zip(ex.input_ids, ex.attention_mask, ex.target)
                 for i, t in zip(ids[m > 0], tg[m > 0]))
  want = sorted((int(s[j - 1]), int(s[j])) for s in seqs for j in range(1, len(s)))
  assert pairs == want
  # Rows are left-padded, the most recent pair in the last column; the newest chunk ends the sequence.
  np.testing.assert_array_equal(ex.input_ids[0], [12, 13, 14, 15])
  np.testing.assert_array_equal(ex.target[0], [13, 14, 15, 16])
  np.testing.assert_array_equal(ex.attention_mask[1], [0, 0, 1, 1])
  assert len(ex) == 3 and ex.seq_len == 4


def test_causal_encoder_positions_ignore_later_items():
  config, base, lora, batch = _setup()
  params = models.item_token_params(base, base["items"]["input_id"])
  ids = batch["input_ids"][:1]
  changed = ids.at[0, -1].set((ids[0, -1] + 1) % I)
  h = apply(config, params, ids, lora=lora)
  h2 = apply(config, params, changed, lora=lora)
  np.testing.assert_allclose(h[:, :-1], h2[:, :-1], rtol=1e-5, atol=1e-6)
  assert not np.allclose(h[:, -1], h2[:, -1])
  bidirectional = dataclasses.replace(config, causal=False)
  assert not np.allclose(apply(bidirectional, params, ids)[:, 0], apply(bidirectional, params, changed)[:, 0])


@pytest.mark.parametrize("k,items", [(1, "table"), pytest.param(3, "table+ids", marks=pytest.mark.slow),
                                     pytest.param(2, "lowrank", marks=pytest.mark.slow)])
def test_split_with_a_trainable_item_table_equals_the_unsplit_model(k, items):
  """Frozen item vectors feed the client head; the trainable table (whole, or a low-rank correction of the
  frozen one) scores on the client tail, and item-ID embeddings (`+ids`) join before the last block. Loss and every gradient equal the unsplit model's; with the head's
  activations given (`head_act`, `--cache_head`) the server and tail see the same."""
  config, base, lora, batch = _setup(items=items)
  loss_fn = losses.discriminative_loss(config, temperature=0.1)
  spec = dict(hidden=True, item_side="table", item_tokens=True)
  ref = unsplit_value_and_grad(client.LocalSpec(config, **spec), base, lora, batch, None, loss_fn)
  got = split_value_and_grad(client.LocalSpec(config, split_k=k, **spec), base, lora, batch, None, loss_fn)
  assert float(ref[1]) == float(batch["attention_mask"][:2].sum())  # real positions of real examples
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  assert jax.tree.structure(got[2]) == jax.tree.structure(ref[2])
  for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(ref[2]["items"]))
  assert got[3]["up"] > 0 and got[3]["down"] > 0
  head = models.split(config, base, k)[0]
  cached = dict(batch, head_act=models.client_head(config, models.item_token_params(head, base["items"]["input_id"]),
                                                   batch["input_ids"], batch["attention_mask"]))
  frozen_head = dict(lora, blocks=jax.tree.map(lambda x: x.at[:k].set(0.0), lora["blocks"]))  # cached blocks: no adapters
  want = split_value_and_grad(client.LocalSpec(config, split_k=k, **spec), base, frozen_head, batch, None, loss_fn)
  got = split_value_and_grad(client.LocalSpec(config, split_k=k, **spec), base, frozen_head, cached, None, loss_fn)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  # nothing below the cut trains: the server sends its activations down, and no gradient
  assert got[3]["up"] == want[3]["up"] and got[3]["down"] == want[3]["down"] / 2
  for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=1e-6)


def test_position_loss_equals_a_numpy_softmax_over_cosine_scores():
  config, base, lora, batch = _setup()
  table = np.asarray(lora["items"]["table_id"], np.float64)
  h = np.asarray(apply(config, models.item_token_params(base, base["items"]["input_id"]), batch["input_ids"],
                              batch["attention_mask"], lora=lora, hidden=True), np.float64)
  loss_sum, count = losses.discriminative_loss(config, temperature=0.1)(jnp.asarray(h), batch, lora["items"]["table_id"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = unit(h) @ unit(table).T / 0.1
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = -np.take_along_axis(logp, np.asarray(batch["target"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["attention_mask"]) * np.asarray(batch["example_mask"])[:, None]
  np.testing.assert_allclose(float(loss_sum), (nll * mask).sum(), rtol=1e-5)
  assert float(count) == mask.sum()


def test_encoder_item_side_trains_against_the_vectors_evaluation_ranks_by():
  """`item_side="encoder"`: the item vectors of a local round are the titles encoded under the client's
  adapters exactly as the evaluation encodes them, and a split client counts their trip across the cut."""
  config, base0, tokenizer = models.load("tiny-bert", corpus=[f"movie {i}" for i in range(40)], num_layers=2,
                                                  lora=models.LoraConfig(rank=2, dropout=0.0))
  titles = [f"movie {i} part {i % 3}" for i in range(12)]
  lora = jax.tree.map(lambda x: x + 0.05, models.init_lora(config, jax.random.key(0)))
  rows = tokenization.text_rows(config, tokenizer, titles, config.max_positions)
  ids, mask = models.tokenizer.pad_rows(rows, tokenizer.pad_id, "right")
  base = dict(base0, items={"title_ids": ids, "title_mask": mask})
  spec = client.LocalSpec(dataclasses.replace(config, causal=True), split_k=1, hidden=True, item_side="encoder",
                          item_tokens=True)
  got = client.with_round_items(spec, base, lora, batch_size=5)["items"]["table_id"]
  want = representations.embed_texts(config, base0, tokenizer, titles, lora=lora)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert client.item_encoding_traffic(spec, base) == ids.size * config.hidden_size * 4
  assert client.item_encoding_traffic(dataclasses.replace(spec, split_k=None), base) == 0


@pytest.mark.slow  # engine rounds with the discriminative loss (~25 s warm)
def test_engine_training_raises_validation_ndcg(tmp_path):
  """Synthetic data, tiny-bert, a trainable table and item-ID embeddings: validation ndcg@10 of the trained
  adapters beats the untrained adapters', and the ranking uses the trained ID embeddings."""
  import engine_worker
  from fellrec_jax.data import prepare_dataset
  from federated import engine, experiment
  cfg = engine_worker.make_config(str(tmp_path), model="tiny-bert", task="discriminative", disc_input="items",
                                  item_side="table", history_len=12, rounds=3, learning_rate=1e-2, batch_size=16,
                                  lora_targets=("q", "v", "up", "down"), split_k=(2,), max_eval_users=None,
                                  warm_start_steps=0, item_ids=True)
  prep, _ = prepare_dataset("synthetic", num_clients=cfg.num_clients, partition="random", seed=cfg.seed,
                            history_len=cfg.history_len, synthetic_kwargs=engine_worker.SYNTHETIC)
  model = experiment.load_model(cfg, list(prep.titles))
  eng = experiment.build_engine(cfg, "fedavg", prep, model)
  untrained = eng.init_state(jax.random.key(cfg.seed))
  before = eng.valid_metric(untrained.lora)
  state, history = engine.run_rounds(eng, cfg.workdir)
  after = eng.valid_metric(state.best_lora)
  weights = [len(w) for w in pipeline.heldout_windows(prep, "valid")]
  assert np.average(after, weights=weights) > np.average(before, weights=weights) + 0.05, (before, after)
  assert "ndcg@10" in history[-1]["valid"] and len(history[-1]["valid"]["ndcg@10"]) == cfg.num_clients
  assert float(jnp.abs(untrained.lora["items"]["embed_id"]).max()) == 0.0  # the text-only model at start
  without_ids = dict(state.best_lora, items=dict(state.best_lora["items"], embed_id=jnp.zeros_like(state.best_lora["items"]["embed_id"])))
  assert not np.allclose(eng.valid_metric(without_ids), after)


def test_cosine_gradient_is_finite_at_a_zero_user():
  """A padded example's mean-pooled user is a zero vector: its masked loss must not turn gradients NaN."""
  items = jax.random.normal(jax.random.key(0), (5, 4))
  users = jnp.zeros((2, 4)).at[0].set(jnp.arange(1.0, 5.0))
  mask = jnp.asarray([1.0, 0.0])
  loss = lambda u, it: jnp.sum(losses.cosine_scores(u, it)[:, 0] * mask)
  grads = jax.grad(loss, argnums=(0, 1))(users, items)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_allclose(losses.cosine_scores(users, items)[0],
                             np.asarray(items) @ np.arange(1.0, 5.0) / np.linalg.norm(items, axis=1) / np.linalg.norm(np.arange(1.0, 5.0)),
                             rtol=1e-5)

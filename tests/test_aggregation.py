"""FELLRec / FedAvg aggregation against a plain NumPy transcription of the released code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import federated  # the package exports the strategies (`from federated import fellrec_aggregate`)
from federated import strategies


def released_get_aggregate_lora_weight(client_vectors, train_loss, epoch, alpha, beta, variant, compared=None):
  """Transcribes BigRec_FELLRec/utils.py: warm weights, cosine similarity, weighted average.

  `compared` (our "update" similarity) replaces the vectors the cosine is taken of; the average is
  still of `client_vectors`."""
  x = np.asarray(train_loss, np.float64) / 0.05
  e = np.exp(x - x.max())
  train_loss = e / e.sum()
  if variant == "code":
    warm_weight = [math.tanh(alpha / (train_loss[i] ** (epoch + 1 / beta))) for i in range(len(train_loss))]
  else:
    warm_weight = [math.tanh(alpha / (train_loss[i] ** ((epoch + 1) / beta))) for i in range(len(train_loss))]
  v = np.stack(client_vectors).astype(np.float64)
  c = v if compared is None else np.stack(compared).astype(np.float64)
  unit = c / np.linalg.norm(c, axis=1, keepdims=True)
  sim = (unit @ unit.T + 1) / 2
  if variant == "paper" or beta != 1:
    for i in range(len(sim)):
      for j in range(len(sim)):
        if i != j:
          sim[i][j] *= warm_weight[i]
  return [sum(sim[i][j] * v[j] for j in range(len(v))) / sim[i].sum() for i in range(len(v))]


def _random_stack(rng, c):
  return {"blocks": {"q": {"a_ir": rng.normal(size=(c, 3, 6, 2)), "b_ro": rng.normal(size=(c, 3, 2, 5))},
                     "v": {"a_ir": rng.normal(size=(c, 3, 6, 2)), "b_ro": rng.normal(size=(c, 3, 2, 5))}}}


def _flatten(tree, i):
  return np.concatenate([np.asarray(x[i]).ravel() for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("beta", [1.0, 5.0])
@pytest.mark.parametrize("epoch", [0, 3])
def test_fellrec_matches_released_numpy(variant, beta, epoch):
  rng = np.random.default_rng(int(beta * 10 + epoch))
  c = 5
  stacked = _random_stack(rng, c)
  losses = np.array([2.07, 2.08, 2.21, 1.94, 2.06]) + rng.normal(scale=0.02, size=c)
  expected = released_get_aggregate_lora_weight([_flatten(stacked, i) for i in range(c)], losses, epoch,
                                                0.7, beta, variant)
  stacked32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stacked)
  got = jax.jit(federated.fellrec_aggregate, static_argnames=("alpha", "beta", "temperature", "variant"))(
      stacked32, jnp.asarray(losses, jnp.float32), epoch, alpha=0.7, beta=beta, variant=variant)
  for i in range(c):
    np.testing.assert_allclose(_flatten(got, i), expected[i], rtol=1e-5, atol=1e-5)
  # The engine's strategy object: the same aggregate, and the similarity it logs from the same pass.
  strategy = strategies.make_strategy("fellrec", fellrec_beta=beta, fellrec_variant=variant)
  mixed, info = jax.jit(strategy.aggregate)(stacked32, jnp.asarray(losses, jnp.float32), jnp.ones(c), None,
                                            epoch, stacked32)
  for i in range(c):
    np.testing.assert_allclose(_flatten(mixed, i), expected[i], rtol=1e-5, atol=1e-5)
  v = np.stack([_flatten(stacked, i) for i in range(c)])
  unit = v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(info["similarity"], (unit @ unit.T + 1) / 2, rtol=1e-5, atol=1e-6)
  assert info["warm_weights"].shape == (c,)


def test_round_info_logs_large_matrices_as_summaries():
  from federated import engine
  small = engine.round_info({"similarity": np.eye(3), "warm_weights": np.ones(3)})
  assert small == {"similarity": np.eye(3).tolist(), "warm_weights": [1.0, 1.0, 1.0]}
  n = engine.MAX_LOGGED_MATRIX + 1
  big = np.full((n, n), 0.5) + np.eye(n) * 0.5
  big[0, 1] = 0.25
  got = engine.round_info({"similarity": big})
  assert set(got) == {"similarity_offdiag"}
  assert got["similarity_offdiag"]["min"] == 0.25 and got["similarity_offdiag"]["max"] == 0.5
  np.testing.assert_allclose(got["similarity_offdiag"]["mean"], 0.5 - 0.25 / (n * (n - 1)))


def test_update_similarity_compares_what_clients_learned():
  rng = np.random.default_rng(7)
  stacked, start = _random_stack(rng, 4), _random_stack(rng, 4)
  losses = rng.normal(2.0, 0.05, size=4)
  deltas = [_flatten(stacked, i) - _flatten(start, i) for i in range(4)]
  expected = released_get_aggregate_lora_weight([_flatten(stacked, i) for i in range(4)], losses, 1, 0.7, 5.0,
                                                "paper", compared=deltas)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  got = strategies.fellrec_aggregate(f32(stacked), jnp.asarray(losses, jnp.float32), 1, alpha=0.7, beta=5.0,
                                     variant="paper", reference=f32(start))
  for i in range(4):
    np.testing.assert_allclose(_flatten(got, i), expected[i], rtol=1e-5, atol=1e-5)


def test_warm_weights_heat_up_and_slow_clients_heat_slower():
  losses = jnp.array([2.07, 2.08, 2.21, 1.94, 2.06])
  w0 = strategies.warm_weights(losses, 0, alpha=0.7, beta=5.0)
  w5 = strategies.warm_weights(losses, 5, alpha=0.7, beta=5.0)
  assert bool(jnp.all(w5 >= w0))
  assert int(jnp.argmin(w0)) == 2  # the highest-loss client leans most on its own parameters


def test_fedavg_is_example_weighted_mean_for_everyone():
  rng = np.random.default_rng(0)
  stacked = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
  counts = jnp.array([1.0, 2.0, 5.0])
  got = strategies.fedavg_aggregate(stacked, counts)
  expected = (np.asarray(stacked["w"]) * np.array([1, 2, 5])[:, None]).sum(0) / 8
  np.testing.assert_allclose(np.asarray(got["w"]), np.broadcast_to(expected, (3, 4)), rtol=1e-6)


def test_partial_participation():
  """FELLRec: absent clients keep their parameters; FedAvg: everyone gets the participants' mean."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(4, 3))
  stacked = {"w": jnp.asarray(w, jnp.float32)}
  participating = jnp.array([True, False, True, True])
  fel = np.asarray(strategies.fellrec_aggregate(stacked, jnp.ones(4), 1, alpha=0.7, beta=5.0,
                                                participating=participating)["w"])
  np.testing.assert_allclose(fel[1], w[1], rtol=1e-6)
  assert not np.allclose(fel[0], w[0])
  avg = np.asarray(strategies.fedavg_aggregate(stacked, jnp.ones(4), participating)["w"])
  np.testing.assert_allclose(avg, np.broadcast_to(w[[0, 2, 3]].mean(0), (4, 3)), rtol=1e-5)


def test_item_table_rows_follow_the_clients_that_trained_them():
  """FedAvg and FELLRec with item counts: each table row is mixed with `a_ij (n_jr + prior)`, a plain
  NumPy transcription; adapters mix as before; FELLRec's similarity ignores the table."""
  rng = np.random.default_rng(2)
  c, items, d = 3, 5, 4
  adapters = rng.normal(size=(c, 6))
  table = rng.normal(size=(c, items, d))
  counts = rng.integers(0, 4, size=(c, items)).astype(np.float64)
  counts[:, 0] = 0  # an item no client trained on: plain client weights
  counts[:, 1] = [7, 0, 0]  # an item only client 0 trained on: its row everywhere
  stacked = {"blocks": {"w": jnp.asarray(adapters, jnp.float32)},
             "items": {"table_id": jnp.asarray(table, jnp.float32)}}
  weights = np.array([1.0, 2.0, 5.0])

  def rows_numpy(a):
    out = np.zeros_like(table)
    for i in range(c):
      for r in range(items):
        w = a[i] * (counts[:, r] + strategies.ITEM_COUNT_PRIOR)
        out[i, r] = (w[:, None] * table[:, r]).sum(0) / w.sum()
    return out

  avg = strategies.fedavg_aggregate(stacked, jnp.asarray(weights), item_counts_ci=jnp.asarray(counts))
  expected = rows_numpy(np.broadcast_to(weights, (c, c)))
  np.testing.assert_allclose(np.asarray(avg["items"]["table_id"]), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(avg["items"]["table_id"][:, 1]), np.broadcast_to(table[0, 1], (c, d)),
                             atol=1e-2)  # the others' prior weight: ~1e-3 of client 0's
  np.testing.assert_allclose(np.asarray(avg["items"]["table_id"][:, 0]),
                             np.broadcast_to((weights[:, None] * table[:, 0]).sum(0) / weights.sum(), (c, d)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(avg["blocks"]["w"]),
                             np.broadcast_to((weights[:, None] * adapters).sum(0) / weights.sum(), (c, 6)), rtol=1e-5)

  losses = jnp.asarray([2.0, 2.1, 1.9])
  a, s, _ = strategies.fellrec_weights(stacked, losses, 2, alpha=0.7, beta=5.0)
  a_adapters, s_adapters, _ = strategies.fellrec_weights({"blocks": stacked["blocks"]}, losses, 2, alpha=0.7, beta=5.0)
  np.testing.assert_allclose(np.asarray(s), np.asarray(s_adapters), rtol=1e-6)
  fel = strategies.fellrec_aggregate(stacked, losses, 2, alpha=0.7, beta=5.0, item_counts=jnp.asarray(counts))
  np.testing.assert_allclose(np.asarray(fel["items"]["table_id"]), rows_numpy(np.asarray(a, np.float64)),
                             rtol=1e-5, atol=1e-6)


def test_engine_server_step_private_tail_and_item_rows_match_numpy():
  """`Engine.aggregate` with `--server_lr=2 --fellrec_private_tail` and an item table mixed by rows: the
  shared adapters move to `anchor + 2 (mean - anchor)`, the tail block's adapters stay the client's own,
  each table row follows the clients' counts of that item (then the same server step)."""
  import dataclasses
  from test_memory import SMALL, make_engine
  eng = make_engine(**SMALL)
  c, items, d = eng.num_clients, 7, 3
  eng.cfg = dataclasses.replace(eng.cfg, server_lr=2.0, fellrec_private_tail=True)
  rng = np.random.default_rng(3)
  eng.item_counts = rng.integers(0, 3, size=(c, items)).astype(np.float32)
  state = eng.init_state(jax.random.key(0))
  draw = lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  lora = dict(jax.tree.map(draw, state.lora), items={"table_id": jnp.asarray(rng.normal(size=(c, items, d)), jnp.float32)})
  anchor = jax.tree.map(draw, lora)
  new, _ = eng.aggregate(state.replace(lora=lora), np.ones(c), np.ones(c, bool), 0, anchor)

  w = eng.train_counts.astype(np.float64)
  last = eng.model_config.num_layers - 1
  for got, x, a in zip(jax.tree.leaves(new.lora["blocks"]), jax.tree.leaves(lora["blocks"]), jax.tree.leaves(anchor["blocks"])):
    x, a = np.asarray(x, np.float64), np.asarray(a, np.float64)
    mean = np.tensordot(w / w.sum(), x[:, :last], axes=1)
    np.testing.assert_allclose(np.asarray(got)[:, :last], a[:, :last] + 2.0 * (mean[None] - a[:, :last]), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[:, last:], x[:, last:])
  table, start = np.asarray(lora["items"]["table_id"], np.float64), np.asarray(anchor["items"]["table_id"], np.float64)
  n = np.asarray(eng.item_counts, np.float64) + strategies.ITEM_COUNT_PRIOR
  rows = np.einsum("jr,jrd->rd", w[:, None] * n, table) / (w[:, None] * n).sum(0)[:, None]
  np.testing.assert_allclose(np.asarray(new.lora["items"]["table_id"]), start + 2.0 * (rows[None] - start), rtol=1e-4, atol=1e-5)

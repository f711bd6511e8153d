"""The engine's other strategies and loop features, each run for 1-2 rounds of the tiny config.

"Learns" compares the validation loss after the run with that of the starting adapters (B = 0: the
warm-started base model), evaluated by the same engine.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine_worker
from fellrec_jax import sharding
from fellrec_jax.data import pipeline
from federated import client
from federated import engine as engine_lib

pytestmark = pytest.mark.slow  # each test runs the engine end to end (about a minute per run on 2 cores)


def _host(tree):
  return jax.tree.map(np.asarray, sharding.to_host(tree))


def _run(tmp_path, name, strategy, record=False, **overrides):
  """`(state, history, engine, extra)`; `extra` holds the starting state's validation loss, the starting
  adapters, and with `record` the adapters after every round's aggregation (as validation receives them)."""
  cfg = engine_worker.make_config(str(tmp_path / name), **overrides)
  extra = {"rounds": []}

  def before(eng, prep, model):
    extra.update(prep=prep, model=model)
    start = eng.init_state(jax.random.key(cfg.seed))
    extra["init_lora"] = _host(start.lora)
    extra["init_valid"] = eng.validate(start)[1]["loss"]
    if record:
      real = eng.validate

      def validate(state):
        extra["rounds"].append(_host(state.lora))
        return real(state)
      eng.validate = validate

  state, history, eng = engine_worker.run(cfg, strategy, before=before)
  return state, history, eng, extra


def _mean_valid(eng, losses):
  return float(np.average(np.asarray(losses), weights=np.maximum(eng.valid_counts, 1e-9)))


def _client(tree, c):
  return jax.tree.map(lambda x: np.asarray(x)[c], tree)


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _sub(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def _norm(a):
  return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(a))))


def _learns(eng, history, extra):
  """The mean validation loss after the run is below the starting adapters' by more than 0.05 nats: the
  validation batches are fixed and the pass deterministic, so there is no evaluation jitter to clear, and
  0.05 asks for a real improvement, not a float-noise one (~1e-6). Returns the drop."""
  before, after = _mean_valid(eng, extra["init_valid"]), history[-1]["valid"]["mean_loss"]
  assert after < before - 0.05, (before, after)
  return before - after


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("local"), "local", "local", rounds=1)


def test_local_clients_learn_and_never_exchange_parameters(local_run):
  """Each client's adapter after the round is what training that client alone (one unbatched local
  update on its own batches, its own key) gives: nothing of the other clients reaches it."""
  state, history, eng, extra = local_run
  _learns(eng, history, extra)
  cfg = eng.cfg
  # the round's data, drawn as the loop draws it: lockstep micro-batches from the run's seed
  batch_iter = pipeline.iterate(eng.train_examples, batch_size=cfg.batch_size,
                                state={"seed": cfg.seed, "epoch": 0, "step": 0})
  batches = engine_lib.round_batches(batch_iter, eng.micro_per_round, cfg.grad_accum, np.ones(eng.num_clients, bool))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), 0), eng.num_clients)
  alone = jax.jit(client.make_local_update(eng.spec(eng.cuts[0]), eng.tx, None, eng.loss_fn))
  init = extra["init_lora"]
  got = _host(state.lora)
  for c in range(eng.num_clients):
    lora_c = _client(init, c)
    trained, _, _ = alone(eng.base, lora_c, eng.tx.init(lora_c), _client(batches, c), keys[c])
    update = _norm(_sub(_client(got, c), _client(init, c)))
    # vmapped over 3 clients vs unbatched: fp32 reassociation, which Adam's normalisation amplifies to
    # ~1e-4 on entries whose gradients are near zero (as in test_engine); 1% of the round's update is far
    # below what any mixing in of another client's update (O(the update)) would leave
    assert _norm(_sub(_client(got, c), trained)) < 1e-2 * update, c
    # the control: another client's adapters are O(the update) away, so the check above can fail
    assert _norm(_sub(_client(got, (c + 1) % eng.num_clients), trained)) > 0.3 * update, c


def test_private_tail_keeps_the_tail_adapters_unmixed(tmp_path, local_run):
  """FELLRec with --fellrec_private_tail for one round: the last (client-tail) block's adapters equal the
  local (never-mixed) run's, which trained identically; the other blocks were mixed, so they differ."""
  local = local_run[0]
  state, history, eng, extra = _run(tmp_path, "tail", "fellrec", rounds=1, fellrec_private_tail=True)
  _learns(eng, history, extra)
  last = eng.model_config.num_layers - 1
  got, ref = _host(state.lora)["blocks"], _host(local.lora)["blocks"]
  tail = lambda t: jax.tree.map(lambda x: x[:, last:], t)
  shared = lambda t: jax.tree.map(lambda x: x[:, :last], t)
  delta = _sub(ref, _host(extra["init_lora"])["blocks"])
  update = _norm(delta)
  # the same program on the same data and keys: equal up to fp32 (1% of the round's update, see above)
  assert _norm(_sub(tail(got), tail(ref))) < 1e-2 * _norm(tail(delta))
  # mixing with similarity weights in [0, 1] moves the shared blocks by O(the clients' differences)
  assert _norm(_sub(shared(got), shared(ref))) > 0.1 * update


def test_fedprox_learns_and_a_huge_mu_stays_at_the_anchor(tmp_path):
  state, history, eng, extra = _run(tmp_path, "prox", "fedprox", rounds=1)
  _learns(eng, history, extra)
  moved = _norm(_sub(_host(state.lora), extra["init_lora"]))
  pinned, _, _, extra_pinned = _run(tmp_path, "prox_pinned", "fedprox", rounds=1, fedprox_mu=1e6)
  stayed = _norm(_sub(_host(pinned.lora), extra_pinned["init_lora"]))
  # mu = 1e6: one Adam step away from the anchor makes the proximal gradient dominate the loss's, so each
  # entry oscillates within ~lr of the anchor, while mu = 0.01 lets 13 steps of ~lr accumulate
  assert stayed < 0.5 * moved, (stayed, moved)
  assert moved > 0


def test_centralized_trains_one_client_on_every_example(tmp_path, local_run):
  _, _, eng_local, _ = local_run
  state, history, eng, extra = _run(tmp_path, "central", "centralized", rounds=1)
  _learns(eng, history, extra)
  assert eng.num_clients == 1 and len(eng.train_examples) == 1
  assert all(x.shape[0] == 1 for x in jax.tree.leaves(state.lora))
  assert len(eng.train_examples[0]) == sum(len(ex) for ex in eng_local.train_examples)  # the union of clients'


def test_partial_participation_leaves_absent_clients_unchanged(tmp_path):
  """FELLRec with 2 of 3 clients per round: an absent client's adapters after the round's aggregation
  are exactly its adapters before the round; every participant's changed."""
  state, history, eng, extra = _run(tmp_path, "partial", "fellrec", record=True, rounds=2, clients_per_round=2)
  before = [extra["init_lora"]] + extra["rounds"][:-1]
  for r, (log, prev, now) in enumerate(zip(history, before, extra["rounds"])):
    part = np.asarray(log["participating"])
    np.testing.assert_array_equal(part, eng.participants(r))
    assert part.sum() == 2
    for c in range(eng.num_clients):
      diff = _max_diff(_client(now, c), _client(prev, c))
      if part[c]:
        assert diff > 1e-4, (r, c, diff)  # trained and mixed
      else:
        assert diff == 0.0, (r, c, diff)  # neither trained nor mixed in: bit-identical


def test_patience_stops_early_and_best_adapter_is_the_best_rounds(tmp_path):
  """Validation losses scripted per round (through the engine's held-out loss) so the best round differs
  per client and the mean stops improving after round 1: with patience 2 the run stops after round 3
  of 6, and each client's returned best adapter is its adapters from its own best round."""
  script = np.asarray([[3.0, 3.0, 3.0],   # round 0
                       [2.0, 2.6, 2.0],   # round 1: best mean; best for clients 0 and 2
                       [2.5, 2.2, 2.9],   # round 2: best for client 1, mean worse than round 1
                       [2.4, 2.5, 2.8],   # round 3: mean worse again -> 2 bad evaluations -> stop
                       [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], np.float32)  # never reached

  recorded = []

  def before(eng, prep, model):
    real_heldout, real_validate = eng._heldout, eng.validate

    def heldout(base, lora, batches):  # the real held-out pass runs; its losses are replaced by the script's
      _, count = real_heldout(base, lora, batches)
      return jnp.asarray(script[len(recorded) - 1]), count

    def validate(state):
      recorded.append(_host(state.lora))
      return real_validate(state)
    heldout.lower = real_heldout.lower  # the memory check compiles the real held-out program
    eng._heldout, eng.validate = heldout, validate

  cfg = engine_worker.make_config(str(tmp_path), rounds=6, patience=2, warm_start_steps=0)
  state, history, eng = engine_worker.run(cfg, "fellrec", before=before)
  # the rule, replayed on the scripted means: stop once `patience` evaluations in a row fail to beat the best
  means = [float(np.average(row, weights=np.maximum(eng.valid_counts, 1e-9))) for row in script]
  best, bad, expected_rounds = np.inf, 0, cfg.rounds
  for r, m in enumerate(means):
    bad = 0 if m < best else bad + 1
    best = min(best, m)
    if bad >= cfg.patience:
      expected_rounds = r + 1
      break
  assert expected_rounds < cfg.rounds  # the script does exercise the early stop
  assert len(history) == expected_rounds, [h["valid"]["mean_loss"] for h in history]
  best_round = script[:expected_rounds].argmin(0)
  assert len(set(best_round.tolist())) > 1  # clients' best rounds differ: selection is per client
  got = _host(state.best_lora)
  for c, r in enumerate(best_round):
    assert _max_diff(_client(got, c), _client(recorded[r], c)) == 0.0, (c, r)
    later = [q for q in range(expected_rounds) if q != r]
    assert all(_max_diff(_client(recorded[q], c), _client(recorded[r], c)) > 0 for q in later)
  np.testing.assert_allclose(np.asarray(state.best_valid), script[best_round, np.arange(3)])


@pytest.fixture(scope="module")
def noniid_fedavg(tmp_path_factory):
  return _run(tmp_path_factory.mktemp("fedavg"), "fedavg", "fedavg", rounds=1, partition="kmeans")


def test_large_dp_noise_stops_learning_while_no_noise_learns(tmp_path, noniid_fedavg):
  """Negative control: the same FedAvg round with uploads clipped to 2 and noised with z = 1 (std 2 per
  adapter entry, against updates of ~1e-2 per entry) learns nothing, while the noiseless round learns."""
  clean = _learns(noniid_fedavg[2], noniid_fedavg[1], noniid_fedavg[3])
  state, history, eng, extra = _run(tmp_path, "dp", "fedavg", rounds=1, partition="kmeans", dp_clip=2.0,
                                    dp_noise_multiplier=1.0)
  noisy = _mean_valid(eng, extra["init_valid"]) - history[-1]["valid"]["mean_loss"]
  # "does not fall meaningfully": less than a tenth of the noiseless drop (it is expected to rise)
  assert noisy < 0.1 * clean, (noisy, clean)


def test_fellrec_update_similarity_personalises_where_fedavg_does_not(tmp_path, noniid_fedavg):
  """Non-IID (BPR + k-means) clients: FedAvg gives every client the same adapters; FELLRec mixing by the
  similarity of the round's updates gives each its own (its own update weighs most in its mix)."""
  fedavg = _host(noniid_fedavg[0].lora)
  for c in range(1, noniid_fedavg[2].num_clients):
    assert _max_diff(_client(fedavg, c), _client(fedavg, 0)) == 0.0
  state, history, eng, extra = _run(tmp_path, "fellrec", "fellrec", rounds=1, partition="kmeans",
                                    fellrec_similarity="update")
  lora = _host(state.lora)
  scale = _norm(_sub(lora, extra["init_lora"]))
  for i in range(eng.num_clients):
    for j in range(i):
      # identical would be 0 (as FedAvg); fp32 noise is ~1e-7 of the update. 1e-3 of the whole update's norm
      # is what a mix in which each client's own update weighs at least 1/3 (a_ii = 1, a_ij <= 1) leaves
      diff = _norm(jax.tree.map(np.subtract, _client(lora, i), _client(lora, j)))
      assert diff > 1e-3 * scale, (i, j, diff, scale)
  s = np.asarray(history[0]["similarity"])
  assert s.shape == (3, 3) and not np.allclose(s, 1.0)

"""The server side of the split cannot receive token ids or labels; what it receives is still invertible,
less so the deeper the cut."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from federated import attack, client, experiment, losses
from federated.cut_defense import CutDefense
from fellrec_jax.data import pipeline
from fellrec_jax.config import RunConfig

B, T = 2, 10
WARM_STEPS = 150


def _tiny():
  cfg = dataclasses.replace(models.tiny_llama(vocab_size=97),
                            lora=models.LoraConfig(rank=4, alpha=8, dropout=0.1, targets=("q", "v")))
  base = models.init_params(cfg, jax.random.key(0))
  return cfg, base, models.init_lora(cfg, jax.random.key(1))


def _batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 97, size=(B, T)).astype(np.int32)
  attn = (np.arange(T) < np.asarray([[T], [6]])).astype(np.int32)
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn),
          **dict(zip(("target_index", "target_mask"), map(jnp.asarray, pipeline.targets_from_loss_mask(
              attn * (np.arange(T) >= 3) * (np.arange(T) < T - 1) * np.roll(attn, -1, -1))))),
          "example_mask": jnp.ones((B,), jnp.int32)}


def _server_inputs(monkeypatch, spec, base, lora, batch):
  """Runs the jitted split step of `spec` on concrete values with a spy on `models.server_body`; returns
  what it received."""
  seen = []
  real = models.server_body

  def spy(config, body, act_btd, attention_mask_bt, **kwargs):
    # the split step differentiates through the call: a host callback records the concrete values
    jax.debug.callback(lambda a, m, l: seen.append({"act": np.asarray(a), "mask": np.asarray(m),
                                                    "lora": jax.tree.map(np.asarray, l)}),
                       act_btd, attention_mask_bt, kwargs.get("lora"))
    return real(config, body, act_btd, attention_mask_bt, **kwargs)

  monkeypatch.setattr(models, "server_body", spy)
  step = jax.jit(lambda b, l, x: client.split_value_and_grad(spec, b, l, x, None)[0])
  jax.block_until_ready(step(base, lora, batch))
  jax.effects_barrier()
  monkeypatch.undo()
  assert len(seen) == 1, len(seen)
  return seen[0]


def test_server_receives_the_head_activations_and_nothing_of_the_labels(monkeypatch):
  """Data flow, not names: what the server function is handed equals the client head's output on the ids
  (computed here independently), and is bit-identical when only the labels (target positions, target and
  example masks) change, so nothing the server receives carries them."""
  cfg, base, lora = _tiny()
  batch = _batch()
  cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, dropout=0.0))  # deterministic activations
  spec = client.LocalSpec(cfg, split_k=1)
  got = _server_inputs(monkeypatch, spec, base, lora, batch)
  head, _, _ = models.split(cfg, base, 1)
  lora_head, lora_body, _ = models.split(cfg, lora, 1)
  want = models.client_head(cfg, head, batch["input_ids"], batch["attention_mask"], lora=lora_head)
  np.testing.assert_allclose(got["act"], want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got["mask"], batch["attention_mask"])
  for x, y in zip(jax.tree.leaves(got["lora"]), jax.tree.leaves(lora_body)):  # its own blocks' adapters only
    np.testing.assert_array_equal(x, y)
  # other labels on the same tokens: every target position moved, masks flipped, an example dropped
  relabelled = dict(batch, target_index=(batch["target_index"] + 1) % (T - 1),
                    target_mask=1 - batch["target_mask"], example_mask=batch["example_mask"].at[1].set(0))
  again = _server_inputs(monkeypatch, spec, base, lora, relabelled)
  for key in ("act", "mask"):
    np.testing.assert_array_equal(again[key], got[key])
  # and the ids do reach it (through the activations): the spy would see a change of one token
  changed = dict(batch, input_ids=batch["input_ids"].at[0, 2].set((batch["input_ids"][0, 2] + 1) % 97))
  assert not np.allclose(_server_inputs(monkeypatch, spec, base, lora, changed)["act"][0, 2], got["act"][0, 2])


def test_server_body_rejects_token_ids_as_activations():
  cfg, base, _ = _tiny()
  _, body, _ = models.split(cfg, base, 1)
  batch = _batch()
  # [B, T] ints are not [B, T, D] activations: the first block's `b, t, _ = x_btd.shape` refuses them
  with pytest.raises(ValueError, match=r"not enough values to unpack \(expected 3, got 2\)"):
    models.server_body(cfg, body, batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("server_lora", ["per_client", "frozen"])
def test_split_step_hands_the_server_only_float_activations(monkeypatch, server_lora):
  cfg, base, lora = _tiny()
  batch = _batch()
  seen = []
  real = models.server_body

  def spy(config, body, act_btd, attention_mask_bt, **kwargs):
    seen.append({"body": body, "act": act_btd, "mask": attention_mask_bt, "kwargs": kwargs})
    return real(config, body, act_btd, attention_mask_bt, **kwargs)

  monkeypatch.setattr(models, "server_body", spy)
  spec = client.LocalSpec(cfg, split_k=1, server_lora=server_lora)
  traced = {}

  def step(b, l, x):
    traced.update(x)
    return client.split_value_and_grad(spec, b, l, x, jax.random.key(0))[:3]

  jax.eval_shape(step, base, lora, batch)  # tracing is enough: the spy sees every argument's dtype and shape
  assert seen, "the split step never called the server"
  for call in seen:
    assert set(call["kwargs"]) <= {"lora", "rng"}
    arrays = jax.tree.leaves((call["body"], call["act"], call["kwargs"].get("lora")))
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in arrays), [x.dtype for x in arrays]
    assert call["act"].shape == (B, T, cfg.hidden_size)
    # the one integer array is the padding mask, and it is the batch's attention mask, not its ids
    assert call["mask"] is traced["attention_mask"]
    assert not any(call["mask"] is traced[key] for key in ("input_ids", "target_index", "target_mask", "example_mask"))
    rng = call["kwargs"].get("rng")
    assert rng is None or jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)


def label_recovery_from_loss_inputs(cfg, base, lora, ids, mask, spans, truth=None) -> float:
  """The fraction of response (label) tokens recovered exactly from the arguments the training loss is
  handed in the client tail, i.e. what a server running the tail would hold. The loss positions are the
  response spans; a spy records the loss function's inputs, and the labels are read back from them here
  (the token after each target position), independently of the library's own loss, and compared with
  `truth` (default `ids`) at the spans."""
  truth = ids if truth is None else truth
  loss_mask = np.zeros(ids.shape, np.int32)
  for r, span in enumerate(spans):
    if span is not None:
      loss_mask[r, span[0] - 1:span[1] - 1] = 1  # position t is scored on token t + 1
  tidx, tmask = pipeline.targets_from_loss_mask(loss_mask)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "target_index": jnp.asarray(tidx),
           "target_mask": jnp.asarray(tmask, jnp.int32), "example_mask": jnp.ones((len(ids),), jnp.int32)}
  seen = []

  def spy(outputs, b, items_id):
    seen.append(jax.tree.map(np.asarray, b))
    return losses.generative_loss(outputs, b, items_id)

  client.split_value_and_grad(client.LocalSpec(cfg, split_k=1), base, lora, batch, None, loss_fn=spy)
  assert len(seen) == 1
  got = seen[0]
  hits = []
  for r, span in enumerate(spans):
    if span is None:
      continue
    held = got["input_ids"][r][got["target_index"][r][got["target_mask"][r] > 0] + 1]
    hits.append(held.shape == (span[1] - span[0],) and bool((held == truth[r, span[0]:span[1]]).all()))
  return float(np.mean(hits))


def test_the_tail_loss_is_handed_the_labels():
  """The premise of `tail_offloaded.label_recovery`: the loss's arguments give back every label exactly;
  compared with tokens that are not the labels, the same read-back scores 0 (it can fail)."""
  cfg, base, lora = _tiny()
  b = _batch()
  ids, mask = np.asarray(b["input_ids"]), np.asarray(b["attention_mask"])
  spans = [(4, 9), (4, 6)]  # response tokens [4, 9) of row 0, [4, 6) of row 1 (its 6 real tokens)
  assert label_recovery_from_loss_inputs(cfg, base, lora, ids, mask, spans) == 1.0
  other = ids.copy()
  other[:, 4:9] = (other[:, 4:9] + 1) % 97  # not the labels: the read-back must say so
  assert label_recovery_from_loss_inputs(cfg, base, lora, ids, mask, spans, truth=other) == 0.0


@pytest.fixture(scope="module")
def warm_tiny():
  """tiny-llama warm-started on the synthetic catalogue, as training runs use it (a random-init tiny model
  keeps its input embeddings in the residual stream at every k: nearest-embedding inverts it everywhere)."""
  cfg = RunConfig(partition="random", bpr_steps=10, warm_start_steps=WARM_STEPS)
  prep, _ = experiment.prepare(cfg)
  config, base, tok = experiment.load_model(cfg, list(prep.titles))
  return prep, config, base, tok


@pytest.mark.slow  # trains inverters at 4 cuts (~50 s with a cold compilation cache)
def test_attack_recovers_tokens_at_k0_and_clearly_fewer_deeper(warm_tiny):
  """Thresholds. k=0: the activations are embedding rows, so nearest-embedding inversion is exact (>= 0.99
  leaves room only for duplicate rows). k=L-1=3: nearest embedding collapses (measured ~0.001-0.02 of
  tokens, 0 titles; we require <= 0.2). The learned per-position MLP, trained only on the server's own
  public prompts, still recovers almost everything on this 4-block model (measured >= 0.99 of history
  tokens at every k): we assert it stays >= 0.6, which documents that a shallow cut does not hide titles
  from a learning server, and fail loudly if the attack pipeline regresses."""
  prep, config, base, tok = warm_tiny
  noun = prep.dataset.item_noun
  windows = prep.train.take(np.sort(np.random.default_rng(0).choice(len(prep.train), 80, replace=False)))
  victims = attack.private_prompts(windows, prep.titles, noun, tok)
  public = attack.public_prompts(prep.titles, noun, tok, num=400, history_len=10, seed=1)
  # the recorded spans are the titles' tokens
  a, b = victims.title_spans[0][0]
  assert tok.decode(victims.ids[0, a:b]).strip("\", ") == prep.titles[windows.history[0][windows.history_mask[0] > 0][0]]
  a, b = victims.target_spans[0]
  assert tok.decode(victims.ids[0, a:b]).strip("\", ") == prep.titles[windows.target[0]]
  res = attack.run_attack(config, base, [0, 3], victims, public, inverter_steps=200, inverter_hidden=256)
  near = res["nearest"]
  assert near["token_accuracy"][0] >= 0.99 and near["title_recovery"][0] >= 0.99
  assert res["target_recovery"][0] >= 0.99
  assert near["token_accuracy"][1] <= 0.2 and near["title_recovery"][1] <= 0.2
  assert near["token_accuracy"][1] < near["token_accuracy"][0] - 0.5
  assert res["learned"]["history_token_accuracy"][1] >= 0.6
  # the literal the report writes is what the tail's loss inputs actually give back (measured, not assumed)
  lora = models.init_lora(config, jax.random.key(0))
  held = label_recovery_from_loss_inputs(config, base, lora, victims.ids, victims.mask, victims.target_spans)
  assert res["tail_offloaded"]["label_recovery"] == held


@pytest.mark.slow  # ~20 s on 2 shared cores: two inverters trained
def test_large_cut_noise_holds_the_inverter_under_the_fano_bound(warm_tiny):
  """Per-token clipping to C and noise of per-coordinate std r C / sqrt(D) make each sent token a Gaussian
  channel with power C^2, so what any per-position decoder learns about the token at t is at most its
  capacity, I <= (D / 2) ln(1 + 1 / r^2) nats. Fano's inequality for a prior whose likeliest value has
  probability p_max bounds the accuracy of every decoder by (I + ln 2) / ln(1 / p_max) (the binary
  divergence between the decoder's hit rate and that of one blind to the activations, <= p_max). At r = 16
  on tiny-llama (D = 64) that is (0.125 + 0.693) / ln(1 / p_max), p_max the commonest history-title token's
  share; we allow 3 standard errors for the finite sample. Without noise the same attack at the same cut
  recovers most history-title tokens (the bound is not met trivially)."""
  prep, config, base, tok = warm_tiny
  noun = prep.dataset.item_noun
  windows = prep.train.take(np.sort(np.random.default_rng(0).choice(len(prep.train), 80, replace=False)))
  victims = attack.private_prompts(windows, prep.titles, noun, tok)
  public = attack.public_prompts(prep.titles, noun, tok, num=400, history_len=10, seed=1)
  r, d = 16.0, config.hidden_size
  title_tokens = np.concatenate([victims.ids[row, a:b] for row, spans in enumerate(victims.title_spans)
                                 for a, b in spans])
  p_max = np.bincount(title_tokens).max() / len(title_tokens)
  fano = (d / 2 * np.log1p(1 / r ** 2) + np.log(2)) / np.log(1 / p_max)
  bound = fano + 3 * np.sqrt(fano * (1 - fano) / len(title_tokens))
  kwargs = dict(inverter_steps=200, inverter_hidden=256)
  noised = attack.run_attack(config, base, [1], victims, public, defense=CutDefense(noise=r, clip=1.0), **kwargs)
  clean = attack.run_attack(config, base, [1], victims, public, defense=CutDefense(clip=1.0), **kwargs)
  assert bound < 0.5, bound
  assert clean["learned"]["history_token_accuracy"][0] >= 0.6
  assert noised["learned"]["history_token_accuracy"][0] <= bound
  assert noised["nearest"]["history_token_accuracy"][0] <= bound


@pytest.mark.slow  # three short federated runs and their attacks
def test_attack_curve_trains_and_attacks_each_setting(tmp_path):
  """`--mode=attack --attack_sweep`: a row per setting with the issue's fields, the undefended reference
  first; heavy noise hides the history titles, the private response hides the label, and both files exist."""
  from launch import attack as launch_attack

  cfg = RunConfig(mode="attack", partition="random", bpr_steps=10, warm_start_steps=WARM_STEPS, num_clients=2,
                  rounds=1, max_train_samples=48, max_eval_users=4, batch_size=8, split_k=(1,), baselines=(),
                  max_new_tokens=8, attack_sweep=("cut_noise=16", "private_response=1"), workdir=str(tmp_path))
  result = launch_attack.run(cfg, [1], num_victims=24, num_public=300, inverter_steps=200, inverter_hidden=256)
  rows = result["curve"]
  assert [(r["defense"], r["strength"], r["split_k"]) for r in rows] == [
      ("none", 0.0, 1), ("cut_noise", 16.0, 1), ("private_response", 1.0, 1)]
  fields = {"defense", "strength", "split_k", "inverter_token_recovery", "nearest_token_recovery",
            "title_token_recovery", "label_recovery", "valid_loss", "ndcg@10"}
  assert all(fields <= set(r) and np.isfinite(r["valid_loss"]) for r in rows)
  none, noise, private = rows
  assert none["title_token_recovery"] >= 0.6 and none["label_recovery"] >= 0.5
  assert noise["title_token_recovery"] <= 0.3 and noise["inverter_token_recovery"] < none["inverter_token_recovery"]
  assert private["label_recovery"] == 0.0
  assert json.loads((tmp_path / "attack.json").read_text())["curve"] == json.loads(json.dumps(rows))
  assert (tmp_path / "attack_curve.png").stat().st_size > 0

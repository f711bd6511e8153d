"""Local training: the real split equals the unsplit model; vmapped clients equal a sequential loop."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models
from federated import client
from fellrec_jax.data import pipeline

C, S, A, B, T = 3, 2, 2, 2, 10


def _setup(num_layers=4, dropout=0.0, targets=("q", "v", "down")):
  cfg = models.tiny_llama(vocab_size=97, num_layers=num_layers)
  cfg = dataclasses.replace(cfg, lora=models.LoraConfig(rank=4, alpha=8, dropout=dropout, targets=targets))
  base = models.init_params(cfg, jax.random.key(0))
  lora = models.init_lora(cfg, jax.random.key(1))
  return cfg, base, lora


def _batches(seed, lead=(C, S, A)):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 97, size=(*lead, B, T)).astype(np.int32)
  lengths = rng.integers(4, T + 1, size=(*lead, B))
  attn = (np.arange(T) < lengths[..., None]).astype(np.int32)
  loss_mask = attn * (np.arange(T) >= 2)
  loss_mask = loss_mask * np.roll(attn, -1, axis=-1)
  loss_mask[..., -1] = 0
  example = np.ones((*lead, B), np.float32)
  example[-1, -1] = 0  # the last client ran out of data for its last step
  target_index, target_mask = pipeline.targets_from_loss_mask(loss_mask)
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "target_index": jnp.asarray(target_index),
          "target_mask": jnp.asarray(target_mask), "example_mask": jnp.asarray(example)}


def _stack(tree, n):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def test_loss_at_target_positions_equals_the_full_logits_loss():
  """The head runs only at `target_index`; the loss and grads equal a NumPy cross-entropy over the full
  `[B, T, V]` logits masked by the loss mask the targets came from."""
  cfg, base, lora = _setup()
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  rng = np.random.default_rng(5)
  ids = rng.integers(1, 97, size=(B, T)).astype(np.int32)
  attn = (np.arange(T) < np.asarray([[T], [T - 3], [5], [T - 1]])[:B]).astype(np.int32)
  loss_mask = attn * np.roll(attn, -1, axis=-1) * (np.arange(T) >= np.asarray([[2], [7], [1], [4]])[:B])
  loss_mask[:, -1] = 0
  target_index, target_mask = pipeline.targets_from_loss_mask(loss_mask, num_targets=T - 1)
  assert target_mask.sum() == loss_mask.sum() and target_index.shape == (B, T - 1)
  batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "target_index": jnp.asarray(target_index),
           "target_mask": jnp.asarray(target_mask), "example_mask": jnp.ones((B,), jnp.float32)}
  loss_sum, count, grads, _ = client.unsplit_value_and_grad(client.LocalSpec(cfg), base, lora, batch, None)

  def full_loss(lp):
    logits = np.asarray(models.apply(cfg, base, batch["input_ids"], batch["attention_mask"], lora=lp), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return float((nll * loss_mask[:, :-1]).sum())

  assert float(count) == loss_mask.sum()
  np.testing.assert_allclose(float(loss_sum), full_loss(lora), rtol=1e-5)
  ref_grads = jax.grad(lambda lp: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      models.apply(cfg, base, batch["input_ids"], batch["attention_mask"], lora=lp)[:, :-1], ids[:, 1:])
      * loss_mask[:, :-1]))(lora)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def test_targets_from_loss_mask_refuses_to_drop_targets():
  with pytest.raises(ValueError, match="T-1"):
    pipeline.targets_from_loss_mask(np.asarray([[0, 1, 1]]))
  with pytest.raises(ValueError, match="num_targets=2"):
    pipeline.targets_from_loss_mask(np.asarray([[0, 1, 1, 1, 0]]), num_targets=2)
  index, mask = pipeline.targets_from_loss_mask(np.asarray([[0, 1, 0, 1, 0], [0, 0, 0, 0, 0]]), num_targets=3)
  np.testing.assert_array_equal(index, [[1, 3, 0], [0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 0], [0, 0, 0]])


@pytest.mark.slow  # bf16 and fp32 programs (~16 s cold)
def test_bfloat16_training_tracks_float32():
  """The GPU benchmarks train in bf16 (base stored and computed in bf16, adapters and optimizer in fp32):
  its losses stay within bf16 rounding of fp32 training and its updates point the same way."""
  cfg, base, lora = _setup()
  cfg16 = dataclasses.replace(cfg, param_dtype="bfloat16", compute_dtype="bfloat16")
  base16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
  tx = optax.adam(1e-2)
  batches = jax.tree.map(lambda x: x[0], _batches(2))
  runs = [jax.jit(client.make_local_update(client.LocalSpec(c, split_k=1), tx))(b, lora, tx.init(lora), batches,
                                                                                 jax.random.key(0))
          for c, b in ((cfg, base), (cfg16, base16))]
  (lora32, _, stats32), (lora16, opt16, stats16) = runs
  assert {x.dtype for x in jax.tree.leaves((lora16, opt16)) if x.ndim} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(stats16["loss"], stats32["loss"], rtol=2e-2)
  moved = lambda new: np.concatenate([np.ravel(n - o) for n, o in zip(jax.tree.leaves(new), jax.tree.leaves(lora))])
  a, b = moved(lora16), moved(lora32)
  assert np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.95


def test_split_grads_equal_unsplit_and_traffic_is_counted():
  cfg, base, lora = _setup()
  lora = jax.tree.map(lambda x: x + 0.01, lora)
  batch = jax.tree.map(lambda x: x[0, 0, 0], _batches(0))
  ref = client.unsplit_value_and_grad(client.LocalSpec(cfg), base, lora, batch, None)
  for k in (0, 1, 3):  # the head-only, a middle and the empty-body cut (the model tests cover every k)
    got = client.split_value_and_grad(client.LocalSpec(cfg, split_k=k), base, lora, batch, None)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for g, r in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)
    act_bytes = B * T * cfg.hidden_size * 4
    assert got[3] == {"up": 2 * act_bytes, "down": 2 * act_bytes}


def test_frozen_server_lora_gets_no_gradient():
  cfg, base, lora = _setup()
  batch = jax.tree.map(lambda x: x[0, 0, 0], _batches(1))
  _, _, grads, _ = client.split_value_and_grad(client.LocalSpec(cfg, split_k=1, server_lora="frozen"),
                                               base, jax.tree.map(lambda x: x + 0.01, lora), batch, None)
  b = grads["blocks"]["q"]["b_ro"]
  assert float(jnp.abs(b[1:3]).max()) == 0.0  # server blocks 1..2
  assert float(jnp.abs(b[0]).max()) > 0 and float(jnp.abs(b[3]).max()) > 0


@pytest.mark.parametrize("split_k", [None, 2])
def test_split_training_equals_unsplit_training(split_k):
  cfg, base, lora = _setup()
  tx = optax.adamw(1e-2)
  batches = jax.tree.map(lambda x: x[0], _batches(2))
  rng = jax.random.key(3)
  ref = jax.jit(client.make_local_update(client.LocalSpec(cfg), tx))(base, lora, tx.init(lora), batches, rng)
  got = jax.jit(client.make_local_update(client.LocalSpec(cfg, split_k=split_k), tx))(
      base, lora, tx.init(lora), batches, rng)
  for g, r in zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0])):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(got[0]["blocks"]["q"]["b_ro"]).max()) > 0  # training moved the adapters


def test_vmapped_clients_equal_sequential_loop_and_groups():
  cfg, base, lora = _setup(dropout=0.1)
  # A larger eps keeps Adam from amplifying rounding noise in near-zero first-step gradients of A.
  tx = optax.adamw(1e-2, eps=1e-4)
  update = client.make_local_update(client.LocalSpec(cfg, split_k=1), tx, penalty=lambda p, a: 0.0)
  lora_c = _stack(lora, C)
  opt_c = jax.vmap(tx.init)(lora_c)
  example = np.ones((C, S, A, B), np.float32)
  example[0, -1] = 0  # client 0 ran out of data first: groups of 2 run clients 1 and 2, then 0
  batches = dict(_batches(4), example_mask=jnp.asarray(example))
  rngs = jax.random.split(jax.random.key(5), C)
  vm = jax.jit(client.over_clients(update, "vmap"))(base, lora_c, opt_c, batches, rngs)
  grouped = jax.jit(client.over_clients(update, "vmap", group_size=2))(base, lora_c, opt_c, batches, rngs)
  # one client at a time runs the unbatched update: its all-padding steps are skipped by a real branch
  single = jax.jit(client.over_clients(update, "vmap", group_size=1))(base, lora_c, opt_c, batches, rngs)
  fresh = lambda tree: jax.tree.map(jnp.copy, tree)
  donated = jax.jit(client.over_clients(update, "vmap", group_size=5, shards=3), donate_argnums=(1, 2))(
      base, fresh(lora_c), fresh(opt_c), batches, rngs)  # 3 shards of 1 client; updated in place
  seq = client.over_clients(update, "sequential")(base, lora_c, opt_c, batches, rngs)
  for other in (seq, grouped, single, donated):  # groups of 2: a full group, then a remainder of 1
    for g, r in zip(jax.tree.leaves(other), jax.tree.leaves(vm)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  # client 0's padded final step neither trains nor sends anything
  np.testing.assert_array_equal(np.asarray(vm[2]["steps"]), [S - 1, S, S])


def test_groups_take_each_shards_clients_by_steps_most_first():
  steps = np.asarray([[2, 0, 5, 5], [1, 3, 3, 4]])  # [shards, clients]: steps up to the last with an example
  example = (np.arange(6) < steps[..., None]).astype(np.float32)[..., None]  # [shards, C, S=6, B=1]
  example[0, 2, 1] = 0  # a gap before the last example does not shorten the client
  np.testing.assert_array_equal(client.order_by_steps(jnp.asarray(example)), [[2, 3, 0, 1], [3, 1, 2, 0]])


def test_steps_after_a_clients_last_example_are_skipped_and_middle_gaps_masked():
  """The step loop stops after each client's last step with an example; under vmap the others' extra
  iterations are discarded. A client with no example keeps its state bit for bit; an empty step between
  two real ones changes nothing, so the client equals one trained on its two real steps alone."""
  cfg, base, lora = _setup()
  tx = optax.adamw(1e-2, eps=1e-4)
  update = client.make_local_update(client.LocalSpec(cfg), tx)
  batches = _batches(7, lead=(2, 3, 1))
  example = np.ones((2, 3, 1, B), np.float32)
  example[0] = 0  # client 0: no example at all
  example[1, 1] = 0  # client 1: steps 0 and 2 only
  batches = dict(batches, example_mask=jnp.asarray(example))
  lora_c, rngs = _stack(lora, 2), jax.random.split(jax.random.key(3), 2)
  out_lora, out_opt, stats = jax.jit(client.over_clients(update, "vmap"))(
      base, lora_c, jax.vmap(tx.init)(lora_c), batches, rngs)
  for got, start in zip(jax.tree.leaves(out_lora), jax.tree.leaves(lora_c)):
    np.testing.assert_array_equal(got[0], start[0])
  np.testing.assert_array_equal(np.asarray(stats["steps"]), [0, 2])
  # client 1 alone on its two real steps (no dropout in `_setup`: the step keys do not matter)
  two = {k: v[1][jnp.asarray([0, 2])] for k, v in batches.items()}
  want, _, _ = jax.jit(update)(base, lora, tx.init(lora), two, rngs[1])
  for got, w in zip(jax.tree.leaves(out_lora), jax.tree.leaves(want)):
    np.testing.assert_allclose(got[1], w, rtol=1e-5, atol=1e-6)


def test_heldout_loss_is_the_token_mean_over_every_step_with_examples():
  from federated import engine
  cfg, base, lora = _setup()
  batches = {k: v[:, :, 0] for k, v in _batches(9).items()}  # [C, S, B, ...]: held-out batches have no A axis
  example = np.ones((C, S, B), np.float32)
  example[1, 1:] = 0  # client 1's later steps are padding
  example[2] = 0  # client 2 has no held-out example
  batches["example_mask"] = jnp.asarray(example)
  lora_c = _stack(lora, C)
  mean, count = jax.jit(engine.make_heldout_loss(client.LocalSpec(cfg)))(base, lora_c, batches)
  for c in range(C):
    sums = [client.forward_loss(client.LocalSpec(cfg), base, lora, {k: v[c, s] for k, v in batches.items()})
            for s in range(S)]
    total, n = sum(float(x[0]) for x in sums), sum(float(x[1]) for x in sums)
    assert float(count[c]) == n
    np.testing.assert_allclose(float(mean[c]), total / max(n, 1.0), rtol=1e-5)
  assert float(count[2]) == 0 and float(mean[2]) == 0.0

"""KV-cache greedy and beam search against an uncached reference on a tiny random decoder."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import decoding

N = 8  # max_new_tokens
PAD = -1  # not a token id, so padding is unambiguous in the outputs


@pytest.fixture(scope="module")
def model():
  config = models.tiny_llama()
  # A larger init std than training's 0.02 so logits are peaked and argmax ties are implausible.
  return config, models.init_params(config, jax.random.key(0), std=0.2)


@pytest.fixture(scope="module")
def prompts():
  """Three left-padded rows of 7, 5 and 2 real tokens."""
  mask_bt = jnp.array([[1] * 7, [0, 0] + [1] * 5, [0] * 5 + [1] * 2], jnp.int32)
  ids_bt = jax.random.randint(jax.random.key(1), mask_bt.shape, 1, 512) * mask_bt
  return ids_bt, mask_bt


@functools.partial(jax.jit, static_argnames="config")
def _apply(config, params, ids_bt, mask_bt, lora):
  return models.apply(config, params, ids_bt, mask_bt, lora=lora)


def reference_greedy(config, params, ids_bt, mask_bt, *, eos_id=None, lora=None):
  """No cache: re-runs the full forward over prompt + tokens so far at every step."""
  b, t = ids_bt.shape
  ids = np.concatenate([np.asarray(ids_bt), np.zeros((b, N), np.int32)], axis=1)
  mask = np.concatenate([np.asarray(mask_bt), np.zeros((b, N), np.int32)], axis=1)
  out = np.full((b, N), PAD, np.int32)
  done = np.zeros(b, bool)
  for i in range(N):
    logits_bv = np.asarray(_apply(config, params, ids, mask, lora))[:, t + i - 1]
    token = np.where(done, PAD, logits_bv.argmax(-1))
    out[:, i] = token
    done |= token == eos_id
    ids[:, t + i], mask[:, t + i] = np.maximum(token, 0), 1
  return out


def generated_logprob(config, params, ids_bt, mask_bt, tokens_bn, eos_id=None, lora=None):
  """Sum of the generated tokens' logprobs up to and including the first eos, and their count."""
  t = ids_bt.shape[1]
  tokens = np.asarray(tokens_bn)
  is_eos = tokens == eos_id
  length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, N)
  live = np.arange(N)[None] < length[:, None]
  ids = np.concatenate([np.asarray(ids_bt), np.where(live, tokens, 0)], axis=1)
  mask = np.concatenate([np.asarray(mask_bt), np.ones_like(tokens)], axis=1)
  logprobs = np.asarray(jax.nn.log_softmax(_apply(config, params, ids, mask, lora)))[:, t - 1:-1]
  picked = np.take_along_axis(logprobs, np.where(live, tokens, 0)[..., None], axis=-1)[..., 0]
  return (picked * live).sum(1), length


def test_greedy_matches_uncached_reference(model, prompts):
  config, params = model
  ids_bt, mask_bt = prompts
  tokens = models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD)
  assert tokens.shape == (3, N) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, reference_greedy(config, params, ids_bt, mask_bt))
  # Left padding changes nothing: the shortest row decoded on its own gives the same tokens.
  alone = models.greedy(config, params, ids_bt[2:, -2:], mask_bt[2:, -2:], max_new_tokens=N, pad_id=PAD)
  np.testing.assert_array_equal(alone[0], tokens[2])


def test_greedy_eos_then_pad(model, prompts):
  config, params = model
  ids_bt, mask_bt = prompts
  free = np.asarray(models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD))
  eos = int(free[0, 2])
  tokens = np.asarray(models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, eos_id=eos, pad_id=PAD))
  first = int(np.argmax(free[0] == eos))
  np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
  assert (tokens[0, first + 1:] == PAD).all()
  np.testing.assert_array_equal(tokens, reference_greedy(config, params, ids_bt, mask_bt, eos_id=eos))


def test_one_beam_is_greedy(model, prompts):
  config, params = model
  ids_bt, mask_bt = prompts
  free = np.asarray(models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD))
  eos = int(free[1, 3])
  greedy = models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, eos_id=eos, pad_id=PAD)
  tokens, scores = models.beam_search(config, params, ids_bt, mask_bt, num_beams=1, max_new_tokens=N,
                                      eos_id=eos, pad_id=PAD)
  np.testing.assert_array_equal(tokens, greedy)
  logprob, length = generated_logprob(config, params, ids_bt, mask_bt, greedy, eos)
  np.testing.assert_allclose(scores, logprob / length, rtol=1e-4)
  # The beam machinery itself reduces to greedy with one beam when scores are plain logprob sums.
  beams = jax.jit(decoding._beams, static_argnums=(0, 5, 6, 7, 8, 9))(
      config, params, ids_bt, mask_bt, None, 1, N, eos, PAD, 0.0)
  np.testing.assert_array_equal(beams.pool_seqs_bkn[:, 0], greedy)


def test_beams_beat_greedy(model, prompts):
  config, params = model
  ids_bt, mask_bt = prompts
  greedy = models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD)
  tokens, scores = models.beam_search(config, params, ids_bt, mask_bt, num_beams=4, max_new_tokens=N, pad_id=PAD)
  beam_logprob, _ = generated_logprob(config, params, ids_bt, mask_bt, tokens)
  greedy_logprob, _ = generated_logprob(config, params, ids_bt, mask_bt, greedy)
  assert (beam_logprob >= greedy_logprob - 1e-4).all()
  assert (beam_logprob > greedy_logprob + 1e-3).any()  # the search is not greedy in disguise
  np.testing.assert_allclose(scores, beam_logprob / N, rtol=1e-4)


def test_beams_eos_then_pad(model, prompts):
  config, params = model
  ids_bt, mask_bt = prompts
  free, _ = models.beam_search(config, params, ids_bt, mask_bt, num_beams=4, max_new_tokens=N, pad_id=PAD)
  eos = int(free[0, 1])
  tokens, scores = models.beam_search(config, params, ids_bt, mask_bt, num_beams=4, max_new_tokens=N,
                                      eos_id=eos, pad_id=PAD, length_penalty=0.5)
  tokens = np.asarray(tokens)
  logprob, length = generated_logprob(config, params, ids_bt, mask_bt, tokens, eos)
  assert (length < N).any()
  assert all((row[n:] == PAD).all() and (row[:n] != PAD).all() for row, n in zip(tokens, length))
  np.testing.assert_allclose(scores, logprob / length ** 0.5, rtol=1e-4)


def test_lora_changes_generation_and_matches_reference(model, prompts):
  base_config, params = model
  ids_bt, mask_bt = prompts
  config = dataclasses.replace(base_config, lora=models.LoraConfig(rank=4, targets=("q", "v", "up")))
  fresh = models.init_lora(config, jax.random.key(2))
  keys = jax.random.split(jax.random.key(3), len(fresh["blocks"]))
  lora = {"blocks": {target: dict(ab, b_ro=0.5 * jax.random.normal(key, ab["b_ro"].shape))
                     for key, (target, ab) in zip(keys, sorted(fresh["blocks"].items()))}}
  base = models.greedy(base_config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD)
  tokens = models.greedy(config, params, ids_bt, mask_bt, max_new_tokens=N, pad_id=PAD, lora=lora)
  assert (np.asarray(tokens) != np.asarray(base)).any()
  np.testing.assert_array_equal(tokens, reference_greedy(config, params, ids_bt, mask_bt, lora=lora))


# ----------------------------------------------------------------------------- constrained to a catalogue

EOS = 3


@pytest.fixture(scope="module")
def catalogue():
  """Twelve item responses over a five-token alphabet (so they share prefixes), each ending in EOS;
  items 10 and 11 have equal responses (a repeated title)."""
  rng = np.random.default_rng(0)
  seqs = set()
  while len(seqs) < 11:
    seqs.add(tuple(rng.choice([5, 6, 7, 8, 9], size=rng.integers(1, 5)).tolist()) + (EOS,))
  seqs = sorted(seqs, key=lambda s: (len(s), s))
  return [list(s) for s in seqs] + [list(seqs[-1])]


def reference_logprobs(config, params, ids_bt, mask_bt, sequences):
  """`[B, I]` uncached: the sum of the logprobs of each sequence's tokens after each prompt."""
  b, t = ids_bt.shape
  width = max(len(s) for s in sequences)
  out = np.zeros((b, len(sequences)))
  for i, seq in enumerate(sequences):
    tokens = np.zeros((b, width), np.int32)
    tokens[:, :len(seq)] = seq
    logprobs = np.asarray(jax.nn.log_softmax(_apply(config, params, np.concatenate([ids_bt, tokens], 1),
                                                    np.concatenate([mask_bt, np.ones_like(tokens)], 1), None)))
    out[:, i] = sum(logprobs[:, t - 1 + j, token] for j, token in enumerate(seq))
  return out


def test_trie_holds_every_sequence(catalogue):
  trie = models.build_trie(catalogue, EOS)
  assert trie.depth == max(map(len, catalogue)) and trie.edge_token_e.shape == (trie.edge_node_e.shape[0],)
  for i, seq in enumerate(catalogue):
    node = 0
    for token in seq:
      edges = range(trie.child_start_n[node], trie.child_start_n[node] + trie.child_count_n[node])
      assert list(trie.edge_token_e[edges]) == sorted(trie.edge_token_e[edges])
      node = {int(trie.edge_token_e[e]): int(trie.edge_node_e[e]) for e in edges}[token]
      assert i in trie.item_p[trie.lo_n[node]:trie.hi_n[node]]
    assert trie.child_count_n[node] == 0  # a leaf
    assert sorted(trie.item_p[trie.lo_n[node]:trie.hi_n[node]]) == [j for j, s in enumerate(catalogue) if s == seq]
  with pytest.raises(ValueError, match="sequence 1 must end in eos_id=3"):
    models.build_trie([[5, EOS], [5, EOS, 6]], EOS)


def test_exhaustive_constrained_beams_rank_every_item_by_logprob(model, prompts, catalogue):
  """With as many beams as items nothing is pruned, so the result is the catalogue sorted by exact
  sequence logprob; the repeated title yields its first item only, so one slot stays empty."""
  config, params = model
  ids_bt, mask_bt = prompts
  items, scores = models.constrained_beam_search(
      config, params, ids_bt, mask_bt, models.build_trie(catalogue, EOS), np.zeros((3, 12), bool),
      num_beams=12, eos_id=EOS)
  reference = reference_logprobs(config, params, ids_bt, mask_bt, catalogue)[:, :11]
  np.testing.assert_array_equal(np.asarray(items)[:, :11], np.argsort(-reference, axis=1, kind="stable"))
  np.testing.assert_allclose(np.asarray(scores)[:, :11], -np.sort(-reference, axis=1), rtol=1e-4)
  assert (np.asarray(items)[:, 11] == -1).all() and (np.asarray(scores)[:, 11] == -np.inf).all()


def test_one_constrained_beam_is_greedy_in_the_trie(model, prompts, catalogue):
  """A plain loop: at each step the most likely token among those that continue a kept item."""
  config, params = model
  ids_bt, mask_bt = prompts
  exclude = np.zeros((3, 12), bool)
  exclude[1, [2, 4, 7]] = True
  items, _ = models.constrained_beam_search(config, params, ids_bt, mask_bt, models.build_trie(catalogue, EOS),
                                            exclude, num_beams=1, eos_id=EOS)
  for b in range(3):
    kept = [s for i, s in enumerate(catalogue) if not exclude[b, i]]
    prefix = []
    while not prefix or prefix[-1] != EOS:
      ids = np.concatenate([ids_bt[b], np.asarray(prefix, np.int32)])[None]
      logits = np.asarray(_apply(config, params, ids, np.ones_like(ids) * np.concatenate(
          [mask_bt[b], np.ones(len(prefix), np.int32)])[None], None))[0, -1]
      allowed = sorted({s[len(prefix)] for s in kept if s[:len(prefix)] == prefix})
      prefix.append(allowed[int(np.argmax(logits[allowed]))])
    assert catalogue[int(items[b, 0])] == prefix


def test_excluded_items_never_appear(model, prompts, catalogue):
  """With few beams excluded items never surface; with as many beams as items the result is the
  reference ranking of the kept items (the repeated title yields its kept item)."""
  config, params = model
  ids_bt, mask_bt = prompts
  trie = models.build_trie(catalogue, EOS)
  reference = reference_logprobs(config, params, ids_bt, mask_bt, catalogue)
  exclude = np.zeros((3, 12), bool)
  exclude[0, np.argsort(-reference[0])[:2]] = True  # the two best
  exclude[1, :] = True
  exclude[1, [1, 11]] = False                       # two items left; 11 is the second of the repeated title
  exclude[2, 10] = True                             # the first of the repeated title
  for beams in (4, 12):
    items, scores = map(np.asarray, models.constrained_beam_search(config, params, ids_bt, mask_bt, trie, exclude,
                                                                   num_beams=beams, eos_id=EOS))
    for b in range(3):
      found = items[b][items[b] >= 0]
      assert not exclude[b, found].any() and len(set(found)) == len(found)
    assert sorted(items[1, :2]) == [1, 11] and (items[1, 2:] == -1).all() and np.isinf(scores[1, 2:]).all()
  for b in range(3):
    kept = [i for i in np.argsort(-reference[b], kind="stable") if not exclude[b, i] and i != 10]
    if not exclude[b, 10]:  # item 10 stands first for the repeated title
      kept = [10 if i == 11 else i for i in kept]
    np.testing.assert_array_equal(items[b, :len(kept)], kept)


def test_response_logprobs_match_the_uncached_reference(model, prompts, catalogue):
  """Teacher-forced scores of chosen items (a chunk that does not divide P, an item twice)
  equal the uncached reference, and the exhaustive constrained beams' scores."""
  config, params = model
  ids_bt, mask_bt = prompts
  width = max(map(len, catalogue))
  tokens_in = np.asarray([s + [0] * (width - len(s)) for s in catalogue], np.int32)
  length_i = np.asarray([len(s) for s in catalogue], np.int32)
  items_bp = np.asarray([[0, 3, 11, 5, 5], [7, 1, 2, 9, 4], [10, 6, 8, 0, 11]], np.int32)
  scores = np.asarray(models.response_logprobs(config, params, ids_bt, mask_bt, tokens_in, length_i, items_bp,
                                               chunk=2))
  reference = reference_logprobs(config, params, ids_bt, mask_bt, catalogue)
  np.testing.assert_allclose(scores, np.take_along_axis(reference, items_bp, axis=1), rtol=1e-4, atol=1e-4)
  beam_items, beam_scores = map(np.asarray, models.constrained_beam_search(
      config, params, ids_bt, mask_bt, models.build_trie(catalogue, EOS), np.zeros((3, 12), bool),
      num_beams=12, eos_id=EOS))
  found = beam_items[:, :11]
  np.testing.assert_allclose(np.asarray(models.response_logprobs(config, params, ids_bt, mask_bt, tokens_in,
                                                                 length_i, found)), beam_scores[:, :11], rtol=1e-4)

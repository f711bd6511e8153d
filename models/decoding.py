"""Jitted KV-cache greedy and beam-search decoding for the decoder, batched with left padding.

The prompt `[B, T]` (left padded) is prefilled once; its keys and values stay `[L, B, T, KV, H]`, shared
by all of a row's hypotheses, which own only their generated tokens' cache of `N = max_new_tokens` slots
(so beams reorder and copy N slots a step, never the prompt). Generated token j is fed back into slot j
at RoPE position `len_b + j` (`len_b` = the row's real prompt tokens), which continues the prompt's
`cumsum(mask) - 1` positions. Attention admits the prompt's real tokens and the generated slots written
so far, never left padding or slots not yet written (`transformer.prefix_attention`). Each call is one `jax.jit` (config, lengths, ids and beam settings static) around a
`lax.while_loop` that stops early once every row is finished.

Beam search is HF's vectorised beam search with `early_stopping=False`: per row, `num_beams` running
hypotheses; each step takes the top `2 * num_beams` continuations; those among the top `num_beams` that end
in eos (and at the last step all of the top `num_beams`) enter a per-row pool of `num_beams` finished
hypotheses scored `sum(logprob) / len ** length_penalty` (`len` counts generated tokens, eos included); the
best non-eos continuations keep running. A row stops once no running hypothesis can beat the worst pooled
one, which cannot change the result. `num_beams=1` is greedy decoding, as in HF.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import transformer as tfm
from models.config import ModelConfig
from models.transformer import Params

Cache = tuple[jax.Array, jax.Array]  # the generated tokens' (k_lrnkh, v_lrnkh), R rows of N slots


class _Prompt(NamedTuple):
  """The prompts' keys and values `[L, B, T, KV, H]`, written once by the prefill and read by every
  hypothesis of the row (beams never copy them)."""
  k_lbtkh: jax.Array
  v_lbtkh: jax.Array
  mask_bt: jax.Array


def _lora_blocks(lora: Params | None) -> Params | None:
  return None if lora is None else lora["blocks"]


def _prefill(config: ModelConfig, params: Params, lora: Params | None, input_ids_bt: jax.Array,
             attention_mask_bt: jax.Array) -> tuple[jax.Array, _Prompt]:
  """Runs the prompts; returns `(logits_bv, prompt)`. `logits_bv` predicts the first new token: with left
  padding the last column is every row's last token."""
  b, t = input_ids_bt.shape
  shape = (config.num_layers, b, t, config.num_kv_heads, config.head_dim)
  x_btd = tfm.embed(config, params, input_ids_bt)
  x_btd, (k_lbtkh, v_lbtkh) = tfm.run_blocks(
      config, params["blocks"], x_btd, attention_mask_bt, lora_blocks=_lora_blocks(lora),
      kv_cache=(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype), 0),
      positions_bt=tfm.positions_from_mask(attention_mask_bt), mask_b1ts=tfm.self_attention_mask(config, attention_mask_bt))
  return tfm.outputs(config, params, x_btd[:, -1:])[:, 0], _Prompt(k_lbtkh, v_lbtkh, attention_mask_bt)


def _empty_cache(config: ModelConfig, rows: int, max_new_tokens: int) -> Cache:
  shape = (config.num_layers, rows, max_new_tokens, config.num_kv_heads, config.head_dim)
  return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


def _decode(config: ModelConfig, params: Params, lora: Params | None, token_r: jax.Array, step: jax.Array,
            cache: Cache, prompt: _Prompt) -> tuple[jax.Array, Cache]:
  """Feeds generated token number `step` of every row into slot `step` of `cache`; R = B * J rows, the J
  consecutive rows of prompt b (its hypotheses) attending to it. Returns `(logits_rv, cache)`."""
  r, n = token_r.shape[0], cache[0].shape[2]
  length_r = jnp.repeat(prompt.mask_bt.astype(jnp.int32).sum(-1), r // prompt.mask_bt.shape[0])
  written_r11n = jnp.broadcast_to(jnp.arange(n) <= step, (r, 1, 1, n))
  x_r1d = tfm.embed(config, params, token_r[:, None])
  x_r1d, cache = tfm.run_blocks(config, params["blocks"], x_r1d, None, lora_blocks=_lora_blocks(lora),
                                kv_cache=(*cache, step), positions_bt=(length_r + step)[:, None],
                                mask_b1ts=written_r11n, prefix=prompt)
  return tfm.outputs(config, params, x_r1d)[:, 0], cache


# ----------------------------------------------------------------------------- greedy

class _Greedy(NamedTuple):
  step: jax.Array        # the next column of `tokens_bn` to fill
  tokens_bn: jax.Array
  done_b: jax.Array      # emitted eos
  logprob_b: jax.Array   # sum of the emitted tokens' logprobs, eos included
  length_b: jax.Array    # emitted tokens, eos included
  cache: Cache


def _greedy_pick(state: _Greedy, logits_bv: jax.Array, eos_id: int | None, pad_id: int) -> _Greedy:
  live_b = ~state.done_b
  best_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logprob_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bv), best_b[:, None], axis=-1)[:, 0]
  token_b = jnp.where(live_b, best_b, pad_id)
  done_b = state.done_b if eos_id is None else state.done_b | (token_b == eos_id)
  return state._replace(step=state.step + 1,
                        tokens_bn=jax.lax.dynamic_update_slice(state.tokens_bn, token_b[:, None], (0, state.step)),
                        done_b=done_b, logprob_b=state.logprob_b + jnp.where(live_b, logprob_b, 0.0),
                        length_b=state.length_b + live_b)


def _greedy(config: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
            lora: Params | None, max_new_tokens: int, eos_id: int | None, pad_id: int) -> _Greedy:
  """The final greedy state: tokens `[B, N]` plus each row's logprob sum and length."""
  b = input_ids_bt.shape[0]
  logits_bv, prompt = _prefill(config, params, lora, input_ids_bt, attention_mask_bt)
  state = _Greedy(step=jnp.int32(0), tokens_bn=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                  done_b=jnp.zeros(b, bool), logprob_b=jnp.zeros(b, jnp.float32),
                  length_b=jnp.zeros(b, jnp.int32), cache=_empty_cache(config, b, max_new_tokens))
  state = _greedy_pick(state, logits_bv, eos_id, pad_id)

  def cond(s: _Greedy):
    return (s.step < max_new_tokens) & ~jnp.all(s.done_b)

  def body(s: _Greedy):
    last_b = jax.lax.dynamic_index_in_dim(s.tokens_bn, s.step - 1, axis=1, keepdims=False)
    logits_bv, cache = _decode(config, params, lora, last_b, s.step - 1, s.cache, prompt)
    return _greedy_pick(s._replace(cache=cache), logits_bv, eos_id, pad_id)

  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "eos_id", "pad_id"))
def greedy(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
           max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0, lora: Params | None = None
           ) -> jax.Array:
  """Greedy decoding of left-padded prompts `[B, T]`: new tokens `[B, max_new_tokens]`, `pad_id` after eos."""
  return _greedy(config, params, input_ids, attention_mask, lora, max_new_tokens, eos_id, pad_id).tokens_bn


# ----------------------------------------------------------------------------- beam search

class _Beams(NamedTuple):
  step: jax.Array         # the next generated column to fill
  seqs_bkn: jax.Array     # running hypotheses (pad beyond `step`)
  scores_bk: jax.Array    # their logprob sums, sorted descending
  parent_bk: jax.Array    # the beam each running hypothesis extends (its cache row)
  pool_seqs_bkn: jax.Array
  pool_scores_bk: jax.Array  # length-penalised, sorted descending; -inf = empty
  done_b: jax.Array
  cache: Cache            # rows are (b, k) flattened


def _top_k_rows(scores_bc: jax.Array, seqs_bcn: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The `k` best of `c` candidates per row: `(scores_bk, seqs_bkn, index_bk)`."""
  scores_bk, index_bk = jax.lax.top_k(scores_bc, k)
  return scores_bk, jnp.take_along_axis(seqs_bcn, index_bk[:, :, None], axis=1), index_bk


def _beam_pick(state: _Beams, logits_bkv: jax.Array, *, eos_id: int | None, length_penalty: float,
               max_new_tokens: int) -> _Beams:
  b, k, v = logits_bkv.shape
  t = state.step
  cand_bkv = state.scores_bk[:, :, None] + jax.nn.log_softmax(logits_bkv, axis=-1)
  # 2k candidates leave at least k that do not end in eos, since each beam has one eos continuation.
  cand_scores_bc, flat_bc = jax.lax.top_k(cand_bkv.reshape(b, k * v), 2 * k)
  parent_bc, token_bc = flat_bc // v, (flat_bc % v).astype(jnp.int32)
  cand_seqs_bcn = jnp.take_along_axis(state.seqs_bkn, parent_bc[:, :, None], axis=1)
  cand_seqs_bcn = jax.lax.dynamic_update_slice(cand_seqs_bcn, token_bc[:, :, None], (0, 0, t))
  is_eos_bc = jnp.zeros_like(token_bc, bool) if eos_id is None else token_bc == eos_id

  # As in HF, only the top k may finish: an eos ranked below them would not have been a beam.
  finishing_bc = (is_eos_bc | (t == max_new_tokens - 1)) & (jnp.arange(2 * k) < k)
  penalised_bc = cand_scores_bc / (t + 1).astype(jnp.float32) ** length_penalty
  pool_scores_bk, pool_seqs_bkn, _ = _top_k_rows(
      jnp.concatenate([state.pool_scores_bk, jnp.where(finishing_bc, penalised_bc, -jnp.inf)], axis=1),
      jnp.concatenate([state.pool_seqs_bkn, cand_seqs_bcn], axis=1), k)

  scores_bk, seqs_bkn, index_bk = _top_k_rows(jnp.where(is_eos_bc, -jnp.inf, cand_scores_bc), cand_seqs_bcn, k)
  # Continuations only add non-positive logprobs, so the best running sum bounds every future hypothesis;
  # its penalised score is largest at the longest length when length_penalty > 0, else at the shortest.
  bound_len = jnp.float32(max_new_tokens) if length_penalty > 0 else (t + 1).astype(jnp.float32)
  best_possible_b = scores_bk[:, 0] / bound_len ** length_penalty
  worst_pooled_b = pool_scores_bk[:, -1]
  done_b = (worst_pooled_b > -jnp.inf) & (best_possible_b <= worst_pooled_b)
  return state._replace(step=t + 1, seqs_bkn=seqs_bkn, scores_bk=scores_bk,
                        parent_bk=jnp.take_along_axis(parent_bc, index_bk, axis=1),
                        pool_seqs_bkn=pool_seqs_bkn, pool_scores_bk=pool_scores_bk, done_b=done_b)


def _reorder(cache: Cache, parent_bk: jax.Array) -> Cache:
  """Gathers each hypothesis's parent cache row; cache rows are `b * k + beam`."""
  b, k = parent_bk.shape
  rows = (jnp.arange(b)[:, None] * k + parent_bk).reshape(-1)
  return tuple(jnp.take(c_lbskh, rows, axis=1) for c_lbskh in cache)


def _beams(config: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
           lora: Params | None, num_beams: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
           length_penalty: float) -> _Beams:
  """The final beam state; the best hypothesis of row b is `pool_seqs_bkn[b, 0]`."""
  b, k, n = input_ids_bt.shape[0], num_beams, max_new_tokens
  logits_bv, prompt = _prefill(config, params, lora, input_ids_bt, attention_mask_bt)
  empty_bkn = jnp.full((b, k, n), pad_id, jnp.int32)
  # Only beam 0 is live at first, so the first step's candidates are distinct tokens.
  state = _Beams(step=jnp.int32(0), seqs_bkn=empty_bkn,
                 scores_bk=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-jnp.inf),
                 parent_bk=jnp.zeros((b, k), jnp.int32), pool_seqs_bkn=empty_bkn,
                 pool_scores_bk=jnp.full((b, k), -jnp.inf, jnp.float32), done_b=jnp.zeros(b, bool),
                 cache=_empty_cache(config, b * k, n))
  pick = functools.partial(_beam_pick, eos_id=eos_id, length_penalty=length_penalty, max_new_tokens=n)
  state = pick(state, jnp.broadcast_to(logits_bv[:, None], (b, k, logits_bv.shape[-1])))

  def cond(s: _Beams):
    return (s.step < n) & ~jnp.all(s.done_b)

  def body(s: _Beams):
    last_r = jax.lax.dynamic_index_in_dim(s.seqs_bkn, s.step - 1, axis=2, keepdims=False).reshape(-1)
    logits_rv, cache = _decode(config, params, lora, last_r, s.step - 1, _reorder(s.cache, s.parent_bk), prompt)
    return pick(s._replace(cache=cache), logits_rv.reshape(b, k, -1))

  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "max_new_tokens", "eos_id", "pad_id",
                                             "length_penalty"))
def beam_search(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
                num_beams: int, max_new_tokens: int, eos_id: int | None = None, pad_id: int = 0,
                lora: Params | None = None, length_penalty: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Beam search over left-padded prompts `[B, T]`.

  Returns the best hypothesis per row, tokens `[B, max_new_tokens]` (`pad_id` after eos), and its score
  `[B]` = `sum(logprob) / len ** length_penalty` over the generated tokens, eos included.
  """
  if num_beams < 1:
    raise ValueError(f"num_beams must be >= 1, got {num_beams}")
  if num_beams == 1:
    s = _greedy(config, params, input_ids, attention_mask, lora, max_new_tokens, eos_id, pad_id)
    return s.tokens_bn, s.logprob_b / s.length_b.astype(jnp.float32) ** length_penalty
  s = _beams(config, params, input_ids, attention_mask, lora, num_beams, max_new_tokens, eos_id, pad_id,
             length_penalty)
  return s.pool_seqs_bkn[:, 0], s.pool_scores_bk[:, 0]


# ----------------------------------------------------------------------------- constrained to a catalogue

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["child_start_n", "child_count_n", "edge_token_e", "edge_node_e", "lo_n", "hi_n",
                                "item_p"],
                   meta_fields=["max_fanout", "depth"])
@dataclasses.dataclass(frozen=True)
class Trie:
  """A prefix trie of I token sequences (a catalogue's responses, each ending in eos) as dense arrays, so
  decoding walks it inside `lax.while_loop`. Node 0 is the root; N nodes, E = N - 1 edges.

  Attributes:
    child_start_n, child_count_n: `[N]` node n's children are edges `[start, start + count)`, by token.
    edge_token_e, edge_node_e: `[E]` the token an edge emits and the node it leads to.
    lo_n, hi_n: `[N]` the sequences through node n are sorted positions `[lo, hi)` (sequences sorted by
      their tokens, so every node's sequences are contiguous); a leaf (the node after eos) covers the
      items whose sequences are equal.
    item_p: `[I]` the item at sorted position p.
    max_fanout: the most children of any node (static). depth: the longest sequence, eos included (static).
  """

  child_start_n: np.ndarray
  child_count_n: np.ndarray
  edge_token_e: np.ndarray
  edge_node_e: np.ndarray
  lo_n: np.ndarray
  hi_n: np.ndarray
  item_p: np.ndarray
  max_fanout: int
  depth: int


def build_trie(sequences: Sequence[Sequence[int]], eos_id: int) -> Trie:
  """The trie of `sequences` (item i's tokens, each ending in its only `eos_id`)."""
  for i, seq in enumerate(sequences):
    if not seq or seq[-1] != eos_id or eos_id in seq[:-1]:
      raise ValueError(f"sequence {i} must end in eos_id={eos_id} and contain it nowhere else, got {list(seq)}")
  order = sorted(range(len(sequences)), key=lambda i: tuple(sequences[i]))
  children: list[dict[int, int]] = [{}]
  lo, hi = [0], [len(sequences)]
  for p, i in enumerate(order):
    node = 0
    for token in sequences[i]:
      if token not in children[node]:
        children[node][token] = len(children)
        children.append({})
        lo.append(p)
        hi.append(p)
      node = children[node][token]
      hi[node] = p + 1
  start, tokens, nodes = [], [], []
  for kids in children:
    start.append(len(tokens))
    for token in sorted(kids):
      tokens.append(token)
      nodes.append(kids[token])
  i32 = functools.partial(np.asarray, dtype=np.int32)
  counts = [len(kids) for kids in children]
  return Trie(i32(start), i32(counts), i32(tokens), i32(nodes), i32(lo), i32(hi), i32(order),
              max_fanout=max(counts), depth=max(len(s) for s in sequences))


class _TrieBeams(NamedTuple):
  step: jax.Array
  token_bk: jax.Array        # each running hypothesis's last token
  node_bk: jax.Array         # and the trie node it has reached
  scores_bk: jax.Array       # their logprob sums, sorted descending; -inf = no hypothesis
  parent_bk: jax.Array       # the beam each running hypothesis extends (its cache row)
  pool_scores_bk: jax.Array  # finished hypotheses, length-penalised, sorted descending; -inf = empty
  pool_leaf_bk: jax.Array    # and their leaves
  done_b: jax.Array
  cache: Cache


def _trie_pick(state: _TrieBeams, logits_bkv: jax.Array, trie: Trie, alive_bn: Callable[[jax.Array], jax.Array],
               *, eos_id: int, length_penalty: float) -> _TrieBeams:
  """One step: every running hypothesis may extend only by its node's children that lead to an item the
  row has not excluded (`alive_bn(nodes [B, ...]) -> bool`); otherwise as `_beam_pick`."""
  b, k, _ = logits_bkv.shape
  f, t = trie.max_fanout, state.step
  slot_f = jnp.arange(f)
  edge_bkf = trie.child_start_n[state.node_bk][..., None] + slot_f
  valid_bkf = slot_f < trie.child_count_n[state.node_bk][..., None]
  edge_bkf = jnp.where(valid_bkf, edge_bkf, 0)
  token_bkf, child_bkf = trie.edge_token_e[edge_bkf], trie.edge_node_e[edge_bkf]
  valid_bkf &= alive_bn(child_bkf.reshape(b, k * f)).reshape(b, k, f)
  logprob_bkf = jnp.take_along_axis(jax.nn.log_softmax(logits_bkv.astype(jnp.float32), axis=-1), token_bkf, axis=-1)
  cand_bkf = jnp.where(valid_bkf, state.scores_bk[:, :, None] + logprob_bkf, -jnp.inf)
  cand_scores_bc, flat_bc = jax.lax.top_k(cand_bkf.reshape(b, k * f), 2 * k)
  take = lambda x_bkf: jnp.take_along_axis(x_bkf.reshape(b, k * f), flat_bc, axis=1)
  token_bc, child_bc, parent_bc = take(token_bkf), take(child_bkf), flat_bc // f
  live_bc = cand_scores_bc > -jnp.inf
  is_eos_bc = token_bc == eos_id
  # As in `_beam_pick`, only the top k may finish.
  finishing_bc = is_eos_bc & live_bc & (jnp.arange(2 * k) < k)
  penalised_bc = cand_scores_bc / (t + 1).astype(jnp.float32) ** length_penalty
  pool_scores_bk, index_bk = jax.lax.top_k(
      jnp.concatenate([state.pool_scores_bk, jnp.where(finishing_bc, penalised_bc, -jnp.inf)], axis=1), k)
  pool_leaf_bk = jnp.take_along_axis(jnp.concatenate([state.pool_leaf_bk, child_bc], axis=1), index_bk, axis=1)

  scores_bk, index_bk = jax.lax.top_k(jnp.where(is_eos_bc, -jnp.inf, cand_scores_bc), k)
  bound_len = jnp.float32(trie.depth) if length_penalty > 0 else (t + 1).astype(jnp.float32)
  best_possible_b = scores_bk[:, 0] / bound_len ** length_penalty
  worst_pooled_b = pool_scores_bk[:, -1]
  done_b = (scores_bk[:, 0] == -jnp.inf) | ((worst_pooled_b > -jnp.inf) & (best_possible_b <= worst_pooled_b))
  pick = lambda x_bc: jnp.take_along_axis(x_bc, index_bk, axis=1)
  return state._replace(step=t + 1, token_bk=pick(token_bc), node_bk=pick(child_bc), scores_bk=scores_bk,
                        parent_bk=pick(parent_bc), pool_scores_bk=pool_scores_bk, pool_leaf_bk=pool_leaf_bk,
                        done_b=done_b)


@functools.partial(jax.jit, static_argnames=("config", "num_beams", "eos_id", "length_penalty"))
def constrained_beam_search(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
                            trie: Trie, exclude_bi: jax.Array, *, num_beams: int, eos_id: int,
                            lora: Params | None = None, length_penalty: float = 0.0
                            ) -> tuple[jax.Array, jax.Array]:
  """Beam search over left-padded prompts `[B, T]` that can only write the trie's sequences, never one of
  an item the row excludes: the finished beams are the top-`num_beams` items.

  A hypothesis scores the sum of the model's own (unrenormalised) logprobs of its tokens, eos included,
  divided by `len ** length_penalty`; the default 0 ranks items by the probability of their whole
  response (length normalisation favours long titles, as "Decoding Matters" (Bao et al. 2024) reports).
  Items with equal sequences share a leaf: it yields the first one the row does not exclude.

  Args:
    trie: `build_trie` of the catalogue's responses (I items). exclude_bi: `[B, I]` bool.
  Returns:
    `(items [B, num_beams] int32, scores [B, num_beams])`, best first; item -1 (score -inf) where fewer
    items remain.
  """
  b, k, n = input_ids.shape[0], num_beams, trie.depth
  num_items = trie.item_p.shape[0]
  excluded_bp = exclude_bi[:, trie.item_p]  # in sorted order
  excluded_before_bq = jnp.pad(jnp.cumsum(excluded_bp, axis=1, dtype=jnp.int32), ((0, 0), (1, 0)))
  # The first sorted position >= p whose item the row keeps (num_items: none).
  next_kept_bp = jax.lax.cummin(jnp.where(excluded_bp, num_items, jnp.arange(num_items)), axis=1, reverse=True)
  rows_b1 = jnp.arange(b)[:, None]

  def alive_bn(node_bn):  # does any kept item pass through the node?
    lo_bn, hi_bn = trie.lo_n[node_bn], trie.hi_n[node_bn]
    return excluded_before_bq[rows_b1, hi_bn] - excluded_before_bq[rows_b1, lo_bn] < hi_bn - lo_bn

  logits_bv, prompt = _prefill(config, params, lora, input_ids, attention_mask)
  zeros_bk = jnp.zeros((b, k), jnp.int32)
  state = _TrieBeams(step=jnp.int32(0), token_bk=zeros_bk, node_bk=zeros_bk,
                     scores_bk=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-jnp.inf), parent_bk=zeros_bk,
                     pool_scores_bk=jnp.full((b, k), -jnp.inf, jnp.float32), pool_leaf_bk=zeros_bk,
                     done_b=jnp.zeros(b, bool), cache=_empty_cache(config, b * k, n))
  pick = functools.partial(_trie_pick, trie=trie, alive_bn=alive_bn, eos_id=eos_id, length_penalty=length_penalty)
  state = pick(state, jnp.broadcast_to(logits_bv[:, None], (b, k, logits_bv.shape[-1])))

  def cond(s: _TrieBeams):
    return (s.step < n) & ~jnp.all(s.done_b)

  def body(s: _TrieBeams):
    logits_rv, cache = _decode(config, params, lora, s.token_bk.reshape(-1), s.step - 1,
                               _reorder(s.cache, s.parent_bk), prompt)
    return pick(s._replace(cache=cache), logits_rv.reshape(b, k, -1))

  s = jax.lax.while_loop(cond, body, state)
  position_bk = jnp.minimum(next_kept_bp[rows_b1, trie.lo_n[s.pool_leaf_bk]], num_items - 1)
  found_bk = s.pool_scores_bk > -jnp.inf
  return jnp.where(found_bk, trie.item_p[position_bk], -1), s.pool_scores_bk


# ----------------------------------------------------------------------------- exact scores of given items

@functools.partial(jax.jit, static_argnames=("config", "chunk"))
def response_logprobs(config: ModelConfig, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
                      tokens_in: jax.Array, length_i: jax.Array, items_bp: jax.Array, *,
                      lora: Params | None = None, chunk: int = 8) -> jax.Array:
  """The exact score `constrained_beam_search` gives an item (`length_penalty=0`): the sum of the model's
  logprobs of its response's tokens after each left-padded prompt `[B, T]`, by teacher forcing.

  The prompt is prefilled once; each row's P candidates run as P rows of N - 1 tokens attending to it
  (`transformer.prefix_attention`), `chunk` candidates per row at a time to bound the `[B, chunk, N, V]`
  logits.

  Args:
    tokens_in: `[I, N]` every item's response tokens (eos included), padded with anything.
    length_i: `[I]` their lengths. items_bp: `[B, P]` the items to score per row.
  Returns:
    `[B, P]` float32 logprob sums.
  """
  b, p = items_bp.shape
  n = tokens_in.shape[1]
  logits_bv, prompt = _prefill(config, params, lora, input_ids, attention_mask)
  first_bp = jnp.take_along_axis(jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1),
                                 tokens_in[items_bp, 0], axis=-1)
  if n == 1:
    return first_bp
  c = min(chunk, p)
  groups = -(-p // c)
  items_gbc = jnp.pad(items_bp, ((0, 0), (0, groups * c - p))).reshape(b, groups, c).transpose(1, 0, 2)
  length_r = jnp.repeat(attention_mask.astype(jnp.int32).sum(-1), c)
  causal_r1ss = jnp.broadcast_to(jnp.tril(jnp.ones((n - 1, n - 1), bool)), (b * c, 1, n - 1, n - 1))

  def rest(items_bc):  # the logprobs of tokens 1..N-1, each fed the tokens before it
    tokens_rn = tokens_in[items_bc.reshape(-1)]
    x_rsd = tfm.embed(config, params, tokens_rn[:, :-1])
    x_rsd, _ = tfm.run_blocks(config, params["blocks"], x_rsd, None, lora_blocks=_lora_blocks(lora),
                              kv_cache=(*_empty_cache(config, b * c, n - 1), 0),
                              positions_bt=length_r[:, None] + jnp.arange(n - 1), mask_b1ts=causal_r1ss,
                              prefix=prompt)
    logprobs_rsv = jax.nn.log_softmax(tfm.outputs(config, params, x_rsd), axis=-1)
    picked_rs = jnp.take_along_axis(logprobs_rsv, tokens_rn[:, 1:, None], axis=-1)[..., 0]
    live_rs = jnp.arange(1, n) < length_i[items_bc.reshape(-1)][:, None]
    return jnp.where(live_rs, picked_rs, 0.0).sum(-1).reshape(b, c)

  rest_bp = jax.lax.map(rest, items_gbc).transpose(1, 0, 2).reshape(b, groups * c)[:, :p]
  return first_bp + rest_bp

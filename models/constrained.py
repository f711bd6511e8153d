"""Decoding restricted to a catalogue, and exact scores of catalogue items: a jitted beam search inside a
prefix trie of the items' responses (every finished beam is a real item), and the teacher-forced score
the search gives any item. Both reuse `models.decoding`'s prefill, KV cache and beam bookkeeping; the
prompt's keys and values are shared by all of a row's hypotheses or candidates.
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
from models.decoding import Cache, decode_step, empty_cache, lora_blocks, prefill, reorder_cache
from models.transformer import Params


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

  logits_bv, prompt = prefill(config, params, lora, input_ids, attention_mask)
  zeros_bk = jnp.zeros((b, k), jnp.int32)
  state = _TrieBeams(step=jnp.int32(0), token_bk=zeros_bk, node_bk=zeros_bk,
                     scores_bk=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-jnp.inf), parent_bk=zeros_bk,
                     pool_scores_bk=jnp.full((b, k), -jnp.inf, jnp.float32), pool_leaf_bk=zeros_bk,
                     done_b=jnp.zeros(b, bool), cache=empty_cache(config, b * k, n))
  pick = functools.partial(_trie_pick, trie=trie, alive_bn=alive_bn, eos_id=eos_id, length_penalty=length_penalty)
  state = pick(state, jnp.broadcast_to(logits_bv[:, None], (b, k, logits_bv.shape[-1])))

  def cond(s: _TrieBeams):
    return (s.step < n) & ~jnp.all(s.done_b)

  def body(s: _TrieBeams):
    logits_rv, cache = decode_step(config, params, lora, s.token_bk.reshape(-1), s.step - 1,
                               reorder_cache(s.cache, s.parent_bk), prompt)
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
  (`attention.prefix_attention`), `chunk` candidates per row at a time to bound the `[B, chunk, N, V]`
  logits.

  Args:
    tokens_in: `[I, N]` every item's response tokens (eos included), padded with anything.
    length_i: `[I]` their lengths. items_bp: `[B, P]` the items to score per row.
  Returns:
    `[B, P]` float32 logprob sums.
  """
  b, p = items_bp.shape
  n = tokens_in.shape[1]
  logits_bv, prompt = prefill(config, params, lora, input_ids, attention_mask)
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
    x_rsd, _ = tfm.run_blocks(config, params["blocks"], x_rsd, None, lora_blocks=lora_blocks(lora),
                              kv_cache=(*empty_cache(config, b * c, n - 1), 0),
                              positions_bt=length_r[:, None] + jnp.arange(n - 1), mask_b1ts=causal_r1ss,
                              prefix=prompt)
    logprobs_rsv = jax.nn.log_softmax(tfm.outputs(config, params, x_rsd), axis=-1)
    picked_rs = jnp.take_along_axis(logprobs_rsv, tokens_rn[:, 1:, None], axis=-1)[..., 0]
    live_rs = jnp.arange(1, n) < length_i[items_bc.reshape(-1)][:, None]
    return jnp.where(live_rs, picked_rs, 0.0).sum(-1).reshape(b, c)

  rest_bp = jax.lax.map(rest, items_gbc).transpose(1, 0, 2).reshape(b, groups * c)[:, :p]
  return first_bp + rest_bp

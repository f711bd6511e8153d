"""Jitted KV-cache greedy and beam-search decoding for the decoder, batched with left padding.

The prompt `[B, T]` (left padded) is prefilled once; its keys and values stay `[L, B, T, KV, H]`, shared
by all of a row's hypotheses, which own only their generated tokens' cache of `N = max_new_tokens` slots
(so beams reorder and copy N slots a step, never the prompt). Generated token j is fed back into slot j
at RoPE position `len_b + j` (`len_b` = the row's real prompt tokens), which continues the prompt's
`cumsum(mask) - 1` positions. Attention admits the prompt's real tokens and the generated slots written
so far, never left padding or slots not yet written (`attention.prefix_attention`). Each call is one `jax.jit` (config, lengths, ids and beam settings static) around a
`lax.while_loop` that stops early once every row is finished.

Beam search is HF's vectorised beam search with `early_stopping=False`: per row, `num_beams` running
hypotheses; each step takes the top `2 * num_beams` continuations; those among the top `num_beams` that end
in eos (and at the last step all of the top `num_beams`) enter a per-row pool of `num_beams` finished
hypotheses scored `sum(logprob) / len ** length_penalty` (`len` counts generated tokens, eos included); the
best non-eos continuations keep running. A row stops once no running hypothesis can beat the worst pooled
one, which cannot change the result. `num_beams=1` is greedy decoding, as in HF.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models import attention as attn
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


def lora_blocks(lora: Params | None) -> Params | None:
  return None if lora is None else lora["blocks"]


def prefill(config: ModelConfig, params: Params, lora: Params | None, input_ids_bt: jax.Array,
             attention_mask_bt: jax.Array) -> tuple[jax.Array, _Prompt]:
  """Runs the prompts; returns `(logits_bv, prompt)`. `logits_bv` predicts the first new token: with left
  padding the last column is every row's last token."""
  b, t = input_ids_bt.shape
  shape = (config.num_layers, b, t, config.num_kv_heads, config.head_dim)
  x_btd = tfm.embed(config, params, input_ids_bt)
  x_btd, (k_lbtkh, v_lbtkh) = tfm.run_blocks(
      config, params["blocks"], x_btd, attention_mask_bt, lora_blocks=lora_blocks(lora),
      kv_cache=(jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype), 0),
      positions_bt=attn.positions_from_mask(attention_mask_bt),
      mask_b1ts=attn.self_attention_mask(config, attention_mask_bt))
  return tfm.outputs(config, params, x_btd[:, -1:])[:, 0], _Prompt(k_lbtkh, v_lbtkh, attention_mask_bt)


def empty_cache(config: ModelConfig, rows: int, max_new_tokens: int) -> Cache:
  shape = (config.num_layers, rows, max_new_tokens, config.num_kv_heads, config.head_dim)
  return jnp.zeros(shape, config.dtype), jnp.zeros(shape, config.dtype)


def decode_step(config: ModelConfig, params: Params, lora: Params | None, token_r: jax.Array, step: jax.Array,
            cache: Cache, prompt: _Prompt) -> tuple[jax.Array, Cache]:
  """Feeds generated token number `step` of every row into slot `step` of `cache`; R = B * J rows, the J
  consecutive rows of prompt b (its hypotheses) attending to it. Returns `(logits_rv, cache)`."""
  r, n = token_r.shape[0], cache[0].shape[2]
  length_r = jnp.repeat(prompt.mask_bt.astype(jnp.int32).sum(-1), r // prompt.mask_bt.shape[0])
  written_r11n = jnp.broadcast_to(jnp.arange(n) <= step, (r, 1, 1, n))
  x_r1d = tfm.embed(config, params, token_r[:, None])
  x_r1d, cache = tfm.run_blocks(config, params["blocks"], x_r1d, None, lora_blocks=lora_blocks(lora),
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
  logits_bv, prompt = prefill(config, params, lora, input_ids_bt, attention_mask_bt)
  state = _Greedy(step=jnp.int32(0), tokens_bn=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                  done_b=jnp.zeros(b, bool), logprob_b=jnp.zeros(b, jnp.float32),
                  length_b=jnp.zeros(b, jnp.int32), cache=empty_cache(config, b, max_new_tokens))
  state = _greedy_pick(state, logits_bv, eos_id, pad_id)

  def cond(s: _Greedy):
    return (s.step < max_new_tokens) & ~jnp.all(s.done_b)

  def body(s: _Greedy):
    last_b = jax.lax.dynamic_index_in_dim(s.tokens_bn, s.step - 1, axis=1, keepdims=False)
    logits_bv, cache = decode_step(config, params, lora, last_b, s.step - 1, s.cache, prompt)
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


def reorder_cache(cache: Cache, parent_bk: jax.Array) -> Cache:
  """Gathers each hypothesis's parent cache row; cache rows are `b * k + beam`."""
  b, k = parent_bk.shape
  rows = (jnp.arange(b)[:, None] * k + parent_bk).reshape(-1)
  return tuple(jnp.take(c_lbskh, rows, axis=1) for c_lbskh in cache)


def _beams(config: ModelConfig, params: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array,
           lora: Params | None, num_beams: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
           length_penalty: float) -> _Beams:
  """The final beam state; the best hypothesis of row b is `pool_seqs_bkn[b, 0]`."""
  b, k, n = input_ids_bt.shape[0], num_beams, max_new_tokens
  logits_bv, prompt = prefill(config, params, lora, input_ids_bt, attention_mask_bt)
  empty_bkn = jnp.full((b, k, n), pad_id, jnp.int32)
  # Only beam 0 is live at first, so the first step's candidates are distinct tokens.
  state = _Beams(step=jnp.int32(0), seqs_bkn=empty_bkn,
                 scores_bk=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(-jnp.inf),
                 parent_bk=jnp.zeros((b, k), jnp.int32), pool_seqs_bkn=empty_bkn,
                 pool_scores_bk=jnp.full((b, k), -jnp.inf, jnp.float32), done_b=jnp.zeros(b, bool),
                 cache=empty_cache(config, b * k, n))
  pick = functools.partial(_beam_pick, eos_id=eos_id, length_penalty=length_penalty, max_new_tokens=n)
  state = pick(state, jnp.broadcast_to(logits_bv[:, None], (b, k, logits_bv.shape[-1])))

  def cond(s: _Beams):
    return (s.step < n) & ~jnp.all(s.done_b)

  def body(s: _Beams):
    last_r = jax.lax.dynamic_index_in_dim(s.seqs_bkn, s.step - 1, axis=2, keepdims=False).reshape(-1)
    logits_rv, cache = decode_step(config, params, lora, last_r, s.step - 1, reorder_cache(s.cache, s.parent_bk), prompt)
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

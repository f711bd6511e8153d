"""SASRec (Kang & McAuley 2018), as their released code: item embeddings (id 0 = padding, so item i is
row i + 1) scaled by sqrt(d) plus learned positions, dropout, then blocks of
  x = LN(x); x = x + Attn(q=x, kv=x_before_LN) (causal, padding keys masked, dropout on the weights);
  x = LN(x); x = x + FFN(x) (d -> d ReLU -> d, dropout);  x *= not-padding
and a final LN. The residuals add the normalized inputs, as the original does. Logits are tied to the
item embeddings (padding excluded). Training: full-softmax cross-entropy over all items at every
non-padding position of every training chunk (each user's training sequence cut from the end into
`max_len + 1`-item chunks, so all transitions are used), Adam (lr 3e-3, batch 128), epochs chosen by
validation ndcg@10 with patience inside a time budget (`TrainConfig`); the best epoch's weights are kept.

Memory: the logits are `[B, T, I]` per step (B=128, T=50, I=3,650: 93 MB).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fellrec_jax.baselines.scoring import TUNE_K, Fitted, ScoreFn, split_ndcg
from fellrec_jax.data import pipeline
from fellrec_jax.data.preprocess import Split

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Model shape (hashable: a static argument of the jitted functions)."""

  num_items: int
  max_len: int = 50
  dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Adam, batch, epochs: at most `max_epochs`, validated every `eval_every` epochs, stopped after
  `patience` validations without improvement or before an epoch that would end past `time_budget_s`
  (the last epoch's duration as the estimate; the last epoch trained is always validated).

  lr 3e-3 rather than the paper's 1e-3: the full-softmax steps are costly on CPU, and with 3e-3
  ml-latest-small reaches validation ndcg@10 0.069 after 12 epochs (1e-3: 0.039).
  """

  learning_rate: float = 3e-3
  b2: float = 0.98
  batch_size: int = 128
  max_epochs: int = 200
  eval_every: int = 2
  patience: int = 5
  time_budget_s: float = 210.0


def _glorot(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  return jax.random.normal(key, shape) * np.sqrt(2.0 / sum(shape))


@functools.partial(jax.jit, static_argnames="cfg")
def init_sasrec(cfg: SASRecConfig, key: jax.Array) -> Params:
  """Glorot-normal weights (as the PyTorch port), zero biases, unit LayerNorms; row 0 (padding) of
  `item_emb [I + 1, d]` is zero."""
  d = cfg.dim
  keys = iter(jax.random.split(key, 2 + 5 * cfg.num_blocks))
  ln = lambda: {"scale": jnp.ones(d), "bias": jnp.zeros(d)}
  dense = lambda: {"w": _glorot(next(keys), (d, d)), "b": jnp.zeros(d)}
  item_emb = _glorot(next(keys), (cfg.num_items + 1, d)).at[0].set(0.0)
  blocks = [{"ln_attn": ln(), "q": dense(), "k": dense(), "v": dense(), "ln_ffn": ln(), "ffn1": dense(),
             "ffn2": dense()} for _ in range(cfg.num_blocks)]
  return {"item_emb": item_emb, "pos_emb": _glorot(next(keys), (cfg.max_len, d)), "blocks": blocks,
          "ln_final": ln()}


def _layer_norm(p: Params, x: jax.Array, eps: float = 1e-8) -> jax.Array:
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(p: Params, x: jax.Array) -> jax.Array:
  return x @ p["w"] + p["b"]


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def _attention(cfg: SASRecConfig, p: Params, q_btd: jax.Array, kv_btd: jax.Array, valid_bt: jax.Array,
               key: jax.Array | None) -> jax.Array:
  """Causal multi-head attention; keys at padding positions are masked (with a finite fill, so padding
  queries that see no valid key stay finite; they are zeroed afterwards)."""
  b, t, d = q_btd.shape
  h = cfg.num_heads
  split = lambda x: x.reshape(b, t, h, d // h)
  q_bthc, k_bthc, v_bthc = split(_dense(p["q"], q_btd)), split(_dense(p["k"], kv_btd)), split(_dense(p["v"], kv_btd))
  logits_bhts = jnp.einsum("bthc,bshc->bhts", q_bthc, k_bthc) / np.sqrt(d // h)
  allowed_bts = jnp.tril(jnp.ones((t, t), bool))[None] & valid_bt[:, None, :]
  logits_bhts = jnp.where(allowed_bts[:, None], logits_bhts, -1e9)
  weights_bhts = _dropout(jax.nn.softmax(logits_bhts, axis=-1), cfg.dropout, key)
  return jnp.einsum("bhts,bshc->bthc", weights_bhts, v_bthc).reshape(b, t, d)


def sasrec_hidden(cfg: SASRecConfig, params: Params, ids_bt: jax.Array, key: jax.Array | None = None
                  ) -> jax.Array:
  """`[B, T, d]` final hidden states of left-padded item sequences `ids_bt` (item i as i + 1, 0 =
  padding, T = max_len). `key=None` turns dropout off (evaluation)."""
  keys = iter([None] * (1 + 3 * cfg.num_blocks) if key is None else jax.random.split(key, 1 + 3 * cfg.num_blocks))
  valid_bt = ids_bt > 0
  mask_bt1 = valid_bt[..., None].astype(jnp.float32)
  x_btd = params["item_emb"][ids_bt] * np.sqrt(cfg.dim) + params["pos_emb"][None, -ids_bt.shape[1]:]
  x_btd = _dropout(x_btd, cfg.dropout, next(keys)) * mask_bt1
  for blk in params["blocks"]:
    q_btd = _layer_norm(blk["ln_attn"], x_btd)
    x_btd = q_btd + _attention(cfg, blk, q_btd, x_btd, valid_bt, next(keys))
    x_btd = _layer_norm(blk["ln_ffn"], x_btd)
    f_btd = _dropout(jax.nn.relu(_dense(blk["ffn1"], x_btd)), cfg.dropout, next(keys))
    x_btd = (x_btd + _dropout(_dense(blk["ffn2"], f_btd), cfg.dropout, next(keys))) * mask_bt1
  return _layer_norm(params["ln_final"], x_btd)


def sasrec_logits(cfg: SASRecConfig, params: Params, ids_bt: jax.Array, key: jax.Array | None = None
                  ) -> jax.Array:
  """`[B, T, I]` next-item logits at every position (tied to the item embeddings, padding excluded)."""
  return sasrec_hidden(cfg, params, ids_bt, key) @ params["item_emb"][1:].T


def sasrec_loss(cfg: SASRecConfig, params: Params, ids_bt: jax.Array, targets_bt: jax.Array, key: jax.Array
                ) -> jax.Array:
  """Mean full-softmax cross-entropy over positions with a target (`targets_bt` shifted ids, 0 = none)."""
  logits_bti = sasrec_logits(cfg, params, ids_bt, key)
  has_bt = targets_bt > 0
  ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_bti, jnp.maximum(targets_bt - 1, 0))
  return jnp.sum(jnp.where(has_bt, ce_bt, 0.0)) / jnp.maximum(has_bt.sum(), 1)


@functools.partial(jax.jit, static_argnames="cfg")
def sasrec_last_logits(cfg: SASRecConfig, params: Params, ids_bt: jax.Array) -> jax.Array:
  """`[B, I]` evaluation-mode logits of the item after each sequence (its last column)."""
  return sasrec_hidden(cfg, params, ids_bt)[:, -1] @ params["item_emb"][1:].T


# ----------------------------------------------------------------------------- SASRec data and training

def left_pad(seqs: Sequence[np.ndarray], width: int) -> np.ndarray:
  """`[N, width]` int32 shifted ids (item + 1) of each sequence's last `width` items, left-padded with 0."""
  out = np.zeros((len(seqs), width), np.int32)
  for n, s in enumerate(seqs):
    s = np.asarray(s, np.int64)[-width:] if width else np.zeros(0, np.int64)
    if len(s):
      out[n, width - len(s):] = s + 1
  return out


def training_chunks(train_seqs: Sequence[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`(inputs [N, max_len], targets [N, max_len])`: the rows of `pipeline.sequence_chunks` (every
  transition a target exactly once, as the LLM recommender trains) in shifted ids (item + 1, 0 on padding)."""
  rows = pipeline.sequence_chunks(train_seqs, max_len)
  shift = lambda ids: np.where(rows.attention_mask > 0, ids + 1, 0).astype(np.int32)
  return shift(rows.input_ids), shift(rows.target)


@functools.partial(jax.jit, static_argnames=("cfg", "learning_rate", "b2"))
def _train_epoch(cfg: SASRecConfig, learning_rate: float, b2: float, params: Params, opt_state: optax.OptState,
                 key: jax.Array, inputs_sbt: jax.Array, targets_sbt: jax.Array
                 ) -> tuple[Params, optax.OptState, jax.Array]:
  """S Adam steps scanned over `inputs/targets [S, B, T]`: `(params, opt_state, mean loss)`. Module-level,
  so every training of one shape and optimizer shares one compilation."""
  optimizer = optax.adam(learning_rate, b2=b2)

  def step(carry, batch):
    params, opt_state, key = carry
    key, sub = jax.random.split(key)
    loss, grads = jax.value_and_grad(lambda p: sasrec_loss(cfg, p, *batch, sub))(params)
    # Row 0 of the item embeddings is padding: keep it exactly zero (padded positions are also masked).
    grads["item_emb"] = grads["item_emb"].at[0].set(0.0)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, key), loss

  (params, opt_state, _), losses = jax.lax.scan(step, (params, opt_state, key), (inputs_sbt, targets_sbt))
  return params, opt_state, losses.mean()


def sasrec_scorer(cfg: SASRecConfig, params: Params, *, batch_size: int = 256) -> ScoreFn:
  """Scores from the last column of each history's last `max_len` items, in fixed `[batch_size, T]`
  batches (one compiled shape)."""

  def score(users: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
    ids_nt = left_pad(histories, cfg.max_len)
    out = []
    for s in range(0, len(ids_nt), batch_size):
      chunk = ids_nt[s:s + batch_size]
      padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0)))
      out.append(np.asarray(sasrec_last_logits(cfg, params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, cfg.num_items), np.float32)

  return score


def train_sasrec(split: Split, num_items: int, *, seed: int = 0, model: SASRecConfig | None = None,
                 train: TrainConfig = TrainConfig(), log: Callable[[str], None] | None = None) -> Fitted:
  """Trains SASRec on `split.train` and keeps the weights of the best validation ndcg@10 (see the module
  docstring). Reproducible for a seed (shuffling and dropout keys are seeded). info: epochs, best_epoch,
  valid_ndcg@10, chunks, seconds, stopped ("patience", "time" or "max_epochs")."""
  start = time.perf_counter()
  cfg = model or SASRecConfig(num_items)
  if cfg.num_items != num_items:
    raise ValueError(f"model has {cfg.num_items} items, data {num_items}")
  inputs_nt, targets_nt = training_chunks(split.train, cfg.max_len)
  n, b = len(inputs_nt), train.batch_size
  if n == 0:
    raise ValueError("no training sequence has two items")
  steps = -(-n // b)
  rng = np.random.default_rng(seed)
  key_init, key_train = jax.random.split(jax.random.key(seed))
  params = init_sasrec(cfg, key_init)
  opt_state = optax.adam(train.learning_rate, b2=train.b2).init(params)
  best = (-1.0, 0, params)
  stale, stopped, epoch = 0, "max_epochs", 0
  for epoch in range(1, train.max_epochs + 1):
    epoch_start = time.perf_counter()
    # Padding rows (all-zero targets) fill the last batch and carry no loss.
    order = np.concatenate([rng.permutation(n), np.full(steps * b - n, -1)])
    pick = lambda a: np.where(order[:, None] >= 0, a[np.maximum(order, 0)], 0).reshape(steps, b, -1)
    params, opt_state, loss = _train_epoch(cfg, train.learning_rate, train.b2, params, opt_state,
                                           jax.random.fold_in(key_train, epoch), pick(inputs_nt), pick(targets_nt))
    loss = float(loss)  # waits for the epoch (dispatch is asynchronous), so its duration is measured
    now = time.perf_counter()
    elapsed = now - start
    out_of_time = elapsed + (now - epoch_start) > train.time_budget_s  # another epoch would overrun
    if epoch % train.eval_every == 0 or epoch == train.max_epochs or out_of_time:
      ndcg = split_ndcg(split, num_items, sasrec_scorer(cfg, params))
      if log:
        log(f"sasrec epoch {epoch}: loss {loss:.4f} valid ndcg@{TUNE_K} {ndcg:.4f} ({elapsed:.0f}s)")
      if ndcg > best[0]:
        best, stale = (ndcg, epoch, params), 0
      else:
        stale += 1
      if stale >= train.patience:
        stopped = "patience"
        break
    if out_of_time:
      stopped = "time"
      break
  info = {"epochs": epoch, "best_epoch": best[1], f"valid_ndcg@{TUNE_K}": best[0], "chunks": n,
          "seconds": time.perf_counter() - start, "stopped": stopped}
  return Fitted(sasrec_scorer(cfg, best[2]), info)

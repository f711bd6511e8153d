"""Conventional reference recommenders: most-popular, item-kNN and SASRec (full-softmax cross-entropy).

They are the quality bar of DESIGN.md §6: every comparison reports them on the same split, users and
masking as the LLM evaluation. Each baseline is fitted on the users' training sequences
(`split.train[u]`) and turned into a `ScoreFn(users [U], histories) -> scores [U, I]` (higher is
better); `federated.evaluation.score_baseline` ranks those scores with the evaluation's own exclusions
and metrics, and `eval_histories` gives the histories it passes.

Histories (oldest first): for "valid" the user's training sequence, for "test" the training sequence
followed by their validation targets (what a sequential model would have seen before the test item).

item-kNN (item-based CF, Sarwar et al. 2001): cosine similarity between the items' binary user columns
of the training matrix; a user's score for a candidate item j is the sum of sim(j, i) over the distinct
history items i among j's k most similar items. (Keeping each history item's k neighbours instead
scored lower on ml-latest-small: test ndcg@10 0.031 against 0.037.) k is tuned by validation ndcg@10
over `KNN_KS`.

SASRec (Kang & McAuley 2018), as their released code: item embeddings (id 0 = padding, so item i is
row i + 1) scaled by sqrt(d) plus learned positions, dropout, then blocks of
  x = LN(x); x = x + Attn(q=x, kv=x_before_LN) (causal, padding keys masked, dropout on the weights);
  x = LN(x); x = x + FFN(x) (d -> d ReLU -> d, dropout);  x *= not-padding
and a final LN. The residuals add the normalized inputs, as the original does. Logits are tied to the
item embeddings (padding excluded). Training: full-softmax cross-entropy over all items at every
non-padding position of every training chunk (each user's training sequence cut from the end into
`max_len + 1`-item chunks, so all transitions are used), Adam (lr 3e-3, batch 128), epochs chosen by
validation ndcg@10 with patience inside a time budget (`TrainConfig`); the best epoch's weights are kept.

Memory: item-kNN holds dense `[I, I]` float32 similarities (ml-latest-small: 53 MB), SASRec's logits
are `[B, T, I]` per step (B=128, T=50, I=3,650: 93 MB).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fellrec_jax import metrics
from fellrec_jax.data import pipeline
from fellrec_jax.data.preprocess import Split

NAMES = ("most_popular", "item_knn", "sasrec")
KNN_KS = (10, 20, 50, 100, 200, None)  # None: every item's full similarity row
TUNE_K = 10  # validation ndcg@TUNE_K chooses item-kNN's k and SASRec's epoch

ScoreFn = Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Fitted:
  """A fitted baseline: `score(users [U], histories) -> [U, I]` float32 and facts about the fit (chosen
  k, epochs, validation ndcg, seconds)."""

  score: ScoreFn
  info: dict[str, Any]


# ----------------------------------------------------------------------------- histories and tuning

def eval_histories(split: Split, users: Sequence[int], part: str) -> list[np.ndarray]:
  """Per user (oldest first): `train[u]` for "valid"; `train[u] ++ valid_targets[u]` for "test"."""
  if part not in ("valid", "test"):
    raise ValueError(f"part must be 'valid' or 'test', got {part!r}")
  if part == "valid":
    return [np.asarray(split.train[u], np.int32) for u in users]
  return [np.concatenate([split.train[u], split.valid_targets[u]]).astype(np.int32) for u in users]


def _excluded(split: Split, u: int, part: str) -> np.ndarray:
  """As `federated.evaluation.excluded_items`: eval history ∪ train (∪ valid targets for "test")."""
  hist = split.valid_history[u] if part == "valid" else split.test_history[u]
  parts = [hist, split.train[u]] + ([split.valid_targets[u]] if part == "test" else [])
  return np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts]))


def split_ndcg(split: Split, num_items: int, score: ScoreFn, part: str = "valid", *, k: int = TUNE_K,
               batch_size: int = 512) -> float:
  """Mean ndcg@k of `score` over every user with a `part` target (full ranking, the evaluation's
  exclusions), used to tune the baselines on "valid"."""
  targets = split.valid_targets if part == "valid" else split.test_targets
  users = np.asarray([u for u in range(split.num_users) if len(targets[u])], np.int64)
  values = []
  for s in range(0, len(users), batch_size):
    batch = users[s:s + batch_size]
    exclude_ui = metrics.exclusion_mask([_excluded(split, u, part) for u in batch], num_items)
    ranked, _ = metrics.top_k(score(batch, eval_histories(split, batch, part)), exclude_ui, min(k, num_items))
    values.append(metrics.user_metrics(np.asarray(ranked), [targets[u] for u in batch], (k,))[f"ndcg@{k}"])
  return float(np.concatenate(values).mean()) if values else 0.0


# ----------------------------------------------------------------------------- most popular

def most_popular(train_seqs: Sequence[np.ndarray], num_items: int) -> ScoreFn:
  """Every user scores items by their training interaction counts (`metrics.popularity`)."""
  pop_i = metrics.popularity(train_seqs, num_items)
  return lambda users, histories: np.broadcast_to(pop_i, (len(users), num_items))


# ----------------------------------------------------------------------------- item-kNN

def binary_matrix(seqs: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[U, I]` float32, 1 where the user's sequence holds the item (repeats count once)."""
  return metrics.exclusion_mask(seqs, num_items).astype(np.float32)


def cosine_similarity(train_seqs: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """`[I, I]` float32 cosine similarity of the items' binary user columns, |U_i ∩ U_j| / sqrt(|U_i| |U_j|),
  with a zero diagonal (an item is not its own neighbour) and zero rows for unseen items."""
  x_ui = binary_matrix(train_seqs, num_items)
  co_ii = x_ui.T @ x_ui
  norm_i = np.sqrt(np.diag(co_ii))
  inv_i = np.divide(1.0, norm_i, out=np.zeros_like(norm_i), where=norm_i > 0)
  sim_ii = co_ii * inv_i[:, None] * inv_i[None, :]
  np.fill_diagonal(sim_ii, 0.0)
  return sim_ii.astype(np.float32)


def neighbour_order(sim_ii: np.ndarray) -> np.ndarray:
  """`[I, I]` each row's columns by decreasing similarity (ties: lower id first)."""
  return np.argsort(-sim_ii, axis=1, kind="stable")


def top_k_neighbours(sim_ii: np.ndarray, k: int | None, order_ii: np.ndarray | None = None) -> np.ndarray:
  """`[I, I]` similarities with only each row's k largest kept (row j: candidate j's neighbours);
  k=None keeps all."""
  if k is None or k >= sim_ii.shape[1]:
    return sim_ii
  order_ii = neighbour_order(sim_ii) if order_ii is None else order_ii
  keep_ik = order_ii[:, :k]
  out = np.zeros_like(sim_ii)
  np.put_along_axis(out, keep_ik, np.take_along_axis(sim_ii, keep_ik, axis=1), axis=1)
  return out


def knn_scorer(sim_k_ii: np.ndarray) -> ScoreFn:
  """score(u, j) = sum over the distinct items i of u's history of sim_k[j, i] (row j: candidate j's
  kept neighbours)."""
  num_items = sim_k_ii.shape[0]
  weight_ij = np.ascontiguousarray(sim_k_ii.T)  # history item i's weight for candidate j
  return lambda users, histories: binary_matrix(histories, num_items) @ weight_ij


def item_knn_scores(train_seqs: Sequence[np.ndarray], num_items: int, *, k: int | None) -> ScoreFn:
  """Item-kNN with a fixed k (None: all neighbours); see `knn_scorer`."""
  return knn_scorer(top_k_neighbours(cosine_similarity(train_seqs, num_items), k))


def fit_item_knn(split: Split, num_items: int, *, ks: Sequence[int | None] = KNN_KS) -> Fitted:
  """Item-kNN with k chosen by validation ndcg@10 (the first best on ties). info: k, valid_ndcg@10 per
  k, seconds."""
  start = time.perf_counter()
  sim_ii = cosine_similarity(split.train, num_items)
  order_ii = neighbour_order(sim_ii)
  scores = {k: split_ndcg(split, num_items, knn_scorer(top_k_neighbours(sim_ii, k, order_ii))) for k in ks}
  best = max(ks, key=lambda k: scores[k])  # max keeps the first of equal values
  info = {"k": "all" if best is None else best,
          f"valid_ndcg@{TUNE_K}": {("all" if k is None else str(k)): v for k, v in scores.items()},
          "seconds": time.perf_counter() - start}
  return Fitted(knn_scorer(top_k_neighbours(sim_ii, best, order_ii)), info)


# ----------------------------------------------------------------------------- SASRec model

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


# ----------------------------------------------------------------------------- all together

def fit_baselines(split: Split, num_items: int, names: Sequence[str] = NAMES, *, seed: int = 0,
                  knn_ks: Sequence[int | None] = KNN_KS, sasrec_model: SASRecConfig | None = None,
                  sasrec_train: TrainConfig = TrainConfig(), log: Callable[[str], None] | None = None
                  ) -> dict[str, Fitted]:
  """Fits the named baselines (a subset of `NAMES`, in that order) on `split.train`."""
  unknown = set(names) - set(NAMES)
  if unknown:
    raise ValueError(f"unknown baselines {sorted(unknown)} (expected some of {NAMES})")
  out: dict[str, Fitted] = {}
  for name in (n for n in NAMES if n in names):
    if name == "most_popular":
      out[name] = Fitted(most_popular(split.train, num_items), {})
    elif name == "item_knn":
      out[name] = fit_item_knn(split, num_items, ks=knn_ks)
    else:
      out[name] = train_sasrec(split, num_items, seed=seed, model=sasrec_model, train=sasrec_train, log=log)
    if log:
      log(f"{name}: {_brief(out[name].info)}")
  return out


def _brief(info: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                   if not isinstance(v, dict))

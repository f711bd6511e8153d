"""The federated round loop: sample, train locally (vmapped, split), aggregate, validate, checkpoint.

All per-client state is stacked on a leading clients axis and sharded over the mesh's `clients` axis;
the frozen base weights are shared by every client and sharded over `model`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging

import models
from fellrec_jax import checkpoint, privacy, sharding
from fellrec_jax import config as config_lib
from fellrec_jax.config import ConfigError, Diverged, RunConfig
from fellrec_jax.data import pipeline
from federated import client, cut_defense, losses, optimizer, round_memory, strategies

PyTree = Any


@flax.struct.dataclass
class FedState:
  """Everything a round updates. Leaves of `lora`, `opt_state`, `best_lora` carry the clients axis;
  `best_lora` is None with `--keep_best=false` (the last adapters are the ones evaluated)."""

  lora: PyTree
  opt_state: PyTree
  best_lora: PyTree
  best_valid: jax.Array  # [C] the selection criterion of best_lora, lower is better (loss or -metric); +inf first

  @property
  def evaluated_lora(self) -> PyTree:
    """The adapters a run evaluates: each client's best, or with `--keep_best=false` its last."""
    return self.lora if self.best_lora is None else self.best_lora


def make_optimizer(cfg: RunConfig, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warmup then linear decay to zero over the whole run (per client), its moments
  stored in `--moments_dtype`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, warmup) if warmup else optax.constant_schedule(cfg.learning_rate),
       optax.linear_schedule(cfg.learning_rate, 0.0, max(total_steps - warmup, 1))], [warmup])
  return optimizer.adamw(schedule, cfg.weight_decay, cfg.moments_dtype)


def init_item_table(item_emb: np.ndarray, rank: int, rng: jax.Array) -> dict[str, jax.Array]:
  """A client's trainable item side: the whole `[I, D]` table from the title embeddings (rank 0), or a
  low-rank correction `u_ir @ v_rd` of the frozen embeddings, LoRA-style (v = 0: it starts at the
  embeddings), which leaves the rare items' vectors little to overfit."""
  if rank == 0:
    return {"table_id": jnp.asarray(item_emb, jnp.float32)}
  num_items, dim = item_emb.shape
  return {"u_ir": jax.random.normal(rng, (num_items, rank), jnp.float32) / np.sqrt(rank),
          "v_rd": jnp.zeros((rank, dim), jnp.float32)}


def micro_batches_per_round(cfg: RunConfig, epoch_steps: int) -> int:
  """Micro-batches in one local round: `local_epochs` of the largest client's `epoch_steps`, whole
  optimizer steps of `grad_accum` micro-batches, at least one."""
  return cfg.grad_accum * max(1, int(np.ceil(cfg.local_epochs * epoch_steps / cfg.grad_accum)))


def stack_clients(tree: PyTree, num_clients: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *x.shape)), tree)


def round_batches(batch_iter, num_micro: int, grad_accum: int, participating: np.ndarray) -> dict[str, np.ndarray]:
  """Draws `num_micro` lockstep micro-batches `[C, B, ...]` -> `[C, S, A, B, ...]`; absent clients masked."""
  draws = [next(batch_iter)[0] for _ in range(num_micro)]
  out = {}
  for key in draws[0]:
    x = np.stack([d[key] for d in draws], axis=1)  # [C, S*A, B, ...]
    x = x.reshape(x.shape[0], num_micro // grad_accum, grad_accum, *x.shape[2:])
    if key.endswith("mask"):
      x = x * participating.reshape(-1, *([1] * (x.ndim - 1))).astype(x.dtype)
    out[key] = x
  return out


def heldout_batches(examples: Sequence[pipeline.ClientExamples], batch_size: int) -> dict[str, np.ndarray]:
  """All held-out examples of every client as `[C, S, B, T]` (fixed order)."""
  steps = list(pipeline.epoch_batches(examples, batch_size=batch_size, seed=0, epoch=0))
  return {k: np.stack([s[k] for s in steps], axis=1) for k in steps[0]}


def make_heldout_loss(spec: client.LocalSpec, loss_fn=losses.generative_loss):
  """`(base, lora_c, batches [C, S, ...]) -> (mean loss [C], count [C])` of each client's own adapter."""
  def one_client(base, lora, batches):
    base = client.with_round_items(spec, base, lora)

    def step(carry):  # up to the client's last step with an example, as `client.make_local_update`
      i, loss_sum, count = carry
      step_loss, step_count = client.forward_loss(spec, base, lora, jax.tree.map(lambda x: x[i], batches),
                                                  loss_fn=loss_fn)
      return i + 1, loss_sum + step_loss, count + step_count
    last = client.last_step_with_examples(batches["example_mask"])
    _, loss_sum, count = jax.lax.while_loop(lambda c: c[0] < last, step,
                                            (jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(())))
    return loss_sum / jnp.maximum(count, 1.0), count
  return jax.vmap(one_client, in_axes=(None, 0, 0))


@dataclasses.dataclass
class Engine:
  """Jitted pieces of one run, bound to a mesh, a model, a strategy and the clients' data."""

  cfg: RunConfig
  model_config: models.ModelConfig
  base: PyTree
  train_examples: Sequence[pipeline.ClientExamples]
  valid_examples: Sequence[pipeline.ClientExamples]
  strategy: strategies.Strategy
  mesh: jax.sharding.Mesh
  cuts: Sequence[int | None]  # each training client's split k (None: unsplit)
  loss_fn: Callable = losses.generative_loss  # (model outputs, batch, item vectors) -> (loss sum, count)
  hidden: bool = False  # the loss takes final hidden states rather than logits
  item_side: str | None = None  # see `client.LocalSpec`
  item_tokens: bool = False
  item_table: np.ndarray | None = None  # [I, D] initial trainable item table (item_side="table")
  # [C, I] each client's training count of each item: a trainable table's rows are mixed by them
  # (`strategies.mix`); None mixes the table like the adapters
  item_counts: np.ndarray | None = None
  frozen_head: bool = False  # no adapters on each client's head blocks [0, k) (`--cache_head`)
  # `(lora_c) -> [C]` validation ranking metric of each client's adapter (higher is better); None selects
  # each client's best adapter by held-out loss instead
  valid_metric: Callable[[PyTree], np.ndarray] | None = None

  def __post_init__(self):
    cfg, C = self.cfg, len(self.train_examples)
    self.num_clients = C
    self.train_counts = np.asarray([len(ex) for ex in self.train_examples], np.float32)
    self.valid_counts = np.asarray([len(ex) for ex in self.valid_examples], np.float32)
    epoch_steps = int(pipeline.steps_per_epoch(self.train_examples, cfg.batch_size).max())
    self.micro_per_round = micro_batches_per_round(cfg, epoch_steps)
    self.steps_per_round = self.micro_per_round // cfg.grad_accum
    self.tx = make_optimizer(cfg, cfg.rounds * self.steps_per_round)
    self.base_shardings = sharding.shared(self.mesh, self.base)
    self.base = sharding.put(self.base, self.base_shardings)
    per_client = sharding.over_clients(self.mesh, C)
    self._update_fns: dict[int | None, Callable] = {}
    self._heldout = jax.jit(make_heldout_loss(self.spec(None), self.loss_fn),
                            in_shardings=(self.base_shardings, per_client, per_client), out_shardings=per_client)
    self._aggregate = jax.jit(self._aggregate_impl, out_shardings=per_client)
    self.privatize = jax.jit(privacy.privatize_uploads, static_argnums=(3, 4))
    valid = heldout_batches(self.valid_examples, cfg.eval_batch_size)
    self.valid_batches = sharding.put(valid, sharding.per_client(self.mesh, valid))

  def spec(self, k: int | None) -> client.LocalSpec:
    """The local step of a client cut at k (None: unsplit)."""
    return client.LocalSpec(self.model_config, split_k=k, server_lora=self.cfg.server_lora, hidden=self.hidden,
                            item_side=self.item_side, item_tokens=self.item_tokens,
                            defense=cut_defense.defense_of(self.cfg))

  # ------------------------------------------------------------------ state

  def init_state(self, rng: jax.Array) -> FedState:
    """Every client starts from the same fresh adapter (B = 0), so FedAvg starts from a common model."""
    lora = models.init_lora(self.model_config, rng)
    if self.item_side == "table":  # a trainable item table starts from the base-model title embeddings
      lora["items"] = init_item_table(self.item_table, self.cfg.item_table_rank, jax.random.fold_in(rng, 1))
    if self.cfg.item_ids:  # item-ID embeddings start at zero: the model starts as the text-only one
      lora.setdefault("items", {})["embed_id"] = jnp.zeros(self.base["items"]["input_id"].shape, jnp.float32)
    lora = stack_clients(lora, self.num_clients)
    if self.frozen_head:  # A = B = 0 on blocks [0, k): no gradient ever reaches them, nothing is mixed in
      layers = np.arange(self.model_config.num_layers)
      live = jnp.asarray(layers[None, :] >= np.asarray(self.cuts)[:, None], jnp.float32)  # [C, L]
      lora["blocks"] = jax.tree.map(lambda x: x * live.reshape(*live.shape, *[1] * (x.ndim - 2)), lora["blocks"])
    opt_state = jax.vmap(self.tx.init)(lora)
    # best_lora gets its own buffers: a round updates lora's in place (donated to `_update_fn`)
    state = FedState(lora=lora, opt_state=opt_state,
                     best_lora=jax.tree.map(jnp.copy, lora) if self.cfg.keep_best else None,
                     best_valid=jnp.full((self.num_clients,), jnp.inf))
    return sharding.put(state, sharding.per_client(self.mesh, state))

  # ------------------------------------------------------------------ local training

  def _update_fn(self, k: int | None, num_clients: int) -> Callable:
    """The jitted (or, for "sequential", per-client-jitted) local update of `num_clients` clients cut at k."""
    if (k, num_clients) not in self._update_fns:
      local = client.make_local_update(self.spec(k), self.tx, self.strategy.local_penalty, self.loss_fn)
      run = client.over_clients(local, self.cfg.client_execution, self.cfg.client_group_size,
                                shards=self.mesh.shape[sharding.CLIENTS])
      if self.cfg.client_execution == "vmap":  # inputs and outputs pinned: per-client state stays split
        per_client = sharding.over_clients(self.mesh, num_clients)
        # Adapters and optimizer state are donated: the grouped loop then writes each group's new state
        # into the input buffers. With the adapters kept (the round's anchor), XLA also copied the donated
        # moments into the loop and back out (2x the adapters per client); the caller keeps the anchor.
        run = jax.jit(run, in_shardings=(self.base_shardings, *[per_client] * 4), out_shardings=per_client,
                      donate_argnums=(1, 2))
      self._update_fns[(k, num_clients)] = run
    return self._update_fns[(k, num_clients)]

  def local_training(self, state: FedState, batches: dict[str, np.ndarray], rng: jax.Array):
    """Runs every client's local round, grouping clients that share a cut k. Returns (state, stats [C]).
    `state.lora` and `state.opt_state` are donated (updated in place): copy what must outlive the call."""
    keys = jax.random.key_data(jax.random.split(rng, self.num_clients))
    batches = sharding.put(batches, sharding.per_client(self.mesh, batches))
    keys = sharding.put(keys, sharding.per_client(self.mesh, keys))
    if len(set(self.cuts)) == 1:  # the common case: one program over all clients, no regrouping
      lora, opt_state, stats = self._update_fn(self.cuts[0], self.num_clients)(
          self.base, state.lora, state.opt_state, batches, jax.random.wrap_key_data(keys))
      return state.replace(lora=lora, opt_state=opt_state), stats
    lora, opt_state, stats = state.lora, state.opt_state, None
    for k in sorted(set(self.cuts), key=lambda x: -1 if x is None else x):
      idx = np.asarray([c for c in range(self.num_clients) if self.cuts[c] == k])
      take = lambda tree: jax.tree.map(lambda x: x[idx], tree)
      group = (take(lora), take(opt_state), take(batches), jax.random.wrap_key_data(keys[idx]))
      new_lora, new_opt, group_stats = self._update_fn(k, len(idx))(self.base, *group)
      put = lambda full, part: jax.tree.map(lambda f, p: f.at[idx].set(p), full, part)
      lora, opt_state = put(lora, new_lora), put(opt_state, new_opt)
      stats = jax.tree.map(lambda p: jnp.zeros((self.num_clients,), p.dtype), group_stats) if stats is None else stats
      stats = put(stats, group_stats)
    return state.replace(lora=lora, opt_state=opt_state), stats

  # ------------------------------------------------------------------ aggregation

  def _aggregate_impl(self, lora, losses, weights, participating, round_index, anchor):
    rows = {} if self.item_counts is None else {"item_counts": jnp.asarray(self.item_counts)}
    last = self.model_config.num_layers - 1  # --fellrec_private_tail: the client-tail block's adapters stay private
    tail_kept = lambda tree: dict(tree, blocks=jax.tree.map(lambda x: x[:, :last], tree["blocks"]))
    shared = ((lambda tree: None if tree is None else tail_kept(tree))  # an anchor nothing reads is None
              if self.cfg.fellrec_private_tail else (lambda tree: tree))
    mixed, info = self.strategy.aggregate(shared(lora), losses, weights, participating, round_index, shared(anchor),
                                          **rows)
    if self.cfg.server_lr != 1.0 and self.strategy.shares:
      # FedOpt's server step: each client moves server_lr times as far toward its aggregate. An average of
      # C clients' few local steps moves about as far as one client's steps, not C clients' worth.
      step = lambda m, a: (a.astype(jnp.float32) + self.cfg.server_lr * (m.astype(jnp.float32) - a)).astype(m.dtype)
      mixed = jax.tree.map(step, mixed, shared(anchor))
    if self.cfg.fellrec_private_tail:
      blocks = jax.tree.map(lambda m, x: jnp.concatenate([m, x[:, last:]], axis=1), mixed["blocks"], lora["blocks"])
      mixed = dict(mixed, blocks=blocks)
    return mixed, info

  def aggregate(self, state: FedState, losses, participating: np.ndarray, round_index: int,
                anchor) -> tuple[FedState, dict]:
    """Mixes the adapters; `anchor` are the adapters each client started the round from. Returns the
    state and the strategy's diagnostics for the round's log (`round_info`)."""
    lora, info = self._aggregate(state.lora, losses, jnp.asarray(self.train_counts), jnp.asarray(participating),
                                 round_index, anchor)
    return state.replace(lora=lora), round_info(sharding.to_host(info))

  # ------------------------------------------------------------------ validation

  def validate(self, state: FedState) -> tuple[FedState, dict[str, np.ndarray]]:
    """Held-out loss of each client's current adapter and, with `valid_metric`, its validation ranking
    metric; keeps each client's best adapter by `--select_by`. Returns (state, {"loss": [C], ["metric": [C]]})."""
    loss, _ = self._heldout(self.base, state.lora, self.valid_batches)
    out = {"loss": np.asarray(sharding.to_host(loss))}
    if self.valid_metric is not None:
      out["metric"] = np.asarray(self.valid_metric(state.lora), np.float64)
    criterion = jnp.asarray(-out["metric"] if "metric" in out else out["loss"], jnp.float32)
    improved = criterion < state.best_valid
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(improved.reshape(-1, *[1] * (n.ndim - 1)), n, o),
                                         new, old)
    best_lora = None if state.best_lora is None else keep(state.lora, state.best_lora)
    return state.replace(best_lora=best_lora, best_valid=jnp.where(improved, criterion, state.best_valid)), out

  @property
  def needs_anchor(self) -> bool:
    """Whether the round's starting adapters are read after local training (DP clips the update, a server
    step or an update-based similarity measures it): else no copy of them is made."""
    return (self.cfg.dp_clip is not None or self.strategy.reads_anchor
            or (self.cfg.server_lr != 1.0 and self.strategy.shares))

  def participants(self, round_index: int) -> np.ndarray:
    """[C] bool: the clients sampled this round (seeded by (seed, round), so resumes agree)."""
    if self.cfg.clients_per_round is None or self.cfg.clients_per_round >= self.num_clients:
      return np.ones(self.num_clients, bool)
    chosen = np.random.default_rng([self.cfg.seed, round_index]).choice(
        self.num_clients, self.cfg.clients_per_round, replace=False)
    return np.isin(np.arange(self.num_clients), chosen)


def run_rounds(engine: Engine, workdir: str, *, on_round: Callable[[dict], None] = lambda log: None,
               progress: str | None = None):
  """The loop, resuming from `workdir`'s latest checkpoint. Returns `(state, history)`.

  `progress` names a progress bar over rounds (shown on the main process only).
  """
  cfg = engine.cfg
  mngr = checkpoint.manager(workdir)
  state = engine.init_state(jax.random.key(cfg.seed))
  meta = {"round": 0, "data": {"seed": cfg.seed, "epoch": 0, "step": 0}, "history": [], "bad_evals": 0,
          "best_mean_valid": float("inf"), "config": config_lib.as_json(cfg)}

  def check_config(saved: dict) -> None:
    if "config" not in saved:
      logging.warning("the checkpoint in %s stores no configuration (an older version wrote it): not checked", workdir)
      return
    blocking, free = config_lib.resume_changes(saved["config"], cfg)
    if blocking:
      raise ConfigError(f"--workdir={workdir} holds a run trained with other settings: {'; '.join(blocking)}. "
                        "Resume with the checkpoint's values or pass another --workdir")
    if free:
      logging.info("resuming with settings that do not change training: %s", "; ".join(free))

  restored = checkpoint.restore_latest(mngr, state, check_config)
  if restored is not None:
    _, state, saved = restored
    meta |= {k: v for k, v in saved.items() if k != "config"}
    logging.info("resumed from %s at round %d", mngr.directory, meta["round"])
  round_memory.check_memory_fits(engine, state)  # before the first compile: refuse a round that will not fit
  batch_iter = pipeline.iterate(engine.train_examples, batch_size=cfg.batch_size, state=meta["data"])
  history = list(meta["history"])

  bar = tqdm.tqdm(total=cfg.rounds, initial=meta["round"], desc=progress, unit="round",
                  disable=progress is None or jax.process_index() != 0)
  for r in range(meta["round"], cfg.rounds):
    if r in cfg.profile_rounds:
      jax.profiler.start_trace(f"{workdir}/profile")
    start = time.perf_counter()
    participating = engine.participants(r)
    batches = round_batches(_tracking(batch_iter, meta), engine.micro_per_round, cfg.grad_accum, participating)
    round_key = jax.random.fold_in(jax.random.key(cfg.seed), r)
    # local_training updates state.lora in place: what reads the starting adapters later needs a copy
    anchor = jax.tree.map(jnp.copy, state.lora) if engine.needs_anchor else None
    train_start = time.perf_counter()
    state, stats = engine.local_training(state, batches, round_key)
    stats = sharding.to_host(stats)
    train_seconds = time.perf_counter() - train_start
    losses = privacy.uploaded_losses(stats["loss"], jax.random.fold_in(round_key, 2), cfg.loss_upload_noise,
                                     cfg.loss_upload_step)  # what the warm weights see
    dp_norms = None
    if cfg.dp_clip is not None:  # clients upload clipped, noised updates; aggregation only sees those
      lora, dp_norms = engine.privatize(state.lora, anchor, jax.random.fold_in(round_key, 1), cfg.dp_clip,
                                        cfg.dp_noise_multiplier, jnp.asarray(participating))
      state = state.replace(lora=lora)
    diverged = np.asarray(stats["nonfinite_steps"]) > 0
    if diverged.any():
      logging.warning("round %d: client(s) %s hit a non-finite loss, gradient or adapter in %s of their steps; "
                      "those steps were skipped (adapters and optimizer state stay at the last finite step) and "
                      "the clients are left out of this round's aggregation", r, np.flatnonzero(diverged).tolist(),
                      np.asarray(stats["nonfinite_steps"])[diverged].astype(int).tolist())
    if participating.any() and (diverged | ~participating).all():
      raise Diverged(f"round {r}: every participating client's training went non-finite (NaN/inf loss, gradients or "
                     f"adapters). Lower --learning_rate (now {cfg.learning_rate:g}); also check --warmup_steps, "
                     f"--server_lr, --fellrec_beta and --dtype (now {cfg.dtype})")
    log = {"round": r, "participating": participating.tolist(), "train_loss": np.asarray(stats["loss"]).tolist(),
           "uploaded_loss": losses.tolist(),  # the warm weights' input (--loss_upload_noise/_step)
           "bytes_up": float(np.sum(stats["bytes_up"])), "bytes_down": float(np.sum(stats["bytes_down"])),
           "local_steps": np.asarray(stats["steps"]).tolist(), "diverged": diverged.tolist(),
           # the real (unpadded) input tokens every client trained on; the seconds include a first round's compile
           "train_tokens": int(np.sum(batches["attention_mask"])), "train_seconds": train_seconds}
    if dp_norms is not None:
      log["dp_update_norm"] = sharding.to_host(dp_norms).tolist()
    state, info = engine.aggregate(state, losses, participating & ~diverged, r, anchor)
    log |= info
    if (r + 1) % cfg.eval_every == 0 or r + 1 == cfg.rounds:
      state, valid = engine.validate(state)
      weights = np.maximum(engine.valid_counts, 1e-9)
      log["valid"] = {"loss": valid["loss"].tolist(), "mean_loss": float(np.average(valid["loss"], weights=weights))}
      criterion = log["valid"]["mean_loss"]
      if "metric" in valid:  # clients without validation users score 0 and weigh 0
        name = cfg.selection_metric
        log["valid"] |= {name: valid["metric"].round(6).tolist(),
                         f"mean_{name}": float(np.average(valid["metric"], weights=weights))}
        criterion = -log["valid"][f"mean_{name}"]
      improved = criterion < meta["best_mean_valid"]
      meta["best_mean_valid"] = min(criterion, meta["best_mean_valid"])
      meta["bad_evals"] = 0 if improved else meta["bad_evals"] + 1
    jax.block_until_ready(state)
    log["seconds"] = time.perf_counter() - start
    if r in cfg.profile_rounds:
      jax.profiler.stop_trace()
      logging.info("round %d traced into %s/profile", r, workdir)
    history.append(log)
    meta |= {"round": r + 1, "history": history}
    stop = cfg.patience is not None and meta["bad_evals"] >= cfg.patience
    if (r + 1) % cfg.checkpoint_every == 0 or r + 1 == cfg.rounds or stop:
      checkpoint.save(mngr, r + 1, state, meta)
    on_round(log)
    bar.update()
    bar.set_postfix(train_loss=f"{np.mean(log['train_loss']):.3f}")
    if stop:
      logging.info("early stop after round %d: no validation improvement in %d evaluations", r, cfg.patience)
      break
  bar.close()
  return state, history


MAX_LOGGED_MATRIX = 64  # clients up to which a [C, C] diagnostic is logged whole each round


def round_info(info: dict[str, np.ndarray]) -> dict:
  """A strategy's diagnostics as JSON for the round's log. `[C, C]` matrices (FELLRec's similarity) are
  logged whole up to MAX_LOGGED_MATRIX clients; above that, as `<name>_offdiag` {mean, min, max} (a C^2
  list per round would swamp metrics.jsonl and the checkpointed history)."""
  out = {}
  for name, x in info.items():
    x = np.asarray(x, np.float64)
    if x.ndim == 2 and x.shape[0] > MAX_LOGGED_MATRIX:
      off = x[~np.eye(x.shape[0], dtype=bool)]
      out[f"{name}_offdiag"] = {"mean": float(off.mean()), "min": float(off.min()), "max": float(off.max())}
    else:
      out[name] = x.round(4).tolist()
  return out


def _tracking(batch_iter, meta: dict):
  """Yields from `batch_iter` while recording its resume state in `meta["data"]`."""
  while True:
    batch, next_state = next(batch_iter)
    meta["data"] = next_state
    yield batch, next_state

"""One experiment: data -> model -> federated rounds per strategy -> test evaluation -> results.json."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

import models
from fellrec_jax import sharding
from fellrec_jax.config import ConfigError, RunConfig
from fellrec_jax.data import examples, pipeline, prepare_dataset
from models.tokenizer import pad_rows
from models.warm_start import fit_causal_lm
from federated import engine as engine_lib
from federated import strategies


def prepare(cfg: RunConfig):
  return prepare_dataset(
      cfg.dataset, cfg.data_dir, num_clients=cfg.num_clients, partition=cfg.partition, split=cfg.split,
      seed=cfg.seed, history_len=cfg.history_len, k_core=cfg.k_core, min_rating=cfg.min_rating,
      max_train_samples=cfg.max_train_samples, dirichlet_alpha=cfg.dirichlet_alpha,
      mapping_file=cfg.mapping_file, skip_bad_lines=cfg.skip_bad_lines, bpr_steps=cfg.bpr_steps)


def load_model(cfg: RunConfig, titles: list[str]):
  """`(model_config, base_params, tokenizer)` with the run's LoRA settings.

  Tiny presets learn a BPE on the catalogue and the prompt template, and are fitted to the titles
  (public catalogue text) for `warm_start_steps`.
  """
  lora = models.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=tuple(cfg.lora_targets))
  tiny = cfg.model in ("tiny-llama", "tiny-bert")
  corpus = list(titles) + [examples.ALPACA_TEMPLATE]
  config, params, tokenizer = models.load(cfg.model, dtype=cfg.dtype, lora=lora, remat=cfg.remat,
                                          **({"seed": cfg.seed, "corpus": corpus} if tiny else {}))
  if tokenizer is None:
    raise ConfigError(f"--model={cfg.model!r} has no tokenizer files; generative training needs one")
  if tiny and cfg.warm_start_steps:
    rows = [([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(f'"{t}"') + [tokenizer.eos_id]
            for t in titles]
    ids, mask = pad_rows(rows, tokenizer.pad_id, "right")
    params, loss = fit_causal_lm(config, params, ids, mask, steps=cfg.warm_start_steps, seed=cfg.seed)
    logging.info("warm-started %s on %d catalogue titles: loss %.3f", cfg.model, len(titles), loss)
  for k in cfg.split_k or ():
    if k > config.num_layers - 1:
      raise ConfigError(f"--split_k={k} out of range: {cfg.model} has {config.num_layers} blocks, so k <= "
                        f"{config.num_layers - 1}")
  return config, params, tokenizer


def parameter_counts(config: models.ModelConfig, base, k: int | None) -> dict[str, int]:
  """Base parameters held by the client and by the server at cut k (None: all on the client)."""
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  if k is None:
    return {"client_params": count(base), "server_params": 0}
  head, body, tail = models.split(config, base, k)
  tied = count(head.get("embed")) if config.tie_embeddings else 0  # the tied table is one array on the client
  return {"client_params": count(head) + count(tail) - tied, "server_params": count(body)}


def balance(values: list[float]) -> dict[str, float]:
  """Spread of a per-client metric: std, min, max, max-min and coefficient of variation."""
  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  return {"std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "range": float(v.max() - v.min()),
          "cv": float(v.std() / mean) if mean else 0.0}


def build_engine(cfg: RunConfig, name: str, prep, model) -> tuple[engine_lib.Engine, list]:
  """The engine of strategy `name` and the per-client test examples (centralized: one training client)."""
  config, base, tokenizer = model
  tok_kwargs = dict(cutoff=cfg.cutoff_len)
  train_prep = prep
  if name == "centralized":  # one client holding every training example; evaluated per original client
    train_prep = dataclasses.replace(prep, clients=np.zeros_like(prep.clients), num_clients=1)
  train_examples = pipeline.generative_clients(train_prep, tokenizer, train_on_inputs=cfg.train_on_inputs,
                                               **tok_kwargs)
  valid_examples = pipeline.heldout_clients(train_prep, tokenizer, "valid", max_users=cfg.max_eval_users,
                                            **tok_kwargs)
  test_examples = pipeline.heldout_clients(prep, tokenizer, "test", max_users=cfg.max_eval_users, **tok_kwargs)
  cuts = [cfg.split_for_client(0 if name == "centralized" else c) for c in range(len(train_examples))]
  strategy = strategies.make_strategy(
      name, fellrec_alpha=cfg.fellrec_alpha, fellrec_beta=cfg.fellrec_beta,
      fellrec_temperature=cfg.fellrec_temperature, fellrec_variant=cfg.fellrec_variant, fedprox_mu=cfg.fedprox_mu)
  mesh = sharding.make_mesh(cfg.mesh_clients, cfg.mesh_model)
  return engine_lib.Engine(cfg, config, base, train_examples, valid_examples, strategy, mesh, cuts), test_examples


def run_strategy(cfg: RunConfig, name: str, prep, model, workdir: Path) -> dict[str, Any]:
  """Trains one strategy and returns its results dict (also written to `workdir/results.json`)."""
  config, base, _ = model
  eng, test_examples = build_engine(cfg, name, prep, model)
  workdir.mkdir(parents=True, exist_ok=True)

  def on_round(log):
    valid = log.get("valid", {}).get("mean_loss")
    logging.info("[%s] round %d: train loss %s%s, %.1fs", name, log["round"],
                 np.round(log["train_loss"], 3).tolist(), "" if valid is None else f", valid loss {valid:.4f}",
                 log["seconds"])
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(log) + "\n")

  state, history = engine_lib.run_rounds(eng, str(workdir), on_round=on_round)
  best = state.best_lora
  if name == "centralized":
    best = engine_lib.stack_clients(jax.tree.map(lambda x: x[0], best), prep.num_clients)
  test_batches = engine_lib.heldout_batches(test_examples, cfg.eval_batch_size)
  test_loss, _ = jax.jit(engine_lib.make_heldout_loss(config))(eng.base, best, test_batches)
  test_users = np.asarray([len(ex) for ex in test_examples], np.float64)
  per_client = [{"loss": float(l), "test_users": int(n)} for l, n in zip(np.asarray(test_loss), test_users)]
  seconds = [log["seconds"] for log in history]
  resources = parameter_counts(config, base, eng.cuts[0]) | {
      "bytes_up": float(sum(log["bytes_up"] for log in history)),
      "bytes_down": float(sum(log["bytes_down"] for log in history)),
      "seconds_per_round": statistics.median(seconds[1:] or seconds)}
  results = {"config": dataclasses.asdict(cfg), "strategy": name, "rounds": history,
             "test": {"overall": {"loss": float(np.average(test_loss, weights=np.maximum(test_users, 1e-9)))},
                      "clients": per_client, "balance": balance([c["loss"] for c in per_client])},
             "resources": resources}
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def train_and_evaluate(cfg: RunConfig) -> dict[str, dict[str, Any]]:
  """Runs every strategy in `cfg.strategies` on the same data, model and budget."""
  prep, stats = prepare(cfg)
  workdir = Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "data_stats.json").write_text(json.dumps(stats, indent=1))
  model = load_model(cfg, list(prep.titles))
  out = {}
  for name in cfg.strategies:
    sub = workdir if len(cfg.strategies) == 1 else workdir / name
    out[name] = run_strategy(cfg, name, prep, model, sub)
  return out

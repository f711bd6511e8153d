"""One experiment: data -> model -> federated rounds per strategy -> ranking evaluation -> results.json."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

import models
from fellrec_jax import checkpoint, privacy, report, sharding
from fellrec_jax.config import ConfigError, RunConfig
from fellrec_jax.data import examples, pipeline, prepare_dataset, tokenization
from federated import evaluation, losses, representations, resources, strategies
from federated import engine as engine_lib
from models.tokenizer import pad_rows
from models.warm_start import fit_causal_lm


def prepare(cfg: RunConfig):
  prep, stats = prepare_dataset(
      cfg.dataset, cfg.data_dir, num_clients=cfg.num_clients, partition=cfg.partition, split=cfg.split,
      seed=cfg.seed, history_len=cfg.history_len, k_core=cfg.k_core, min_rating=cfg.min_rating,
      max_train_samples=cfg.max_train_samples, dirichlet_alpha=cfg.dirichlet_alpha,
      mapping_file=cfg.mapping_file, skip_bad_lines=cfg.skip_bad_lines, bpr_steps=cfg.bpr_steps)
  return dataclasses.replace(prep, prompt=cfg.prompt), stats


def lora_config(cfg: RunConfig) -> models.LoraConfig:
  """The run's adapter settings (`--lora_*` flags)."""
  return models.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=tuple(cfg.lora_targets))


def load_model(cfg: RunConfig, titles: list[str]):
  """`(model_config, base_params, tokenizer)` with the run's LoRA settings.

  Tiny presets learn a BPE on the catalogue and the prompt template; tiny-llama is then fitted to the
  titles (public catalogue text) for `warm_start_steps`.
  """
  lora = lora_config(cfg)
  tiny = cfg.model in models.TINY_PRESETS
  corpus = list(titles) + [examples.ALPACA_TEMPLATE]  # holds every template's text
  config, params, tokenizer = models.load(cfg.model, dtype=cfg.dtype, lora=lora, remat=cfg.remat,
                                          scan_layers=cfg.scan_layers,
                                          **({"seed": cfg.seed, "corpus": corpus} if tiny else {}))
  if tokenizer is None:
    raise ConfigError(f"--model={cfg.model!r} has no tokenizer files; training needs one")
  if not config.is_decoder and cfg.task == "generative":
    raise ConfigError(f"--task=generative needs a decoder, but --model={cfg.model!r} is an encoder: "
                      "use --task=discriminative")
  for k in cfg.explicit_cuts:
    if k > config.num_layers - 1:
      raise ConfigError(f"--split_k={k} out of range: {cfg.model} has {config.num_layers} blocks, so k <= "
                        f"{config.num_layers - 1}")
  if cfg.model == "tiny-llama" and cfg.warm_start_steps:
    ids, mask = pad_rows(catalogue_rows(tokenizer, titles, cfg.history_len, seed=cfg.seed), tokenizer.pad_id, "right")
    params, loss = fit_causal_lm(config, params, ids, mask, steps=cfg.warm_start_steps, seed=cfg.seed)
    logging.info("warm-started %s on lists of the %d catalogue titles: loss %.3f", cfg.model, len(titles), loss)
  return config, params, tokenizer


def catalogue_rows(tokenizer, titles: list[str], max_len: int, *, seed: int, num_rows: int = 2048) -> list[list[int]]:
  """Token rows of random lists of quoted titles (`"A", "B", ...`), public catalogue text only.

  Lists rather than single titles teach the tiny base where a quoted title opens and closes at any
  position, as in BIGRec prompts (history lists) and responses (one quoted title).
  """
  rng = np.random.default_rng(seed)
  head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  rows = []
  for _ in range(num_rows):
    picks = rng.choice(len(titles), size=rng.integers(1, max_len + 1))
    rows.append(head + tokenizer.encode(", ".join(f'"{titles[i]}"' for i in picks)) + [tokenizer.eos_id])
  return rows


# ----------------------------------------------------------------------------- per-task examples

def _prompt_examples(cfg, config, tokenizer, windows_per_client, prep) -> list[pipeline.PromptExamples]:
  """Discriminative examples: each window's prompt tokenized as the evaluation embeds it, plus its target."""
  rows = [tokenization.text_rows(config, tokenizer, [prompt for prompt, _ in prep.prompts(w)],
                               min(cfg.cutoff_len, config.max_positions)) for w in windows_per_client]
  seq_len = -(-max((len(r) for rs in rows for r in rs), default=1) // 8) * 8
  return [pipeline.PromptExamples.from_rows(rs, w.target, seq_len=seq_len, pad_id=tokenizer.pad_id,
                                            left_pad=config.is_decoder) for rs, w in zip(rows, windows_per_client)]


def resolve_auto_split(cfg: RunConfig, config: models.ModelConfig, seq_len: int) -> RunConfig:
  """`--split_k=auto`: per client, the largest k whose client footprint fits its memory budget."""
  if not cfg.auto_split:
    return cfg
  budgets = cfg.client_memory_budget_mb
  chosen = {b: resources.choose_split_k(config, b, cfg.batch_size, seq_len, server_lora=cfg.server_lora)
            for b in set(budgets)}
  ks = tuple(chosen[b] for b in budgets)
  logging.info("--split_k=auto: budgets %s MiB -> k=%s (batch %dx%d)", budgets, ks, cfg.batch_size, seq_len)
  return dataclasses.replace(cfg, split_k=ks)


def task_examples(cfg: RunConfig, config, tokenizer, prep) -> tuple[list, list]:
  """`(train, valid)` per-client examples for `cfg.task`."""
  if cfg.task == "generative":
    kwargs = dict(cutoff=cfg.cutoff_len)
    return (pipeline.generative_clients(prep, tokenizer, max_chunks=cfg.max_train_samples, seed=cfg.seed,
                                        train_on_inputs=cfg.train_on_inputs, **kwargs),
            pipeline.heldout_clients(prep, tokenizer, "valid", max_users=cfg.max_eval_users, **kwargs))
  if cfg.disc_input == "items":
    return (pipeline.item_sequence_clients(prep, cfg.history_len),
            pipeline.heldout_item_clients(prep, "valid", cfg.max_eval_users))
  train = [prep.client_windows(c) for c in range(prep.num_clients)]
  return (_prompt_examples(cfg, config, tokenizer, train, prep),
          _prompt_examples(cfg, config, tokenizer, pipeline.heldout_windows(prep, "valid", cfg.max_eval_users), prep))


def task_config(cfg: RunConfig, config: models.ModelConfig) -> models.ModelConfig:
  """The model configuration the task runs: item-as-token sequences run the encoder causally, so every
  position of a training sequence is an example (`--disc_input=items`)."""
  return dataclasses.replace(config, causal=cfg.task == "discriminative" and cfg.disc_input == "items")


def item_state(cfg: RunConfig, config: models.ModelConfig, tokenizer, titles, item_emb: np.ndarray) -> dict:
  """The frozen item data the clients share, as `base["items"]` (see `client.LocalSpec`): the title
  embeddings as item-as-token inputs, and as scores' item vectors (frozen) or the titles' tokens to
  re-encode (encoder); a trainable table lives with the adapters instead."""
  items = {"input_id": np.asarray(item_emb, np.float32)} if cfg.disc_input == "items" else {}
  if cfg.item_side == "frozen" or (cfg.item_side == "table" and cfg.item_table_rank):
    items["table_id"] = np.asarray(item_emb, np.float32)
  if cfg.item_side == "encoder":
    rows = tokenization.text_rows(config, tokenizer, titles, config.max_positions)
    items["title_ids"], items["title_mask"] = pad_rows(rows, tokenizer.pad_id, "left" if config.left_padded else "right")
  return {"items": items} if items else {}


def cache_client_heads(cfg: RunConfig, config: models.ModelConfig, base, examples: list, cuts: list,
                       batch_size: int = 128) -> list:
  """`--cache_head`: each client's head activations `[N, T, D]` (embeddings and blocks [0, k) without
  adapters, on frozen item inputs) computed once, as `examples[c].head_act`; every epoch reuses them."""
  @functools.partial(jax.jit, static_argnums=0)
  def head_act(k, base, ids, mask):  # the base is an argument: closed over, it would be baked in as constants
    head = models.split(config, base, k)[0]
    return models.client_head(config, models.item_token_params(head, base["items"]["input_id"]), ids, mask)

  out = []
  for ex, k in zip(examples, cuts):
    acts = [np.asarray(head_act(k, base, ex.input_ids[i:i + batch_size], ex.attention_mask[i:i + batch_size]))
            for i in range(0, len(ex), batch_size)]
    out.append(dataclasses.replace(ex, head_act=np.concatenate(acts) if acts else
                                   np.zeros((0, ex.seq_len, config.hidden_size), np.float32)))
  logging.info("--cache_head: client head activations cached once, %.1f MB", sum(e.head_act.nbytes for e in out) / 2**20)
  return out


def build_engine(cfg: RunConfig, name: str, prep, model, item_emb: np.ndarray | None = None) -> engine_lib.Engine:
  """The engine of strategy `name` (centralized: one training client holding every example)."""
  config, base, tokenizer = model
  strategy = strategies.make_strategy(
      name, fellrec_alpha=cfg.fellrec_alpha, fellrec_beta=cfg.fellrec_beta,
      fellrec_temperature=cfg.fellrec_temperature, fellrec_variant=cfg.fellrec_variant,
      fellrec_similarity=cfg.fellrec_similarity, fedprox_mu=cfg.fedprox_mu)
  train_prep = prep
  if strategy.pooled:
    train_prep = dataclasses.replace(prep, clients=np.zeros_like(prep.clients), num_clients=1)
  train_examples, valid_examples = task_examples(cfg, config, tokenizer, train_prep)
  cfg = resolve_auto_split(cfg, config, int(train_examples[0].seq_len))
  cuts = [cfg.split_for_client(0 if strategy.pooled else c) for c in range(len(train_examples))]
  mesh = sharding.make_mesh(cfg.mesh_clients, cfg.mesh_model)
  task = {}
  if cfg.task == "discriminative":
    if item_emb is None:
      item_emb = representations.item_embeddings(config, base, tokenizer, prep.titles)
    base = base | item_state(cfg, config, tokenizer, prep.titles, item_emb)
    if cfg.cache_head:
      train_examples = cache_client_heads(cfg, task_config(cfg, config), base, train_examples, cuts)
    task = dict(loss_fn=losses.discriminative_loss(task_config(cfg, config), cfg.disc_temperature, cfg.disc_score),
                hidden=True, frozen_head=cfg.cache_head,
                item_side=cfg.item_side, item_tokens=cfg.disc_input == "items",
                item_table=item_emb if cfg.item_side == "table" else None)
    if (cfg.item_side == "table" or cfg.item_ids) and cfg.item_aggregation == "rows":
      task["item_counts"] = item_counts(train_examples, len(item_emb))
    if cfg.selection_metric != "loss":
      task["valid_metric"] = functools.partial(validation_metric, cfg, model, train_prep, item_emb)
  return engine_lib.Engine(cfg, task_config(cfg, config), base, train_examples, valid_examples, strategy, mesh, cuts,
                           **task)


def item_counts(examples: list, num_items: int) -> np.ndarray:
  """`[C, I]` how often each item is a training target of each client (item-as-token chunks: every real
  position's next item; prompt examples: their one target)."""
  def count(ex):
    target = np.asarray(ex.target)
    real = ex.attention_mask > 0 if target.ndim == 2 else np.ones(len(target), bool)
    return np.bincount(target[real], minlength=num_items)[:num_items]
  return np.stack([count(ex) for ex in examples]).astype(np.float32)


def validation_metric(cfg: RunConfig, model, prep, item_emb: np.ndarray, lora_c) -> np.ndarray:
  """`[C]` each client's `--select_by` metric on its validation users (0 for a client without any)."""
  k = cfg.selection_metric.split("@")[1]
  result = evaluate(dataclasses.replace(cfg, metric_ks=(int(k),)), model, sharding.to_host(lora_c), prep, "valid",
                    item_emb)
  return np.asarray([c.get(cfg.selection_metric, 0.0) for c in result["clients"]])


# ----------------------------------------------------------------------------- evaluation and results

def evaluate(cfg: RunConfig, model, lora_c, prep, part: str, item_emb: np.ndarray | None,
             decoding: str | None = None) -> dict:
  """`part`'s ranking metrics of `lora_c`; generative runs decode with `decoding` (default: `--decoding`'s first)."""
  config, base, tokenizer = model
  kwargs = dict(ks=cfg.metric_ks, batch_size=cfg.eval_batch_size, max_users=cfg.max_eval_users, item_emb=item_emb)
  if cfg.task == "generative":
    return evaluation.evaluate_generative(config, base, tokenizer, lora_c, prep, part,
                                          decoding=decoding or cfg.decoding[0], num_beams=cfg.num_beams,
                                          max_new_tokens=cfg.max_new_tokens, **kwargs)
  return evaluation.evaluate_discriminative(task_config(cfg, config), base, tokenizer, lora_c, prep, part,
                                            item_side=cfg.item_side, item_tokens=cfg.disc_input == "items",
                                            score=cfg.disc_score, **kwargs)


def with_primary_balance(result: dict, metric: str = "ndcg@10") -> dict:
  """Adds the flat `balance` of `metric` (std/min/max/range/cv across clients), results.json's `test.balance`,
  to the per-metric ones."""
  per_metric = result["balance"]
  primary = metric if metric in per_metric else sorted(per_metric)[0]
  return dict(result, balance={"metric": primary, **per_metric[primary], "per_metric": per_metric})


def run_strategy(cfg: RunConfig, name: str, prep, model, workdir: Path, item_emb: np.ndarray | None,
                 references: dict[str, dict], adapters: dict | None = None) -> dict[str, Any]:
  """Trains one strategy, evaluates each client's best adapter on its test users, writes results.json
  (with the conventional `references` rows of `reference_rows`); `adapters["best"]`, when given, receives
  the evaluated adapters (host arrays, leading clients axis)."""
  config, base, _ = model
  eng = build_engine(cfg, name, prep, model, item_emb)
  workdir.mkdir(parents=True, exist_ok=True)
  writer = report.ScalarWriter(workdir / "tensorboard")

  # A loss no better than a uniform guess over the classes (tokens, or items when discriminative) is
  # a collapsed model, as too high a learning rate leaves it: finite, so never counted as diverged.
  uniform_loss = math.log(config.vocab_size if cfg.task == "generative" else len(prep.titles))

  def on_round(log):
    # The validation loss after the round, where there is one: a round's mean training loss still
    # averages in the steps before the collapse.
    losses = np.asarray(log["valid"]["loss"] if "valid" in log else log["train_loss"])
    collapsed = np.flatnonzero(losses >= uniform_loss - 0.01).tolist()
    if collapsed:
      logging.warning("[%s] round %d: client(s) %s predict no better than a uniform guess (%s loss %s >= ln %d = "
                      "%.3f): the model has collapsed, usually from too high a --learning_rate", name, log["round"],
                      collapsed, "validation" if "valid" in log else "training",
                      np.round(losses[collapsed], 3).tolist(), round(math.exp(uniform_loss)), uniform_loss)
    valid = ", ".join(f"valid {k[5:]} {v:.4f}" for k, v in log.get("valid", {}).items() if k.startswith("mean_"))
    logging.info("[%s] round %d: train loss %s%s, %.1fs (training %.0f tokens/s)", name, log["round"],
                 np.round(log["train_loss"], 3).tolist(), valid and ", " + valid, log["seconds"],
                 log["train_tokens"] / log["train_seconds"])
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps(log) + "\n")
    writer.round(log)

  state, history = engine_lib.run_rounds(eng, str(workdir), on_round=on_round, progress=name)
  best_valid = np.asarray(sharding.to_host(state.best_valid))
  if not np.isfinite(best_valid).all():
    logging.warning("[%s] client(s) %s never had a finite validation score: their %s adapters are evaluated",
                    name, np.flatnonzero(~np.isfinite(best_valid)).tolist(), "starting" if cfg.keep_best else "last")
  best = sharding.to_host(state.evaluated_lora)
  if eng.strategy.pooled:
    best = engine_lib.stack_clients(jax.tree.map(lambda x: x[0], best), prep.num_clients)
  if adapters is not None:
    adapters["best"] = best
  test = with_primary_balance(evaluate(cfg, model, best, prep, "test", item_emb))
  logging.info("[%s] test per client:\n%s", name, report.client_table(test))
  by_decoding = {}
  if cfg.task == "generative" and len(cfg.decoding) > 1:
    by_decoding = {cfg.decoding[0]: test} | {
        d: with_primary_balance(evaluate(cfg, model, best, prep, "test", item_emb, d)) for d in cfg.decoding[1:]}
    for d, result in by_decoding.items():
      logging.info("[%s] test with --decoding=%s: %s", name, d, {m: round(v, 4) for m, v in result["overall"].items()})
  writer.scalars("test", test["overall"], len(history))
  writer.close()
  seconds = [log["seconds"] for log in history]
  held = ({"client_params": resources.count(base), "server_params": 0} if eng.cuts[0] is None
          else resources.param_split(config, base, eng.cuts[0]))
  usage = {"client_params": held["client_params"], "server_params": held["server_params"],
           "adapter_params_per_client": trained_adapter_params(best["blocks"], eng.cuts if eng.frozen_head else None),
           # client-side state, uploaded for aggregation like the adapters (--item_side=table)
           "item_table_params_per_client": resources.count(best.get("items", {})) // prep.num_clients,
           "bytes_up": float(sum(log["bytes_up"] for log in history)),
           "bytes_down": float(sum(log["bytes_down"] for log in history)),
           "seconds_per_round": statistics.median(seconds[1:] or seconds)}
  if eng.cuts[0] is not None and not config.is_decoder:
    logging.info("[%s] results.json has no resources.split: the per-cut cost report models a generative tail "
                 "(an LM head), which the encoder %s lacks", name, cfg.model)
  elif eng.cuts[0] is not None:  # memory, FLOPs and traffic of the client's and server's compiled segments
    usage["split"] = [resources.report(config, k, batch_size=cfg.batch_size, seq_len=int(eng.train_examples[0].seq_len),
                                       base=base, micro_per_round=eng.micro_per_round, server_lora=cfg.server_lora)
                      for k in sorted(set(eng.cuts))]
  results = {"config": dataclasses.asdict(cfg), "strategy": name, "rounds": history, "test": test,
             # per client, the --select_by criterion of the evaluated adapter (lower is better; None: no
             # finite validation score ever, so the starting adapter)
             "best_valid": [float(v) if np.isfinite(v) else None for v in best_valid],
             "resources": usage, "baselines": {n: r["overall"] for n, r in references.items()},
             "baselines_fit": {n: r["fit"] for n, r in references.items()}}
  if by_decoding:
    results["test_by_decoding"] = {d: {"overall": r["overall"], "balance": r["balance"]} for d, r in by_decoding.items()}
  if cfg.dp_clip is not None:
    results["dp"] = dp_summary(cfg, rounds=len(history), num_clients=eng.num_clients)
    logging.info("[%s] DP: epsilon %.3g at delta %.2g after %d rounds", name, results["dp"]["epsilon"],
                 results["dp"]["delta"], len(history))
  (workdir / "results.json").write_text(json.dumps(results, indent=1))
  return results


def trained_adapter_params(blocks_c, cuts: list | None) -> int:
  """Adapter parameters a client trains, averaged over clients: with `--cache_head` (`cuts` given: each
  training client's k, one for centralized) its head blocks `[0, k)` carry none."""
  leaves = jax.tree.leaves(blocks_c)
  num_clients, num_layers = leaves[0].shape[:2]
  per_layer = sum(int(np.prod(x.shape[2:])) for x in leaves)
  cut = lambda c: 0 if cuts is None else (cuts[c] if len(cuts) == num_clients else cuts[0]) or 0
  layers = [num_layers - cut(c) for c in range(num_clients)]
  return per_layer * sum(layers) // num_clients


def dp_summary(cfg: RunConfig, *, rounds: int, num_clients: int) -> dict:
  """results.json["dp"]: the DP settings and the epsilon they give after `rounds` rounds."""
  return privacy.dp_report(clip=cfg.dp_clip, noise_multiplier=cfg.dp_noise_multiplier, rounds=rounds,
                           num_clients=num_clients, clients_per_round=cfg.clients_per_round, delta=cfg.dp_delta,
                           accountant=cfg.dp_accountant)


def train_and_evaluate(cfg: RunConfig) -> dict[str, dict[str, Any]]:
  """Runs every strategy in `cfg.strategies` on the same data, model, seed and budget.

  One strategy writes `workdir/results.json`; several write `workdir/<strategy>/results.json` plus
  `comparison.md` and `comparison.png` (with a most-popular floor on the same split).
  """
  with checkpoint.workdir_lock(cfg.workdir):
    return _train_and_evaluate(cfg)


def _train_and_evaluate(cfg: RunConfig) -> dict[str, dict[str, Any]]:
  # Pretrained weights load first, so their errors (the path, --split_k, --task) come before the data
  # work; the tiny presets learn their tokenizer on the catalogue, so they wait for it.
  model = None if cfg.model in models.TINY_PRESETS else load_model(cfg, [])
  prep, stats = prepare(cfg)
  workdir = Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "data_stats.json").write_text(json.dumps(stats, indent=1))
  model = model or load_model(cfg, list(prep.titles))
  # Generative runs need title embeddings only to ground generations by L2 distance.
  needs_item_emb = cfg.task == "discriminative" or "l2" in cfg.decoding
  item_emb = representations.item_embeddings(model[0], model[1], model[2], prep.titles) if needs_item_emb else None
  references = reference_rows(cfg, prep)
  out = {}
  for name in cfg.strategies:
    sub = workdir if len(cfg.strategies) == 1 else workdir / name
    out[name] = run_strategy(cfg, name, prep, model, sub, item_emb, references)
  if len(cfg.strategies) > 1:
    report.write_comparison(workdir, out, references)
  return out


def reference_rows(cfg: RunConfig, prep) -> dict[str, dict]:
  """Most-popular and the `--baselines` rows (item-kNN, SASRec), trained centrally on the same split and
  ranked for the same test users with the same exclusions, each `with_primary_balance`d."""
  rows = evaluation.reference_rows(prep, "test", cfg.baselines, cfg.metric_ks, max_users=cfg.max_eval_users,
                                   seed=cfg.seed, log=lambda msg: logging.info("baselines: %s", msg))
  for name, row in rows.items():
    logging.info("baseline %s: test %s", name, {m: round(v, 4) for m, v in row["overall"].items()})
  return {name: with_primary_balance(row) for name, row in rows.items()}

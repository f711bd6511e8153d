"""`--mode=attack`: how much of the clients' prompts an honest-but-curious server reads at each cut k.

`run(cfg, split_ks)` prepares the run's data and model exactly as training does (tiny presets are
warm-started on the public catalogue), samples clients' training prompts as victims, lets the server
build its own public prompts from the catalogue, runs `federated.attack.run_attack`, and writes
`<workdir>/attack.json` (`{"k", "token_accuracy", "title_recovery", "target_recovery", ...}`) and
`<workdir>/attack.png`. Threat model and metrics: `federated.attack`. The run's own defense flags
(`--cut_noise`, ...) apply to what the server receives.

With `--attack_sweep`, each setting (and an undefended reference, "none") is also trained with the
first of `--strategies` at each cut, and its client 0's evaluated adapters are attacked on client 0's
prompts: `attack.json["curve"]` gets one row per (setting, k) with the attacks' recovery and the run's
utility (`curve_row`), and `<workdir>/attack_curve.png` plots privacy against utility.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from fellrec_jax.config import RunConfig
from fellrec_jax.data import pipeline
from federated import attack, cut_defense, experiment, item_attack, representations

NO_DEFENSE = dict(cut_noise=0.0, cut_clip=None, cut_nopeek=0.0, private_response=False, loss_upload_noise=0.0,
                  loss_upload_step=None)


def plot(result: dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  ks = result["k"]
  ax.plot(ks, result["token_accuracy"], "o-", label="prompt tokens")
  ax.plot(ks, result["history_token_accuracy"], "s-", label="history-title tokens")
  ax.plot(ks, result["title_recovery"], "^-", label="history titles exact")
  if None not in result["target_recovery"]:  # item inputs: the label never crosses the cut
    ax.plot(ks, result["target_recovery"], "v-", label="next-item title exact")
  ax.plot(ks, result["nearest"]["token_accuracy"], ":", color="gray", label="nearest embedding (tokens)")
  ax.set_xlabel("cut k (blocks on the client before the server)")
  ax.set_ylabel("recovered by the server")
  ax.set_ylim(-0.02, 1.02)
  _save(fig, ax, title, path)


def plot_curve(rows: list[dict], path: pathlib.Path, title: str) -> None:
  """Privacy (history-title tokens the server recovers) against utility (ndcg@10), one point per row."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for defense in dict.fromkeys(r["defense"] for r in rows):
    mine = [r for r in rows if r["defense"] == defense]
    ax.plot([r["title_token_recovery"] for r in mine], [r["ndcg@10"] for r in mine], "*" if defense == "none" else "o",
            markersize=12 if defense == "none" else 7, label=defense)
    for r in mine:
      ax.annotate(f"{r['strength']:g} k={r['split_k']}", (r["title_token_recovery"], r["ndcg@10"]), fontsize=6)
  ax.set_xlabel("history-title tokens recovered by the server (stronger attack)")
  ax.set_ylabel("test ndcg@10 of the defended training")
  ax.set_xlim(-0.02, 1.02)
  _save(fig, ax, title, path)


def _save(fig, ax, title: str, path: pathlib.Path) -> None:
  """Titles, grids and writes a plot, then frees it."""
  import matplotlib.pyplot as plt
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def setting_config(cfg: RunConfig, flag: str, value: float, k: int, workdir: pathlib.Path) -> RunConfig:
  """The training run of one curve point: the attack run's settings with `--flag=value` (none: every
  defense off) at cut k, one strategy, no reference baselines."""
  defense = NO_DEFENSE if flag == "none" else {flag: bool(value) if flag == "private_response" else value}
  return dataclasses.replace(cfg, mode="train", attack_sweep=(), split_k=(k,), strategies=cfg.strategies[:1],
                             baselines=(), workdir=str(workdir), **defense)


def curve_row(cfg: RunConfig, flag: str, value: float, k: int, results: dict, attacked: dict) -> dict[str, Any]:
  """One `attack.json["curve"]` row: recovery by the learned inverter and by nearest embedding (tokens of the
  prompt), the stronger attack's history-title tokens and exact next-item titles (the label), and the
  defended run's best mean validation loss, test ndcg@10 and last round's FELLRec warm weights. Item-as-token
  inputs (attack.json["inputs"] == "items"): every recovery is the fraction of history items recovered, and
  `label_recovery` is None (the label never crosses the cut)."""
  valid = [log["valid"]["mean_loss"] for log in results["rounds"] if "valid" in log]
  return {"defense": flag, "strength": value, "split_k": k,
          "inverter_token_recovery": attacked["learned"]["token_accuracy"],
          "nearest_token_recovery": attacked["nearest"]["token_accuracy"],
          "title_token_recovery": attacked["history_token_accuracy"],
          "title_recovery": attacked["title_recovery"], "label_recovery": attacked["target_recovery"],
          "valid_loss": min(valid), "ndcg@10": results["test"]["overall"]["ndcg@10"],
          "warm_weights": results["rounds"][-1].get("warm_weights"), "learned": attacked["learned"],
          "nearest": attacked["nearest"], "defense_flags": {f: getattr(cfg, f) for f in NO_DEFENSE}}


@dataclasses.dataclass(frozen=True)
class Target:
  """What one run attacks: `victims` (for the per-k table), `client0` (client 0's rows, for the curve),
  `public` (the server's own rows), `item_emb` (the run's item embeddings, or None), and
  `attack(k, victims, lora, defense) -> attack_at_k-like dict`, `table(ks, defense) -> attack.json's`."""

  victims: Any
  client0: Any
  public: Any
  item_emb: np.ndarray | None
  attack: Callable[..., dict]
  table: Callable[..., dict]
  unit: str = "title tokens"  # what "title_token_recovery" counts


def prompt_target(cfg: RunConfig, prep, model, *, num_victims: int, num_public: int, **kwargs) -> Target:
  """Generative prompts: victims are training windows' prompts, the public prompts random catalogue titles."""
  config, base, tokenizer = model
  titles, noun = list(prep.titles), prep.dataset.item_noun
  rng = np.random.default_rng(cfg.seed)
  chosen = rng.choice(len(prep.train), size=min(num_victims, len(prep.train)), replace=False)
  victims = attack.private_prompts(prep.train.take(np.sort(chosen)), titles, noun, tokenizer, cutoff=cfg.cutoff_len)
  public = attack.public_prompts(titles, noun, tokenizer, num=num_public, history_len=cfg.history_len,
                                 seed=cfg.seed + 1, cutoff=cfg.cutoff_len)
  own = np.flatnonzero(prep.clients[prep.train.user] == 0)  # client 0's windows: its adapters made them
  mine = np.sort(np.random.default_rng(cfg.seed).choice(own, size=min(num_victims, len(own)), replace=False))
  client0 = attack.private_prompts(prep.train.take(mine), titles, noun, tokenizer, cutoff=cfg.cutoff_len)
  item_emb = representations.item_embeddings(config, base, tokenizer, titles) if "l2" in cfg.decoding else None
  logging.info("attack on %s: %d victim prompts (%d titles), %d public prompts", cfg.model, len(victims.ids),
               sum(map(len, victims.title_spans)), len(public.ids))
  return Target(victims, client0, public, item_emb,
                lambda k, v, lora, d: attack.attack_at_k(config, base, k, v, public, victim_lora=lora, seed=cfg.seed,
                                                         defense=d, **kwargs),
                lambda ks, d: attack.run_attack(config, base, ks, victims, public, seed=cfg.seed, defense=d, **kwargs))


def item_target(cfg: RunConfig, prep, model, *, num_victims: int, num_public: int, **kwargs) -> Target:
  """Item-as-token rows (`federated.item_attack`): victims are training chunks; the public rows random
  catalogue items, popularity-weighted where the server receives the clients' item counts."""
  config, base, tokenizer = model
  item_emb = representations.item_embeddings(config, base, tokenizer, list(prep.titles))
  chunks = pipeline.item_sequence_clients(prep, cfg.history_len)
  every = pipeline.ItemSequences(*(np.concatenate([getattr(c, f) for c in chunks])
                                   for f in ("input_ids", "attention_mask", "target")))
  counts = experiment.item_counts(chunks, len(item_emb)).sum(0)
  told = cfg.item_aggregation == "rows" and (cfg.item_side == "table" or cfg.item_ids)
  public = item_attack.public_rows(len(item_emb), every.attention_mask.sum(1), num=num_public,
                                   seq_len=cfg.history_len, seed=cfg.seed + 1, popularity=counts + 1 if told else None)
  victims = item_attack.private_rows(every, num=num_victims, seed=cfg.seed)
  client0 = item_attack.private_rows(chunks[0], num=num_victims, seed=cfg.seed)
  logging.info("attack on %s item-as-token rows: %d victim rows (%d items), %d public rows of %s catalogue items",
               cfg.model, len(victims.ids), int(victims.mask.sum()), len(public.ids),
               "popularity-weighted" if told else "uniform")
  causal = experiment.task_config(cfg, config)
  head_lora = lambda lora: None if cfg.cache_head else lora  # a cached head ran without adapters
  return Target(victims, client0, public, item_emb,
                lambda k, v, lora, d: item_attack.attack_items_at_k(causal, base, item_emb, k, v, public, seed=cfg.seed,
                                                                    victim_lora=head_lora(lora), defense=d, **kwargs),
                lambda ks, d: item_attack.run_item_attack(causal, base, item_emb, ks, victims, public, seed=cfg.seed,
                                                          defense=d, **kwargs), unit="items")


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def run_curve(cfg: RunConfig, ks: list[int], prep, model, target: Target, on_row=lambda rows: None) -> list[dict]:
  """Trains and attacks every `--attack_sweep` setting and the undefended reference at each cut k;
  `on_row(rows)` after each row (the run writes attack.json as it goes)."""
  rows = []
  for k in ks:
    for flag, value in [("none", 0.0), *cfg.sweep_settings()]:
      workdir = pathlib.Path(cfg.workdir) / "curve" / f"k{k}_{flag}_{value:g}"
      run_cfg = setting_config(cfg, flag, value, k, workdir)
      adapters = {}
      results = experiment.run_strategy(run_cfg, run_cfg.strategies[0], prep, model, workdir, target.item_emb, {},
                                        adapters)
      lora = jax.tree.map(lambda x: x[0], {"blocks": adapters["best"]["blocks"]})
      attacked = target.attack(k, target.client0, lora, cut_defense.defense_of(run_cfg))
      rows.append(curve_row(run_cfg, flag, value, k, results, attacked))
      print(f"k={k} {flag}={value:g}: history {target.unit} "
            f"{rows[-1]['title_token_recovery']:.3f} (inverter {attacked['learned']['history_token_accuracy']:.3f}, "
            f"nearest {attacked['nearest']['history_token_accuracy']:.3f}), labels {_fmt(rows[-1]['label_recovery'])}, "
            f"valid loss {rows[-1]['valid_loss']:.4f}, ndcg@10 {rows[-1]['ndcg@10']:.4f}", flush=True)
      on_row(rows)
  return rows


def run(cfg: RunConfig, split_ks: list[int] | None, *, num_victims: int = 256, num_public: int = 1000,
        inverter_steps: int = 400, inverter_hidden: int = 512) -> dict[str, Any]:
  prep, _ = experiment.prepare(cfg)
  config, base, tokenizer = experiment.load_model(cfg, list(prep.titles))
  items = cfg.task == "discriminative" and cfg.disc_input == "items"
  if not (config.is_decoder or items):
    raise ValueError(f"--mode=attack needs a decoder backbone or item-as-token inputs (--task=discriminative "
                     f"--disc_input=items); {cfg.model} is an encoder reading text prompts")
  ks = list(split_ks) if split_ks else sorted({0, 1, config.num_layers // 2, config.num_layers - 1})
  bad = [k for k in ks if not 0 <= k <= config.num_layers - 1]
  if bad:
    raise ValueError(f"--split_k={bad} out of range [0, {config.num_layers - 1}] for {cfg.model}")
  target = (item_target if items else prompt_target)(cfg, prep, (config, base, tokenizer), num_victims=num_victims,
                                                      num_public=num_public, inverter_steps=inverter_steps,
                                                      inverter_hidden=inverter_hidden)
  result = target.table(ks, cut_defense.defense_of(cfg))
  result |= {"model": cfg.model, "dataset": cfg.dataset, "num_layers": config.num_layers,
             "inputs": "items" if items else "tokens"}
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  write = lambda: (workdir / "attack.json").write_text(json.dumps(result, indent=1))
  write()
  plot(result, workdir / "attack.png", f"{cfg.model} on {cfg.dataset}: inversion of the activations at cut k")
  for i, k in enumerate(result["k"]):
    print(f"k={k:2d}  tokens {result['token_accuracy'][i]:.3f}  history tokens {result['history_token_accuracy'][i]:.3f}"
          f"  titles {result['title_recovery'][i]:.3f}  next item {_fmt(result['target_recovery'][i])}")
  print(f"tail offloaded: labels {_fmt(result['tail_offloaded']['label_recovery'])}; logit argmax on response tokens "
        f"{_fmt(result['tail_offloaded']['logit_argmax_target_accuracy'])}")
  if cfg.attack_sweep:
    result["references"] = {n: r["overall"] for n, r in experiment.reference_rows(cfg, prep).items()}
    write()
    result["curve"] = run_curve(cfg, ks, prep, (config, base, tokenizer), target,
                                on_row=lambda rows: (result.update(curve=rows), write()))
    plot_curve(result["curve"], workdir / "attack_curve.png", f"{cfg.model} on {cfg.dataset}: defenses at the cut")
  write()
  return result

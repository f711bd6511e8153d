"""`--mode=attack`: how much of the clients' prompts an honest-but-curious server reads at each cut k.

`run(cfg, split_ks)` prepares the run's data and model exactly as training does (tiny presets are
warm-started on the public catalogue), samples clients' training prompts as victims, lets the server
build its own public prompts from the catalogue, runs `federated.attack.run_attack`, and writes
`<workdir>/attack.json` (`{"k", "token_accuracy", "title_recovery", "target_recovery", ...}`) and
`<workdir>/attack.png`. Threat model and metrics: `federated.attack`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from absl import logging

from fellrec_jax.config import RunConfig
from federated import attack, experiment


def plot(result: dict[str, Any], path: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  ks = result["k"]
  ax.plot(ks, result["token_accuracy"], "o-", label="prompt tokens")
  ax.plot(ks, result["history_token_accuracy"], "s-", label="history-title tokens")
  ax.plot(ks, result["title_recovery"], "^-", label="history titles exact")
  ax.plot(ks, result["target_recovery"], "v-", label="next-item title exact")
  ax.plot(ks, result["nearest"]["token_accuracy"], ":", color="gray", label="nearest embedding (tokens)")
  ax.set_xlabel("cut k (blocks on the client before the server)")
  ax.set_ylabel("recovered by the server")
  ax.set_ylim(-0.02, 1.02)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(cfg: RunConfig, split_ks: list[int] | None, *, num_victims: int = 256, num_public: int = 1000,
        inverter_steps: int = 400, inverter_hidden: int = 512) -> dict[str, Any]:
  prep, _ = experiment.prepare(cfg)
  titles = list(prep.titles)
  config, base, tokenizer = experiment.load_model(cfg, titles)
  if not config.is_decoder:
    raise ValueError(f"--mode=attack needs a decoder backbone; {cfg.model} is an encoder")
  ks = list(split_ks) if split_ks else sorted({0, 1, config.num_layers // 2, config.num_layers - 1})
  bad = [k for k in ks if not 0 <= k <= config.num_layers - 1]
  if bad:
    raise ValueError(f"--split_k={bad} out of range [0, {config.num_layers - 1}] for {cfg.model}")
  noun = prep.dataset.item_noun
  rng = np.random.default_rng(cfg.seed)
  chosen = rng.choice(len(prep.train), size=min(num_victims, len(prep.train)), replace=False)
  victims = attack.private_prompts(prep.train.take(np.sort(chosen)), titles, noun, tokenizer, cutoff=cfg.cutoff_len)
  public = attack.public_prompts(titles, noun, tokenizer, num=num_public, history_len=cfg.history_len,
                                 seed=cfg.seed + 1, cutoff=cfg.cutoff_len)
  logging.info("attack on %s: %d victim prompts (%d titles), %d public prompts, k=%s", cfg.model, len(victims.ids),
               sum(map(len, victims.title_spans)), len(public.ids), ks)
  result = attack.run_attack(config, base, ks, victims, public, inverter_steps=inverter_steps,
                             inverter_hidden=inverter_hidden, seed=cfg.seed)
  result |= {"model": cfg.model, "dataset": cfg.dataset, "num_layers": config.num_layers}
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "attack.json").write_text(json.dumps(result, indent=1))
  plot(result, workdir / "attack.png", f"{cfg.model} on {cfg.dataset}: inversion of the activations at cut k")
  for i, k in enumerate(result["k"]):
    print(f"k={k:2d}  tokens {result['token_accuracy'][i]:.3f}  history tokens {result['history_token_accuracy'][i]:.3f}"
          f"  titles {result['title_recovery'][i]:.3f}  next item {result['target_recovery'][i]:.3f}")
  print(f"tail offloaded: labels 1.0 (loss input); logit argmax on response tokens "
        f"{result['tail_offloaded']['logit_argmax_target_accuracy']:.3f}")
  return result

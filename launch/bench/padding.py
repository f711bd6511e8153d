"""Section padding: how much of a real round is padding, and what size-homogeneous client groups save.

The round is `movielens_tiny.flags`' first local round on MovieLens ml-latest-small (tiny-llama, r=8
adapters on every projection, split at k=1, 5 KMeans clients, B=16, the real tokenized prompts), or on the
built-in synthetic data when `--padding_data_dir` is not a directory holding `ratings.csv`.
"""

from __future__ import annotations

import pathlib

import numpy as np

from launch.bench.measure import Table, interleaved_seconds


def client_steps(last_steps: np.ndarray, group_size: int, ordered: bool) -> int:
  """Client-steps a round computes when clients run `group_size` at a time in lockstep, each group as long
  as its longest client (`last_steps` [C]: a client's steps up to its last with an example); `ordered`:
  groups formed most-steps-first (`federated.client.order_by_steps`), else in client order."""
  steps = np.sort(last_steps)[::-1] if ordered else np.asarray(last_steps)
  return int(sum(len(g) * g.max() for g in np.split(steps, range(group_size, len(steps), group_size))))


def padding_round(data_dir: str | None, quick: bool):
  """`(config, base, lora, opt_state, batches, keys, tx, spec)` of the preset's first round."""
  import jax
  import jax.numpy as jnp
  import optax
  import models
  from federated import client, engine, experiment
  from fellrec_jax.config import RunConfig
  from fellrec_jax.data import pipeline
  real = data_dir is not None and (pathlib.Path(data_dir) / "ratings.csv").is_file()
  cfg = RunConfig(dataset="movielens" if real else "synthetic", data_dir=data_dir if real else None,
                  split="loo" if real else None, num_clients=5, model="tiny-llama", warm_start_steps=0,
                  lora_targets=("q", "k", "v", "o", "gate", "up", "down"), split_k=(1,),
                  max_train_samples=128 if quick else 1024, batch_size=4 if quick else 16)
  prep, _ = experiment.prepare(cfg)
  config, base, tokenizer = experiment.load_model(cfg, list(prep.titles))
  train, _ = experiment.task_examples(cfg, config, tokenizer, prep)
  epoch_steps = int(pipeline.steps_per_epoch(train, cfg.batch_size).max())
  it = pipeline.iterate(train, batch_size=cfg.batch_size, state={"seed": cfg.seed, "epoch": 0, "step": 0})
  batches = engine.round_batches(it, engine.micro_batches_per_round(cfg, epoch_steps), cfg.grad_accum,
                                 np.ones(len(train), bool))
  tx = optax.adamw(cfg.learning_rate)
  lora = jax.tree.map(jnp.array, engine.stack_clients(models.init_lora(config, jax.random.key(1)), len(train)))
  spec = client.LocalSpec(config, split_k=1)
  return ("ml-latest-small" if real else "synthetic", base, lora, jax.vmap(tx.init)(lora), batches,
          jax.random.split(jax.random.key(0), len(train)), tx, spec)


def padding_section(quick: bool, repeats: int, data_dir: str | None) -> dict:
  """Real-token share and client-steps of one round, and its time with every client in one vmapped
  program (lockstep: each runs as long as the longest) against size-ordered groups of 2 and of 1."""
  import jax
  from federated import client
  data, base, lora, opt_state, batches, keys, tx, spec = padding_round(data_dir, quick)
  example = batches["example_mask"]
  last = np.asarray([int(client.last_step_with_examples(e)) for e in example])
  b, t = batches["input_ids"].shape[-2:]
  real_tokens = int((batches["attention_mask"] > 0).sum())
  real_steps = int((example.reshape(len(last), example.shape[1], -1) > 0).any(-1).sum())
  executions = {"vmap_all": None, "groups_of_2": 2, "groups_of_1": 1}
  update = client.make_local_update(spec, tx)
  compiled = {name: jax.jit(client.over_clients(update, "vmap", g)).lower(
      base, lora, opt_state, batches, keys).compile() for name, g in executions.items()}
  times = interleaved_seconds({name: (lambda c=c: c(base, lora, opt_state, batches, keys))
                               for name, c in compiled.items()}, repeats)
  table = Table(f"padding: {data}, tiny-llama, C={len(last)} B={b} T={t}, one round",
                ["execution", "client-steps", "real tok share", "seconds", "x vmap_all"])
  runs = {}
  for name, g in executions.items():
    computed = client_steps(last, g or len(last), ordered=True)
    seconds = float(np.median(times[name]))
    runs[name] = {"group_size": g or len(last), "client_steps": computed,
                  "client_steps_unordered": client_steps(last, g or len(last), ordered=False),
                  "real_token_share": real_tokens / (computed * b * t), "seconds": seconds, "times": times[name]}
    runs[name]["vs_vmap_all"] = runs["vmap_all"]["seconds"] / seconds if "vmap_all" in runs else 1.0
    table.add(name, computed, runs[name]["real_token_share"], seconds, runs[name]["vs_vmap_all"])
  lengths = (batches["attention_mask"] > 0).sum(-1)[example > 0]
  return {"data": data, "shape": {"C": len(last), "S": int(example.shape[1]), "B": int(b), "T": int(t)},
          "steps_per_client": last.tolist(), "real_client_steps": real_steps, "real_tokens": real_tokens,
          "real_token_share_of_real_steps": real_tokens / (real_steps * b * t),
          "example_length_percentiles": dict(zip(("0", "10", "50", "90", "100"),
                                                 np.percentile(lengths, [0, 10, 50, 90, 100]).tolist())),
          "runs": runs}

"""`--mode=resources`: the flexible-storage table across cuts k, for real weights or a config.json alone.

`run(cfg, split_ks)` prints a table (`table`) and writes `<workdir>/resources.json`:
  {"model", "model_config", "batch_size", "seq_len", "dtype", "server_lora", "micro_per_round",
   "rows": [per-k `federated.resources.report`], ["auto_k", "client_memory_budget_mb"]}
`--model` may be a preset, a .gguf file, an HF directory, or a directory (or file) holding only a
config.json: shapes come from the config and no weights are read (`jax.eval_shape`).
Micro-batches are `[--batch_size, --cutoff_len]`: the memory and traffic of the longest batch a run allows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from absl import logging

import models
from fellrec_jax.config import RunConfig
from federated import engine, experiment, resources
from models.hf_checkpoint import hf_config

DEFAULT_KS = (1, 2, 4, 8, 16, 20, 24)


def model_config(cfg: RunConfig) -> models.ModelConfig:
  """The run's ModelConfig with its LoRA settings; weights are read only when there is no config.json."""
  path = pathlib.Path(cfg.model)
  config_json = path / "config.json" if path.is_dir() else (path if path.name.endswith(".json") else None)
  if config_json is not None and config_json.exists():
    config = hf_config(json.loads(config_json.read_text()), dtype=cfg.dtype)
  elif cfg.model in models.TINY_PRESETS:
    config, _, _ = models.load(cfg.model, dtype=cfg.dtype, seed=cfg.seed)
  else:
    config, _, _ = models.load(cfg.model, dtype=cfg.dtype)  # a preset or .gguf: its metadata decides the shapes
  return dataclasses.replace(config, lora=experiment.lora_config(cfg), remat=cfg.remat, scan_layers=cfg.scan_layers)


def micro_per_round(cfg: RunConfig) -> int | None:
  """Micro-batches in one local round of the largest client (as the engine computes it), or None
  when the run's data cannot be prepared here."""
  try:
    prep, _ = experiment.prepare(cfg)
  except Exception as e:  # the table stands without per-round traffic
    logging.warning("no per-round traffic: cannot prepare --dataset=%s (%s)", cfg.dataset, e)
    return None
  largest = max(len(prep.client_windows(c)) for c in range(prep.num_clients))
  return engine.micro_batches_per_round(cfg, math.ceil(largest / cfg.batch_size))


def run(cfg: RunConfig, split_ks: list[int] | None) -> dict[str, Any]:
  config = model_config(cfg)
  last = config.num_layers - 1
  ks = list(split_ks) if split_ks else [k for k in DEFAULT_KS if k <= last]
  bad = [k for k in ks if not 0 <= k <= last]
  if bad:
    raise ValueError(f"--split_k={bad} out of range: {cfg.model} has {config.num_layers} blocks, so 0 <= k <= {last}")
  b, t = cfg.batch_size, cfg.cutoff_len
  micro = micro_per_round(cfg)
  base = resources.abstract_params(config)
  lora = resources.abstract_lora(config)
  rows = [resources.report(config, k, batch_size=b, seq_len=t, base=base, lora=lora, server_lora=cfg.server_lora,
                           micro_per_round=micro) for k in ks]
  out: dict[str, Any] = {"model": cfg.model, "model_config": dataclasses.asdict(config), "batch_size": b,
                         "seq_len": t, "dtype": cfg.dtype, "server_lora": cfg.server_lora,
                         "micro_per_round": micro, "rows": rows}
  budgets = cfg.client_memory_budget_mb
  if budgets:
    out |= {"client_memory_budget_mb": list(budgets),
            "auto_k": [resources.choose_split_k(config, mb, b, t, server_lora=cfg.server_lora) for mb in budgets]}
  text = table(rows)
  print(f"{cfg.model}: {config.num_layers} blocks, {rows[0]['total_params'] / 1e6:.1f}M params, "
        f"batch {b}x{t}, {cfg.dtype}, server LoRA {cfg.server_lora}")
  print(text)
  if "auto_k" in out:
    print(f"--split_k=auto with --client_memory_budget_mb={list(budgets)}: k = {out['auto_k']}")
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "resources.json").write_text(json.dumps(out, indent=1))
  logging.info("wrote %s", workdir / "resources.json")
  return out


def table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of per-k reports (MiB, GFLOP per example)."""
  cols = [("k", "k", lambda r: f"{r['k']}"),
          ("client params", "cp", lambda r: f"{r['client_params'] / 1e6:.1f}M"),
          ("server params", "sp", lambda r: f"{r['server_params'] / 1e6:.1f}M"),
          ("client %", "cs", lambda r: f"{100 * r['client_share_params']:.1f}"),
          ("client MiB", "cb", lambda r: f"{(r['client_param_bytes'] + r.get('client_lora_bytes', 0) + r.get('client_opt_bytes', 0)) / resources.MIB:.1f}"),
          ("client peak MiB", "pk", lambda r: f"{r['client_peak_bytes'] / resources.MIB:.1f}"),
          ("footprint MiB", "fp", lambda r: f"{r['client_footprint_bytes'] / resources.MIB:.1f}"),
          ("server peak MiB", "sk", lambda r: f"{r['server_peak_bytes'] / resources.MIB:.1f}"),
          ("client GFLOP/ex", "cf", lambda r: f"{r['client_flops_per_example'] / 1e9:.2f}"),
          ("server GFLOP/ex", "sf", lambda r: f"{r['server_flops_per_example'] / 1e9:.2f}"),
          ("client FLOP %", "cfs", lambda r: f"{100 * r['client_share_flops']:.1f}"),
          ("up MiB/step", "up", lambda r: f"{r['bytes_up_per_step'] / resources.MIB:.2f}")]
  cells = [[c[0] for c in cols]] + [[c[2](r) for c in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)

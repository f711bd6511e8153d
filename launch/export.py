"""`--mode=export`: a trained workdir's client adapters in Hugging Face's formats, for serving outside this
framework with transformers + PEFT.

Under `<workdir>/export/` (the adapters under `export/<strategy>/` for a run of several --strategies):
- `client_<i>/`: client i's evaluated adapter (its best by --select_by; the last with --keep_best=false) as
  a PEFT adapter directory; a discriminative run's trainable item rows beside it in `items.safetensors`;
  a pooled (centralized) run's one model is `client_0`;
- `base/`: the base as a transformers model directory, unless --model already was one (presets, GGUF, the
  tiny presets with their warm start are written; an HF directory is referenced where it is);
- with --export_merged, `client_<i>_merged/`: the base with client i's adapter folded in.
The run's settings are read from its checkpoint and the base is rebuilt as training built it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
from absl import logging

import models
from fellrec_jax import checkpoint
from fellrec_jax.config import STRATEGIES, ConfigError, RunConfig
from federated import engine as engine_lib
from federated import experiment
from models.hf_checkpoint import save_hf_dir
from models.peft_export import save_adapter


def strategy_dirs(workdir: Path) -> dict[str | None, Path]:
  """Where each trained strategy keeps its checkpoints: the workdir itself for a run of one strategy (key
  None), else `<workdir>/<strategy>` per strategy."""
  if (workdir / "checkpoints").is_dir():
    return {None: workdir}
  found = {name: workdir / name for name in STRATEGIES if (workdir / name / "checkpoints").is_dir()}
  if not found:
    raise ConfigError(f"--workdir={workdir} holds no checkpoint: expected {workdir / 'checkpoints'} (or "
                      f"{workdir}/<strategy>/checkpoints for several --strategies); train there first")
  return found


def restore(run_dir: Path) -> tuple[dict, dict]:
  """`(state, meta)` of `run_dir`'s newest readable checkpoint: the saved FedState as a dict of arrays and
  the loop's metadata (which holds the run's configuration)."""
  restored = checkpoint.restore_latest(checkpoint.manager(run_dir), None)
  if restored is None:
    raise ConfigError(f"no readable checkpoint in {run_dir / 'checkpoints'}")
  _, state, meta = restored
  if "config" not in meta:
    raise ConfigError(f"the checkpoint in {run_dir / 'checkpoints'} stores no configuration (an older version "
                      "wrote it): its model cannot be rebuilt for export")
  return state, meta


def trained_config(saved: dict, cfg: RunConfig) -> RunConfig:
  """The configuration a checkpoint was trained with (JSON lists back to tuples), in this command's
  --workdir and, when given, --data_dir (the tiny presets' tokenizer is learned on the dataset's titles)."""
  names = {f.name for f in dataclasses.fields(RunConfig)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in names}
  values |= dict(mode="export", workdir=cfg.workdir, export_merged=cfg.export_merged,
                 data_dir=cfg.data_dir or values.get("data_dir"))
  return RunConfig(**values)


def rebuild_model(cfg: RunConfig):
  """`(config, base, tokenizer)` as `experiment` built them for training: the tiny presets learn their
  tokenizer on the catalogue's titles and tiny-llama is warm-started on them, seeded, so the data is
  prepared again; pretrained weights load as they are. Encoders are refused: PEFT's adapters here target
  transformers' decoders."""
  titles = list(experiment.prepare(cfg)[0].titles) if cfg.model in models.TINY_PRESETS else []
  model = experiment.load_model(cfg, titles)
  if not model[0].is_decoder:
    raise ConfigError(f"--model={cfg.model} (the run's) is an encoder: --mode=export writes PEFT adapters for "
                      "transformers' decoders (Llama, Mistral, Qwen2) only")
  return model


def export_base(cfg: RunConfig, config: models.ModelConfig, base, out: Path) -> str:
  """The base the adapters apply to: --model's own directory when it is a transformers one, else written
  to `out/base`. Returns its absolute path (the adapters' `base_model_name_or_path`)."""
  if Path(cfg.model).is_dir():
    return str(Path(cfg.model).absolute())
  path = save_hf_dir(out / "base", config, base)
  logging.info("wrote the base (%s) to %s", cfg.model, path)
  return str(path.absolute())


def evaluated_adapters(state: dict):
  """The adapters a run evaluated (`FedState.evaluated_lora`: each client's best, or its last with
  --keep_best=false) of a state restored as saved, leaves `[C, ...]` as numpy."""
  fields = {f.name: state.get(f.name) for f in dataclasses.fields(engine_lib.FedState)}
  return jax.tree.map(np.asarray, engine_lib.FedState(**fields).evaluated_lora)


def export_clients(cfg: RunConfig, model, state: dict, base_path: str, out: Path) -> int:
  """Writes each client's evaluated adapter to `out/client_<i>` and, with --export_merged, its merged model
  to `out/client_<i>_merged`. Returns the number of clients."""
  config, base, _ = model
  stacked = evaluated_adapters(state)
  num_clients = len(jax.tree.leaves(stacked)[0])
  for c in range(num_clients):
    lora = jax.tree.map(lambda x: x[c], stacked)
    save_adapter(out / f"client_{c}", config.lora, lora, base_path)
    if cfg.export_merged:
      save_hf_dir(out / f"client_{c}_merged", config, models.merge_lora(config, base, lora))
  return num_clients


def run(cfg: RunConfig) -> Path:
  """Exports every strategy's clients of `cfg.workdir`; returns `<workdir>/export`."""
  workdir = Path(cfg.workdir)
  runs = strategy_dirs(workdir)  # before the lock, which would create a missing workdir
  with checkpoint.workdir_lock(workdir):
    restored = {name: restore(run_dir) for name, run_dir in runs.items()}
    train_cfg = trained_config(next(iter(restored.values()))[1]["config"], cfg)
    model = rebuild_model(train_cfg)
    out = workdir / "export"
    base_path = export_base(train_cfg, model[0], model[1], out)
    for name, (state, meta) in restored.items():
      if meta["round"] < train_cfg.rounds:
        logging.warning("%s: the latest checkpoint is after round %d of --rounds=%d (an unfinished or early-"
                        "stopped run): exporting its adapters", runs[name], meta["round"], train_cfg.rounds)
      count = export_clients(train_cfg, model, state, base_path, out if name is None else out / name)
      logging.info("exported %d client adapter(s)%s of round %d to %s", count, f" of {name}" if name else "",
                   meta["round"], out if name is None else out / name)
  return out

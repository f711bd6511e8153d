"""Runs a tiny federated job and saves every client's final adapters: the body of the engine tests.

Usable in-process (`run`) and as a subprocess (`python tests/engine_worker.py OUT.npz [--rounds ...]`)
so tests can vary the device count (XLA_FLAGS) and the number of processes (jax.distributed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYNTHETIC = dict(num_users=36, num_items=40, interactions_per_user=12, num_groups=3)
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def make_config(workdir: str, **overrides):
  from fellrec_jax.config import RunConfig
  fields = dict(workdir=workdir, num_clients=3, partition="random", rounds=2, batch_size=8, local_epochs=1.0,
                learning_rate=5e-3, warm_start_steps=100, lora_targets=ALL_TARGETS, lora_dropout=0.0,
                split_k=(1,), eval_batch_size=16, max_eval_users=8)
  return RunConfig(**(fields | overrides))


def run(cfg, strategy: str = "fellrec", stop_after: int | None = None, before=None):
  """`(state, history, engine)` of `strategy`; `stop_after=r` raises after round r, like a killed job;
  `before(engine, prep, model)` is called once the engine is built, before the first round (tests use it
  to record what the loop hands the engine, or to script its validation)."""
  from fellrec_jax.data import prepare_dataset
  from federated import engine, experiment
  prep, _ = prepare_dataset("synthetic", num_clients=cfg.num_clients, partition=cfg.partition, seed=cfg.seed,
                            synthetic_kwargs=SYNTHETIC)
  model = experiment.load_model(cfg, list(prep.titles))
  eng = experiment.build_engine(cfg, strategy, prep, model)
  if before is not None:
    before(eng, prep, model)

  def on_round(log):
    if stop_after is not None and log["round"] == stop_after:
      raise KeyboardInterrupt(f"killed after round {stop_after}")
  state, history = engine.run_rounds(eng, cfg.workdir, on_round=on_round)
  return state, history, eng


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--mesh_clients", type=int, default=None)
  parser.add_argument("--mesh_model", type=int, default=1)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--client_group_size", type=int, default=None)
  args = parser.parse_args()
  import jax
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)
  import numpy as np
  from fellrec_jax import sharding
  cfg = make_config(args.workdir, mesh_clients=args.mesh_clients, mesh_model=args.mesh_model, num_clients=4,
                    client_group_size=args.client_group_size)
  state, history, _ = run(cfg)
  lora = sharding.to_host(state.lora)
  if jax.process_index() == 0:
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(lora)[0]}
    np.savez(args.out, train_loss=np.asarray([h["train_loss"] for h in history]), **flat)


if __name__ == "__main__":
  main()

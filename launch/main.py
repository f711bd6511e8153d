"""Entry point: `python -m launch.main --flagfile=launch/configs/quickstart.flags`."""

import json
import logging as logging_lib
import sys
from pathlib import Path

from absl import app, flags, logging

from fellrec_jax import host_memory
from fellrec_jax.config import ConfigError, Diverged
from fellrec_jax.data.sources import DataError
from launch import flags as run_flags

run_flags.define_flags()
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host: TPU pods, GPU "
                  "clusters, several CPU processes); every process runs the same command.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, where auto-detection does not apply.")
flags.DEFINE_integer("num_processes", None, "Number of processes, where auto-detection does not apply.")
flags.DEFINE_integer("process_id", None, "This process's index, where auto-detection does not apply.")
FLAGS = flags.FLAGS


def main(argv):
  # orbax logs every save step at INFO through absl; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= logging_lib.WARNING or "/orbax/" not in record.pathname
      and "tensorboardX" not in record.pathname)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.distributed or FLAGS.coordinator_address:
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    cfg = run_flags.config_from_flags(FLAGS)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e
  from models import ModelError  # imports jax: after flag parsing so --help stays fast
  try:
    run(cfg)
  except (ConfigError, DataError, ModelError, FileNotFoundError) as e:  # the user's input: one line naming the flag or file
    if FLAGS.verbosity >= 1:
      raise
    sys.exit(f"error: {e}\n(--verbosity=1 shows the traceback)")
  except Diverged as e:
    logging.error("%s", e)
    sys.exit(3)


def run(cfg) -> None:
  from federated import experiment  # after flag parsing so --help stays fast
  if cfg.mode in ("resources", "attack"):
    from launch import attack, resources
    (resources if cfg.mode == "resources" else attack).run(cfg, list(cfg.explicit_cuts) or None)
    print(f"results are in {Path(cfg.workdir).absolute()}")
    return
  if cfg.mode == "export":
    from launch import export
    print(f"exported to {export.run(cfg).absolute()}")
    return
  if cfg.mode == "prepare":
    _, stats = experiment.prepare(cfg)
    Path(cfg.workdir).mkdir(parents=True, exist_ok=True)
    out = Path(cfg.workdir) / "data_stats.json"
    out.write_text(json.dumps(stats, indent=1))
    logging.info("wrote %s", out)
    return
  results = experiment.train_and_evaluate(cfg)
  for name, res in results.items():
    logging.info("%s: test %s", name, res["test"]["overall"])
  print(f"results are in {Path(cfg.workdir).absolute()}")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()
  app.run(main)

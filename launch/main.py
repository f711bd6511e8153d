"""Entry point: `python -m launch.main --flagfile=launch/configs/quickstart.flags`."""

import json
import logging as logging_lib
from pathlib import Path

from absl import app, flags, logging

from fellrec_jax.config import ConfigError
from launch import flags as run_flags

run_flags.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  logging_lib.getLogger("absl").setLevel(logging_lib.INFO)
  for noisy in ("orbax", "jax._src"):  # per-save chatter would bury the round logs
    logging_lib.getLogger(noisy).setLevel(logging_lib.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = run_flags.config_from_flags(FLAGS)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e
  from federated import experiment  # after flag parsing so --help stays fast
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
  app.run(main)

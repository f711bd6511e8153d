"""The command line: flag errors name the flag, prepare mode, and the quickstart end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags

from fellrec_jax import report
from fellrec_jax.config import ConfigError, RunConfig
from launch import flags as run_flags

ROOT = Path(__file__).resolve().parents[1]


def _main(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("bad, flag", [(dict(rounds=0), "--rounds"), (dict(split_k=(1, 2)), "--split_k"),
                                       (dict(strategies=("fedsgd",)), "--strategies"),
                                       (dict(clients_per_round=9), "--clients_per_round"),
                                       (dict(client_group_size=2, client_execution="sequential"),
                                        "--client_group_size"),
                                       (dict(rounds=2, profile_rounds=(2,)), "--profile_rounds"),
                                       (dict(decoding=("beam",)), "--decoding"),
                                       (dict(decoding=("l2", "l2")), "--decoding"),
                                       (dict(decoding=("constrained",), num_beams=10), "--num_beams"),
                                       (dict(prompt="short"), "--prompt"),
                                       (dict(dtype="int8"), "--dtype"), (dict(dtype="foo"), "--dtype"),
                                       (dict(max_train_samples=0), "--max_train_samples"),
                                       (dict(cut_noise=0.5), "--cut_noise"),  # no --split_k: no cut to defend
                                       (dict(split_k=(1,), cut_noise=-1.0), "--cut_noise"),
                                       (dict(split_k=(1,), cut_noise=float("nan")), "--cut_noise"),
                                       (dict(split_k=(1,), cut_clip=0.0), "--cut_clip"),
                                       (dict(split_k=(1,), cut_nopeek=-0.1), "--cut_nopeek"),
                                       (dict(split_k=(0,), cut_nopeek=1.0), "--cut_nopeek"),
                                       (dict(split_k=(1,), private_response=True, train_on_inputs=True),
                                        "--private_response"),
                                       (dict(private_response=True), "--private_response"),
                                       (dict(loss_upload_noise=-1.0), "--loss_upload_noise"),
                                       (dict(loss_upload_step=0.0), "--loss_upload_step"),
                                       (dict(mode="attack", attack_sweep=("cut_noize=1",)), "--attack_sweep"),
                                       (dict(mode="attack", attack_sweep=("cut_noise=big",)), "--attack_sweep"),
                                       (dict(attack_sweep=("cut_noise=1",)), "--attack_sweep")])
def test_bad_settings_name_their_flag(bad, flag):
  with pytest.raises(ConfigError, match=flag):
    RunConfig(**bad)


def test_constrained_decoding_needs_a_beam_per_ranked_item():
  assert RunConfig(decoding=("constrained", "l2"), num_beams=10, metric_ks=(5, 10)).decoding[0] == "constrained"


def test_comparison_lists_each_decoding_of_the_same_adapters():
  result = lambda ndcg: {"overall": {"ndcg@10": ndcg, "test_users": 4},
                         "balance": {"metric": "ndcg@10", "std": 0.0, "min": ndcg, "cv": 0.0}}
  runs = {"fellrec": {"test": result(0.3), "test_by_decoding": {"constrained": result(0.3), "l2": result(0.1)}},
          "fedavg": {"test": result(0.2)}}
  lines = report.comparison_table(runs, {"most_popular": result(0.05)}).splitlines()
  assert [line.split(" | ")[0] for line in lines[2:]] == ["| fellrec", "| fellrec, --decoding=l2", "| fedavg",
                                                          "| most-popular (reference)"]
  assert lines[3].split(" | ")[1] == "0.1000"


def test_list_flag_with_a_bad_element_names_the_flag():
  values = flags.FlagValues()
  run_flags.define_flags(values)
  values(["prog", "--split_k=1,x"])
  with pytest.raises(ConfigError, match="--split_k"):
    run_flags.config_from_flags(values)


def test_split_k_auto_needs_a_budget_and_parses():
  values = flags.FlagValues()
  run_flags.define_flags(values)
  values(["prog", "--split_k=auto", "--client_memory_budget_mb=512"])
  assert run_flags.config_from_flags(values).split_k == ("auto",)
  with pytest.raises(ConfigError, match="--split_k"):
    RunConfig(split_k=("auto",))


def test_every_flag_has_help_text():
  assert set(run_flags.HELP) == {f.name for f in RunConfig.__dataclass_fields__.values()}
  assert all(text.strip() for text in run_flags.HELP.values())


def test_unknown_enum_value_fails_naming_the_flag(tmp_path):
  out = _main("--task=ranking", f"--workdir={tmp_path}", timeout=120)
  assert out.returncode != 0 and "--task" in out.stderr


def test_prepare_writes_data_stats(tmp_path):
  out = _main("--mode=prepare", "--dataset=synthetic", "--num_clients=4", "--partition=random",
              f"--workdir={tmp_path}", timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  stats = json.loads((tmp_path / "data_stats.json").read_text())
  assert len(stats["clients"]) == 4
  assert sum(c["users"] for c in stats["clients"]) == stats["users"]
  assert all(c["train_examples"] > 0 for c in stats["clients"])


def _random_recall_at_10(cfg):
  """Expected recall@10 of a uniformly random ranking of each test user's rankable items."""
  from federated import experiment
  prep, _ = experiment.prepare(cfg)
  expected = []
  for u in range(prep.split.num_users):
    targets = prep.split.test_targets[u]
    if not len(targets):
      continue
    excluded = set(prep.split.train[u]) | set(prep.split.test_history[u]) | set(prep.split.valid_targets[u])
    candidates = prep.dataset.num_items - len(excluded)
    expected.append(min(10, candidates) / candidates)
  return float(np.mean(expected))


@pytest.mark.slow
def test_quickstart_end_to_end_beats_random(tmp_path):
  # item-kNN only: SASRec's fit is tested in test_baselines and would double this test's time
  out = _main("--flagfile=launch/configs/quickstart.flags", "--num_clients=3", "--rounds=2", "--baselines=item_knn",
              f"--workdir={tmp_path}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert str(tmp_path) in out.stdout
  results = json.loads((tmp_path / "results.json").read_text())
  assert [r["round"] for r in results["rounds"]] == [0, 1]
  assert len(results["test"]["clients"]) == 3
  assert results["resources"]["bytes_up"] > 0 and results["resources"]["server_params"] > 0
  assert set(results["baselines"]) == {"most_popular", "item_knn"}
  assert set(results["baselines"]["item_knn"]) == set(results["test"]["overall"])
  cfg = RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items()})
  assert results["test"]["overall"]["recall@10"] > _random_recall_at_10(cfg)

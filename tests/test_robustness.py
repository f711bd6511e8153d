"""Runs that never lie: diverged clients isolated, resume checks its configuration, one run per workdir,
checkpoint fallback, one-line errors."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine_worker
from fellrec_jax import checkpoint
from fellrec_jax.config import ConfigError, Diverged
from federated import losses
from federated import engine as engine_lib

ROOT = Path(__file__).resolve().parents[1]


def _poisoned_loss(outputs, batch, items_id):
  """The generative loss times the batch's "poison" entries (NaN for a client made to diverge)."""
  loss_sum, count = losses.generative_loss(outputs, batch, items_id)
  return loss_sum * jnp.mean(batch.get("poison", jnp.ones(()))), count  # the memory estimate's batches have none


def _run(cfg, strategy, poisoned=(), absent=(), monkeypatch=None):
  """`(state, history)` of a run where the clients in `poisoned` get NaN losses every step and those in
  `absent` never participate."""
  from fellrec_jax.data import prepare_dataset
  from federated import experiment
  prep, _ = prepare_dataset("synthetic", num_clients=cfg.num_clients, partition=cfg.partition, seed=cfg.seed,
                            synthetic_kwargs=engine_worker.SYNTHETIC)
  eng = experiment.build_engine(cfg, strategy, prep, experiment.load_model(cfg, list(prep.titles)))
  eng.loss_fn = _poisoned_loss
  eng.participants = lambda r: ~np.isin(np.arange(cfg.num_clients), absent)
  draw = engine_lib.round_batches

  def with_poison(*args):
    batches = draw(*args)
    poison = np.ones(batches["example_mask"].shape, np.float32)
    poison[list(poisoned)] = np.nan
    return batches | {"poison": poison}
  monkeypatch.setattr(engine_lib, "round_batches", with_poison)
  return engine_lib.run_rounds(eng, cfg.workdir)


@pytest.mark.slow
def test_a_diverged_client_is_left_out_and_the_others_train_as_without_it(tmp_path, monkeypatch):
  """FELLRec: the diverged client has no row, column or warm-weight share in anyone's aggregate."""
  poisoned, history = _run(engine_worker.make_config(str(tmp_path / "a"), rounds=1), "fellrec", poisoned=[2],
                           monkeypatch=monkeypatch)
  without, _ = _run(engine_worker.make_config(str(tmp_path / "b"), rounds=1), "fellrec", absent=[2],
                    monkeypatch=monkeypatch)
  assert [h["diverged"] for h in history] == [[False, False, True]]
  assert all(np.isfinite(h["train_loss"]).all() for h in history)
  for a, b in zip(jax.tree.leaves(poisoned.lora), jax.tree.leaves(without.lora)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_array_equal(np.asarray(a)[:2], np.asarray(b)[:2])


@pytest.mark.slow  # an engine run to its first round (~30 s warm, ~50 s with a cold compilation cache)
def test_every_client_diverging_stops_the_run_naming_the_learning_rate(tmp_path, monkeypatch):
  with pytest.raises(Diverged, match="round 0: every participating client.*--learning_rate"):
    _run(engine_worker.make_config(str(tmp_path), rounds=1), "fedavg", poisoned=[0, 1, 2], monkeypatch=monkeypatch)


@pytest.mark.slow
def test_resume_checks_the_configuration(tmp_path):
  engine_worker.run(engine_worker.make_config(str(tmp_path), rounds=1))
  with pytest.raises(ConfigError, match="holds a run trained with other settings") as e:
    engine_worker.run(engine_worker.make_config(str(tmp_path), rounds=1, learning_rate=1e-2, lora_rank=4))
  assert "--learning_rate=0.005 -> 0.01" in str(e.value) and "--lora_rank=8 -> 4" in str(e.value)
  # A setting that does not change training may differ: the finished run is found and not retrained.
  _, history, _ = engine_worker.run(engine_worker.make_config(str(tmp_path), rounds=1, eval_batch_size=4))
  assert [h["round"] for h in history] == [0]


@pytest.mark.slow
def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  cfg = engine_worker.make_config(str(tmp_path), rounds=2, checkpoint_every=1)
  state, _, eng = engine_worker.run(cfg)
  mngr = checkpoint.manager(cfg.workdir)
  assert mngr.all_steps() == [1, 2]
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:7])  # truncated
  step, restored, meta = checkpoint.restore_latest(mngr, state)
  assert step == 1 and meta["round"] == 1
  assert any("checkpoints/2 is unreadable" in r.getMessage() and "resuming from step 1" in r.getMessage()
             for r in caplog.records)


def test_one_run_per_workdir(tmp_path):
  holder = "import sys, time; from fellrec_jax import checkpoint\n" \
           "with checkpoint.workdir_lock(sys.argv[1]):\n  print('locked', flush=True); time.sleep(60)"
  proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(ConfigError, match=rf"--workdir={tmp_path} is in use by another run \(pid {proc.pid}"):
      with checkpoint.workdir_lock(tmp_path):
        pass
  finally:
    proc.kill()
    proc.wait()
  with checkpoint.workdir_lock(tmp_path):  # the kernel dropped the dead holder's lock
    pass


@pytest.mark.parametrize("flags, named", [
    (["--dataset=movielens", "--data_dir={tmp}"], "{tmp}"),  # a data directory without ratings
    # model errors come before the data work: the missing data directory is never reached
    (["--model={tmp}/weights.gguf", "--dataset=movielens", "--data_dir={tmp}/none"], "unknown model '{tmp}/weights.gguf'"),
    (["--model={root}/tests/fixtures/llama-7b", "--dataset=movielens", "--data_dir={tmp}/none"], "no *.safetensors"),
    (["--workdir={tmp}/file/w"], "--workdir={tmp}/file/w cannot be created"),  # under a regular file
])
def test_user_errors_print_one_line_without_a_traceback(tmp_path, flags, named):
  fill = lambda s: s.format(tmp=tmp_path, root=ROOT)
  (tmp_path / "file").write_text("not a directory")
  out = subprocess.run([sys.executable, "-m", "launch.main", f"--workdir={tmp_path / 'w'}", *map(fill, flags)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "Traceback" not in out.stderr
  last = out.stderr.strip().splitlines()[-2]
  assert last.startswith("error: ") and fill(named) in last, out.stderr[-2000:]


def test_probes_classify_a_named_error_as_clear_and_an_unnamed_one_as_unclear():
  import dataclasses
  from launch import probes
  probe = next(p for p in probes.PROBES if p.name == "dtype int8")
  clear = probes.run_probe(probe)
  assert clear["verdict"] == "CLEAR" and clear["exit"] != 0 and "--dtype" in clear["answer"]
  assert probes.run_probe(dataclasses.replace(probe, expect="--no_such_flag"))["verdict"] == "UNCLEAR"

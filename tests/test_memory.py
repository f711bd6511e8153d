"""Memory that fits: the estimated peak of a round matches a measured one, grows with the client group
size and not with the number of clients, and a run that will not fit is refused naming the flags.

The measured run is a subprocess (this file run as a script), so its peak RSS is that of one fresh
process doing one round, not of the test session; the peak is reset after compiling (Linux), so what is
compared is the round the estimate describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402

# Big enough that the round's activations and logits (hundreds of MB) dominate the ~0.4 GB baseline of
# Python + JAX, small enough for one round in seconds on two cores.
MEASURED = dict(num_clients=4, batch_size=16, seq_len=128, hidden=256, layers=4, vocab=8000)
SMALL = dict(num_clients=4, batch_size=4, seq_len=32, hidden=64, layers=2, vocab=512)


def make_engine(num_clients: int, batch_size: int, seq_len: int, hidden: int, layers: int, vocab: int, *,
                group_size: int | None = None, split_k: int | None = None, examples_per_client: int | None = None,
                targets: tuple[str, ...] = ("q", "v"), strategy=("fedavg", {}), **run_config):
  """An engine on random token data of a random-init decoder: one micro-batch per client per round
  (`local_epochs` is a fraction), every position a target, so the full `[B, T, V]` logits are live."""
  import jax
  import numpy as np

  import models
  from federated import engine as engine_lib
  from federated import strategies
  from fellrec_jax import sharding
  from fellrec_jax.config import RunConfig
  from fellrec_jax.data import pipeline

  n = examples_per_client or 2 * batch_size
  config = models.tiny_llama(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=4, num_kv_heads=2,
                             head_dim=hidden // 4, intermediate_size=2 * hidden, max_positions=max(seq_len, 64),
                             lora=models.LoraConfig(rank=8, alpha=16, dropout=0.0, targets=targets))
  base = models.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)

  def client_examples(count):
    tokens = rng.integers(3, vocab, size=count * seq_len).astype(np.int32)
    return pipeline.TokenizedExamples(tokens=tokens, offsets=np.arange(count + 1, dtype=np.int64) * seq_len,
                                      loss_start=np.ones(count, np.int64), seq_len=seq_len, pad_id=0,
                                      num_targets=seq_len - 1)

  train = [client_examples(n) for _ in range(num_clients)]
  valid = [client_examples(2) for _ in range(num_clients)]
  cfg = RunConfig(**(dict(num_clients=num_clients, batch_size=batch_size, local_epochs=batch_size / n, rounds=1,
                          client_group_size=group_size, eval_batch_size=2, lora_dropout=0.0,
                          split_k=None if split_k is None else (split_k,)) | run_config))
  return engine_lib.Engine(cfg, config, base, train, valid, strategies.make_strategy(strategy[0], **strategy[1]),
                           sharding.make_mesh(), [split_k] * num_clients)


def high_water_bytes() -> int:
  """This process's peak RSS since the last `reset_high_water` (Linux VmHWM)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_high_water() -> None:
  """Resets VmHWM (and ru_maxrss) to the current RSS (Linux >= 4.0, `clear_refs` 5)."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def measure(params: dict) -> dict:
  """In this (fresh) process: the estimate, then one real round; returns both, the peak RSS of the round
  (from just before the state is allocated: the estimate counts the state, the round and validation on top
  of the RSS after compiling) and the peak at each stage, for a failure's message."""
  import jax
  import numpy as np

  from federated import engine as engine_lib
  from federated import round_memory
  from fellrec_jax import host_memory

  eng = make_engine(**params)
  stages = {"engine": high_water_bytes()}
  est = round_memory.estimate_round_peak(eng)
  stages["estimate (compiles)"] = high_water_bytes()
  reset_high_water()
  stages["reset"] = high_water_bytes()
  state = eng.init_state(jax.random.key(0))
  it = engine_lib.pipeline.iterate(eng.train_examples, batch_size=eng.cfg.batch_size,
                                   state={"seed": 0, "epoch": 0, "step": 0})
  participating = np.ones(eng.num_clients, bool)
  batches = engine_lib.round_batches(it, eng.micro_per_round, eng.cfg.grad_accum, participating)
  state, stats = eng.local_training(state, batches, jax.random.key(1))
  jax.block_until_ready((state, stats))
  stages["round"] = high_water_bytes()
  state, _ = eng.validate(state)
  jax.block_until_ready(state)
  stages["validate"] = high_water_bytes()
  import os
  import platform
  machine = {"arch": platform.machine(), "cpus": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
             "jax": jax.__version__}
  return {"estimate": est, "peak": stages["validate"], "stages": stages, "machine": machine,
          "rss_now": host_memory.process_rss_bytes()}


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def measured_run():
  """The measured subprocess, started first: XLA compiles on one core, so it overlaps the in-process ones."""
  proc = subprocess.Popen([sys.executable, __file__, json.dumps(MEASURED)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def small(measured_run):
  """Small engines at (clients, group size) and their round estimates (no held-out program)."""
  from federated import round_memory
  engines = {(c, g): make_engine(**(SMALL | dict(num_clients=c)), group_size=g) for c, g in ((4, 1), (8, 1), (4, None))}
  return {key: (eng, round_memory.estimate_round_peak(eng, with_heldout=False)) for key, eng in engines.items()}


@pytest.mark.slow  # the measured rounds of the `small` fixture (~30 s cold)
def test_peak_grows_with_group_size_not_with_clients(small):
  one_of_4, one_of_8, four_of_4 = small[4, 1][1], small[8, 1][1], small[4, None][1]
  assert (one_of_4["group_size"], one_of_8["group_size"], four_of_4["group_size"]) == (1, 1, 4)
  # twice the clients, one at a time: the same scratch; only the per-client arguments grow
  assert one_of_8["round_temp"] == pytest.approx(one_of_4["round_temp"], rel=0.1)
  args = lambda e: e["programs"][0]["argument_bytes"]
  # state = lora + Adam's two moments + best_lora; the round takes lora, the moments and the batches
  per_client = lambda e: (3 * e["state"] / 4 + e["device_batches"]) / e["num_clients"]
  assert args(one_of_8) - args(one_of_4) == pytest.approx(4 * per_client(one_of_4), rel=0.05)
  # four clients per program: about four times the scratch
  assert 3 * one_of_4["round_temp"] < four_of_4["round_temp"] < 5 * one_of_4["round_temp"]


@pytest.mark.slow  # shares the `small` fixture
def test_the_round_updates_the_state_in_place(small):
  """The engine donates the adapters and the moments, so an added client costs its arguments (state and
  batches) and no copy of them; with the adapters kept as the anchor, XLA used to copy the donated moments
  into the grouped loop and back out, and return new adapters beside the old (SmolLM2: 9.9 vs 5.5 MB per
  client). The anchor is now a copy the engine makes when something reads it after the round."""
  four, eight = small[4, 1][1], small[8, 1][1]
  prog = lambda e: e["programs"][0]
  added_args = prog(eight)["argument_bytes"] - prog(four)["argument_bytes"]
  peak = lambda e: sum(prog(e)[k] for k in ("argument_bytes", "output_bytes", "temp_bytes")) - prog(e)["alias_bytes"]
  added_peak = peak(eight) - peak(four)
  # beyond the arguments, 4 clients add a copy of their batches (XLA copies the undonated batches into the
  # loop: 2 KB a client here, 252 bytes in the SmolLM2 scale section) and their keys and statistics
  batches = eight["device_batches"] - four["device_batches"]
  assert added_args <= added_peak <= added_args + batches + 4 * 64, (added_args, added_peak, batches)
  import jax
  from federated.resources import nbytes
  adapters = nbytes(small[4, 1][0].init_state(jax.random.key(0)).lora)
  assert four["anchor"] == 0  # FedAvg reads no starting adapters after the round: none are copied
  # state = adapters + two fp32 moments + int32 step counts + best adapters
  assert 4 * adapters < four["state"] <= 4 * adapters + 4 * 16
  assert prog(four)["alias_bytes"] >= 3 * adapters  # new adapters and moments written over the old
  assert four["round_outputs"] < 4 * 1024  # what is not: the statistics


@pytest.mark.slow  # the measured_run fixture and an engine resume (~45 s from a cold compilation cache)
def test_copies_of_the_adapters_are_held_only_when_read(small, tmp_path):
  """The round's starting adapters are copied only for what reads them after the round (an update-based
  FELLRec similarity here), the best adapters only with --keep_best; without them the last adapters are
  evaluated, and a run checkpoints and resumes."""
  import jax
  import numpy as np
  from federated import engine as engine_lib
  from federated import round_memory
  from federated.resources import nbytes
  default_eng, default = small[4, None]
  adapters = nbytes(default_eng.init_state(jax.random.key(0)).lora)
  update_based = make_engine(**SMALL, strategy=("fellrec", {"fellrec_similarity": "update"}))
  lean = make_engine(**SMALL, keep_best=False, rounds=2)
  assert (default_eng.needs_anchor, update_based.needs_anchor, lean.needs_anchor) == (False, True, False)
  assert round_memory.estimate_round_peak(update_based, with_heldout=False)["anchor"] == adapters
  assert default["state"] - round_memory.estimate_round_peak(lean, with_heldout=False)["state"] == adapters
  state, _ = engine_lib.run_rounds(lean, str(tmp_path))
  assert state.best_lora is None and state.evaluated_lora is state.lora
  resumed, history = engine_lib.run_rounds(make_engine(**SMALL, keep_best=False, rounds=2), str(tmp_path))
  assert [h["round"] for h in history] == [0, 1] and resumed.best_lora is None  # restored, nothing left to run
  for got, want in zip(jax.tree.leaves(resumed.lora), jax.tree.leaves(state.lora)):
    np.testing.assert_array_equal(got, want)


def test_a_run_that_will_not_fit_is_refused_naming_the_flags(small, caplog, monkeypatch):
  from federated import round_memory
  from fellrec_jax import host_memory
  from fellrec_jax.config import ConfigError
  eng, est = small[4, None]  # group size unset: all 4 clients in one program; its round is compiled already
  growth = est["total"] - est["resident"]  # what a round adds to this process, whatever its RSS now
  with caplog.at_level("INFO"):
    assert round_memory.check_memory_fits(eng, available=10 * growth)["total"] > 0
  assert "estimated peak memory of a round" in caplog.text
  # room for about half the scratch: two clients per program
  with pytest.raises(ConfigError, match=r"--client_group_size=2 .*--batch_size=4.*--cutoff_len.*--split_k"):
    round_memory.check_memory_fits(eng, available=growth - est["round_temp"] // 2)
  with pytest.raises(ConfigError, match=r"--client_group_size=1 alone is not enough"):
    round_memory.check_memory_fits(eng, available=1)
  monkeypatch.setattr(host_memory, "available_memory_bytes", lambda: 1)
  with pytest.raises(ConfigError, match="--client_group_size"):
    round_memory.check_memory_fits(eng)


def test_available_memory_and_rss_are_sane():
  import os
  from fellrec_jax import host_memory
  assert 0 < host_memory.available_memory_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  assert 0 < host_memory.process_rss_bytes() <= host_memory.peak_rss_bytes() * 1.01


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_estimate_is_within_25_percent_of_the_measured_peak(measured_run):
  stdout, stderr = measured_run.communicate(timeout=600)
  assert measured_run.returncode == 0, stderr[-4000:]
  result = json.loads(stdout.strip().splitlines()[-1])
  est, peak = result["estimate"], result["peak"]
  assert est["round_temp"] > est["resident"], est  # the round, not the baseline, is what is measured
  summary = {key: value for key, value in est.items() if key != "programs"}
  assert abs(est["total"] - peak) / peak <= 0.25, (est["total"] / peak, result["stages"], result["machine"], summary)


if __name__ == "__main__":
  print(json.dumps(measure(json.loads(sys.argv[1]))))


def test_wants_huge_pages_conditions(tmp_path):
  import platform
  from fellrec_jax import host_memory
  thp = tmp_path / "enabled"
  thp.write_text("always [madvise] never\n")
  libc, version = platform.libc_ver()
  glibc_ok = libc == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= (2, 35)
  if sys.platform != "linux" or not glibc_ok:
    assert not host_memory.wants_huge_pages({}, str(thp))
    return
  assert host_memory.wants_huge_pages({}, str(thp))
  assert not host_memory.wants_huge_pages({"FELLREC_HUGE_PAGES": "0"}, str(thp))  # the opt-out
  assert not host_memory.wants_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, str(thp))  # already chosen
  assert not host_memory.wants_huge_pages({}, str(tmp_path / "missing"))
  thp.write_text("always madvise [never]\n")
  assert not host_memory.wants_huge_pages({}, str(thp))


def test_restart_with_huge_pages_sets_the_tunable_once():
  """The restart re-executes the same command (here `python -c`) with the tunable added to the others."""
  import os
  from fellrec_jax import host_memory
  code = ("import os; from fellrec_jax import host_memory; host_memory.restart_with_huge_pages(); "
          "print(os.environ.get('GLIBC_TUNABLES'))")
  env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")
  env.pop("FELLREC_HUGE_PAGES", None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                       cwd=str(Path(__file__).resolve().parents[1])).stdout.strip()
  expected = "glibc.malloc.trim_threshold=1000000"
  if host_memory.wants_huge_pages(env):
    expected += ":" + host_memory.HUGE_PAGES_TUNABLE
  assert out == expected

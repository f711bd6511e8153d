"""Smoke test of `launch.benchmark`: every section's pieces on tiny sizes, and the JSON keys. Not timed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from launch import benchmark  # noqa: F401 (defines the flags the sections read)
from launch.bench import (aggregation, client_execution, cpu_round, fixtures, loss_positions, measure, original_design,
                          scale, summary)


@pytest.fixture(autouse=True)
def tiny_flags():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  saved = {k: flags.FLAGS[k].value for k in ("exec_clients", "exec_batch_size", "exec_seq_len", "exec_local_steps",
                                             "scale_group_size")}
  flags.FLAGS.exec_clients, flags.FLAGS.exec_batch_size, flags.FLAGS.exec_seq_len = 2, 1, 8
  flags.FLAGS.exec_local_steps, flags.FLAGS.scale_group_size = 1, 2
  yield
  for k, v in saved.items():
    flags.FLAGS[k].value = v


def test_jaxpr_flops_counts_scan_bodies_times_length():
  def f(x, w):
    return jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
  x, w = jnp.ones((4, 5)), jnp.ones((3, 5, 5))
  assert measure.jaxpr_flops(f, x, w) == 3 * 2 * 4 * 5 * 5
  assert measure.jaxpr_flops(jax.jit(lambda a, b: a @ b), jnp.ones((2, 3)), jnp.ones((3, 7))) == 2 * 2 * 3 * 7


def test_synthetic_batches_are_right_padded_with_shifted_targets():
  b = fixtures.synthetic_batches(2, 1, 1, 3, 8, vocab=50, pad_id=0)
  am = b["attention_mask"]
  assert b["input_ids"].shape == (2, 1, 1, 3, 8) and b["target_index"].shape == (2, 1, 1, 3, 7)
  assert np.all(np.diff(am, axis=-1) <= 0)  # ones then zeros
  assert np.all(b["input_ids"][am == 0] == 0)
  np.testing.assert_array_equal(b["target_mask"], am[..., 1:])  # every real next token
  np.testing.assert_array_equal(b["target_index"], np.arange(7) * am[..., 1:])
  r = fixtures.synthetic_batches(2, 1, 1, 3, 8, vocab=50, pad_id=0, response_tokens=2)
  length = r["attention_mask"].sum(-1)
  np.testing.assert_array_equal(r["target_index"], np.stack([length - 3, length - 2], -1))  # the last 2 tokens
  assert r["target_mask"].all()


@pytest.mark.slow
def test_sections_smoke_and_json_keys(tmp_path):
  peak, bandwidth = 1e11, 1e10
  out = {"client_execution": client_execution.client_execution_section(True, False, 1, peak)}
  out["mfu"] = client_execution.mfu_summary(out["client_execution"], peak, "test")
  out["loss_positions"] = loss_positions.loss_positions_section(True, False, 1, model="tiny-llama")
  out["cpu_round"] = cpu_round.cpu_round_section(True, 1, model="tiny-llama")
  out["aggregation"] = aggregation.aggregation_section(True, 1, bandwidth, peak, sizes=[("smollm2-135m", (2,))])
  out["scale"] = scale.scale_section(True, False, False, model="tiny-llama", confirm=False, check_run=False)
  out["original_design"] = original_design.original_design_section(True, 1)
  out["seconds"] = 0.0
  summary.summary(out)
  data = json.loads(json.dumps(out, default=float))

  run = data["client_execution"]["runs"][0]
  # the reported ratios are the quotients of the reported times (not independent numbers), and every
  # time is a finite, positive wall time
  times = [run[k] for k in ("vmap_seconds", "sequential_seconds", "sequential_presliced_seconds")]
  assert all(np.isfinite(t) and 0 < t < 600 for t in times), times  # 600 s: the whole test's timeout
  assert data["client_execution"]["speedup"] == pytest.approx(run["sequential_seconds"] / run["vmap_seconds"])
  assert run["flops_per_round_jaxpr"] > run["xla_cost_analysis"]["flops"] > 0  # loop bodies x trip counts
  # MFU = the jaxpr's FLOPs / the vmapped round's time / the peak given; at most 1, as 2 CPU cores reach
  # well under the test's nominal peak of 1e11 FLOP/s on a B=1, T=8 tiny-llama round
  head = data["mfu"]["runs"][-1]
  assert head["achieved_flops_per_s"] == pytest.approx(head["flops_per_round_jaxpr"] / head["vmap_seconds"])
  assert data["mfu"]["value"] == pytest.approx(head["achieved_flops_per_s"] / peak)
  assert 0 < data["mfu"]["value"] <= 1.0
  lp = data["loss_positions"]
  assert lp["runs"]["every_token"]["head_positions"] == 63 and lp["runs"]["response_16"]["head_positions"] == 16
  assert lp["runs"]["response_16"]["target_tokens"] == 2 * 16 < lp["runs"]["every_token"]["target_tokens"]
  every, resp = lp["runs"]["every_token"], lp["runs"]["response_16"]
  assert lp["speedup"] == pytest.approx(every["seconds"] / resp["seconds"])
  assert lp["memory_ratio"] == pytest.approx(every["peak_bytes"] / resp["peak_bytes"])
  assert lp["memory_ratio"] > 1  # fewer fp32 logits to hold
  cpu = data["cpu_round"]["runs"]
  assert cpu["preset"]["vs_preset"] == 1.0 and cpu["alpaca_prompt"]["T"] > cpu["no_cutoff"]["T"] > cpu["preset"]["T"]
  assert all(np.isfinite(r["seconds_per_step"]) and 0 < r["seconds_per_step"] < 600 for r in cpu.values())
  for r in cpu.values():
    assert r["vs_preset"] == pytest.approx(r["seconds_per_step"] / cpu["preset"]["seconds_per_step"])
    rows = data["cpu_round"]["shape"]["B"]
    assert r["padded_tokens_per_s"] * r["seconds_per_step"] == pytest.approx(rows * r["T"])  # B rows of T tokens
  agg = data["aggregation"][0]
  assert {"C", "model", "seconds", "bytes", "roofline_seconds", "roofline_fraction"} <= set(agg)
  assert agg["bytes"] == 3 * 2 * 4 * 460800  # SmolLM2 q,v r=8: 460,800 fp32 params per client
  sc = data["scale"]
  assert sc["max_clients"] >= 2 and sc["max_clients"] % sc["group_size"] == 0  # whole groups
  assert sc["bytes_per_client"] == sc["donated"]["measured_bytes_per_client"]
  # each added client brings at least its adapters and optimizer state (donated in place: counted once)
  assert sc["bytes_per_client"] >= sc["state_bytes_per_client"], (sc["bytes_per_client"], sc["state_bytes_per_client"])
  od = data["original_design"][0]
  assert od["ratio"] == pytest.approx(od["original_seconds"] / od["ours_seconds"])
  assert all(np.isfinite(od[k]) and od[k] > 0 for k in ("original_seconds", "ours_seconds"))


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
  """launch/gpu_check.sh end to end on this CPU (GPU_CHECK_DRY_RUN), so the script a GPU session runs
  is known to work before device time is spent on it."""
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", str(root / "launch/gpu_check.sh"), "--sections=loss_positions"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "python packages ok" in proc.stdout
  data = json.loads((tmp_path / "benchmark_gpu.json").read_text())
  assert data["quick"] and not data["gpu"] and data["loss_positions"]["speedup"] > 0

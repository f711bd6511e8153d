"""Smoke test of `launch.benchmark`: every section's pieces on tiny sizes, and the JSON keys. Not timed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from launch import benchmark  # noqa: F401 (defines the flags the sections read)
from launch.bench import (aggregation, client_execution, cpu_round, fixtures, loss_positions, measure, original_design,
                          padding, pytorch_peer, scale, summary)
from models.peft_export import peft_state_dict


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


def test_jaxpr_flops_skips_dead_code_as_xla_does():
  def f(x, w):
    unused = jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]  # traced, never an output
    del unused
    return x @ w[0]
  assert measure.jaxpr_flops(f, jnp.ones((4, 5)), jnp.ones((3, 5, 5))) == 2 * 4 * 5 * 5

  def g(x, w):  # a while body with a dead matmul; its trip count is a runtime value
    def body(c):
      i, y = c
      _ = y @ w  # traced, never used
      return i + 1, y @ w
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  assert measure.jaxpr_flops(g, jnp.ones((4, 5)), jnp.ones((5, 5)), while_trips=3) == 3 * 2 * 4 * 5 * 5


def test_client_steps_of_lockstep_groups():
  last = np.asarray([3, 9, 1, 8, 2])
  assert padding.client_steps(last, 5, ordered=True) == 5 * 9  # one program: everyone runs 9 steps
  assert padding.client_steps(last, 1, ordered=True) == last.sum()  # one at a time: no lockstep
  assert padding.client_steps(last, 2, ordered=False) == 2 * 9 + 2 * 8 + 2  # [3, 9], [1, 8], [2]
  assert padding.client_steps(last, 2, ordered=True) == 2 * 9 + 2 * 3 + 1  # [9, 8], [3, 2], [1]


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
  fp32, bf16 = sc["moments"]["float32"], sc["moments"]["bfloat16"]
  assert sc["max_clients"] >= 2 and sc["max_clients"] % sc["group_size"] == 0  # whole groups
  assert sc["bytes_per_client"] == fp32["bytes_per_client"] and sc["max_clients"] == fp32["max_clients"]
  assert fp32["optimizer_bytes_per_client"] == 2 * sc["adapter_bytes_per_client"] + 4  # two fp32 moments + count
  assert bf16["optimizer_bytes_per_client"] == sc["adapter_bytes_per_client"] + 4  # two bf16 moments + count
  for fit in (fp32, bf16):
    # each added client brings its adapters, optimizer state and data once (donated, updated in place): no
    # copy of the state beside the loop (one would be >= the adapters, 28 KB). The rest, a few hundred
    # bytes, is its key and its statistics.
    own = fit["state_bytes_per_client"] + sc["data_bytes_per_client"]
    assert own <= fit["bytes_per_client"] <= own + 1024, (fit["bytes_per_client"], own)
    assert fit["engine_bytes_per_client"] == fit["bytes_per_client"] + sc["adapter_bytes_per_client"]
    assert fit["lean_engine_bytes_per_client"] == fit["bytes_per_client"]
    assert fit["lean_engine_max_clients_24gib"] == fit["max_clients_24gib"] >= fit["engine_max_clients_24gib"] > 0
  assert bf16["max_clients_24gib"] > fp32["max_clients_24gib"]
  od = data["original_design"][0]
  assert od["ratio"] == pytest.approx(od["original_seconds"] / od["ours_seconds"])
  assert all(np.isfinite(od[k]) and od[k] > 0 for k in ("original_seconds", "ours_seconds"))


@pytest.mark.parametrize("beta,round_index", [(1.0, 0), (0.5, 2)], ids=["released-defaults", "warm-weights"])
def test_torch_fellrec_aggregation_equals_ours(beta, round_index):
  """The peer's torch transcription of FELLRec against `fellrec_aggregate`, with the warm weight off (beta=1,
  the released gate) and on."""
  torch = pytest.importorskip("torch")
  from federated import strategies
  rng = np.random.default_rng(0)
  c = 5
  stacked = {"blocks": {t: {"a_ir": rng.standard_normal((c, 2, 6, 3)).astype(np.float32),
                            "b_ro": rng.standard_normal((c, 2, 3, 4)).astype(np.float32)} for t in ("q", "v")}}
  losses = rng.uniform(0.5, 2.0, c).astype(np.float32)
  want = strategies.fellrec_aggregate(stacked, losses, round_index, alpha=0.7, beta=beta)
  got = pytorch_peer.torch_fellrec_aggregate([torch.from_numpy(x) for x in jax.tree.leaves(stacked)],
                                             torch.from_numpy(losses), round_index, alpha=0.7, beta=beta)
  for w, g, x in zip(jax.tree.leaves(want), got, jax.tree.leaves(stacked)):
    np.testing.assert_allclose(g.numpy(), np.asarray(w), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(w) - x).max() > 0.1  # the clients were mixed, not passed through


def _small_round(steps=1, dropout=0.05):
  """A 2-block d=32 Llama (vocab 64) with r=8 q,v adapters; 2 clients of `steps` steps of 2 x 16 tokens."""
  import models
  config = models.tiny_llama(vocab_size=64, hidden_size=32, num_layers=2, head_dim=8, intermediate_size=64,
                             lora=models.LoraConfig(rank=8, alpha=16.0, dropout=dropout, targets=("q", "v")))
  base = models.init_params(config, jax.random.key(0))
  return fixtures.make_round(config, base, 2, steps, 2, 16)


def test_pytorch_peer_first_step_loss_equals_ours():
  """Same base weights, adapters and tokens give the same first-step loss in our model and in transformers +
  PEFT; a negative control shows the check sees the adapters (B = 0 moves the loss well past the tolerance)."""
  pytest.importorskip("peft", reason="the PyTorch + PEFT peer needs peft (see .ci/run)")
  import torch
  rnd = _small_round()
  peer = pytorch_peer.make_peer(rnd)
  ours, theirs = pytorch_peer.check_first_losses(rnd, peer)
  assert theirs == pytest.approx(ours, rel=pytorch_peer.LOSS_RTOL)
  pytorch_peer.set_adapters(peer, [a[0] for a in peer.adapters])  # client 0's fresh adapters: B = 0
  peer.model.eval()
  with torch.no_grad():
    without = float(pytorch_peer.peer_loss(peer.model, peer.batches[0][0]))
  assert abs(without - ours) > 10 * pytorch_peer.LOSS_RTOL * ours


def test_pytorch_peer_section_skips_without_peft(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
  out = pytorch_peer.pytorch_peer_section(True, 1)
  assert set(out) == {"skipped"} and "peft" in out["skipped"]


@pytest.mark.slow
def test_pytorch_peer_round_equals_ours():
  """Without dropout, one whole round (3 AdamW steps per client, then FELLRec's mix) leaves the peer's
  adapters where ours end: the two sides time the same computation."""
  pytest.importorskip("peft", reason="the PyTorch + PEFT peer needs peft (see .ci/run)")
  rnd = _small_round(steps=3, dropout=0.0)
  peer = pytorch_peer.make_peer(rnd)
  ours, _ = pytorch_peer.ours_round(rnd, 0.7, 1.0)()
  pytorch_peer.peer_round(peer, 0.7, 1.0)
  want, start = peft_state_dict(ours, "default"), peft_state_dict(rnd.lora, "default")
  for name, got in zip(peer.names, peer.adapters):
    moved = np.abs(want[name] - start[name]).max()
    assert moved > 5e-4  # Adam moves ~lr a step: every tensor trained (A from the second step on)
    np.testing.assert_allclose(got.numpy(), want[name], rtol=0, atol=1e-3 * moved)


@pytest.mark.slow
def test_pytorch_peer_section_json():
  pytest.importorskip("peft", reason="the PyTorch + PEFT peer needs peft (see .ci/run)")
  out = {"pytorch_peer": pytorch_peer.pytorch_peer_section(quick=True, repeats=1, peak_flops=1e11), "seconds": 0.0}
  summary.summary(out)
  data = json.loads(json.dumps(out, default=float))["pytorch_peer"]
  assert data["method"] and [r["workload"] for r in data["runs"]] == ["tiny"]
  run = data["runs"][0]
  assert {"workload", "ours_seconds", "peer_seconds", "ratio", "threads", "ours_all_seconds", "peer_all_seconds",
          "shape", "first_loss_ours", "first_loss_peer"} <= set(run)
  assert run["ratio"] == pytest.approx(run["peer_seconds"] / run["ours_seconds"])
  assert len(run["ours_all_seconds"]) == len(run["peer_all_seconds"]) == 1
  assert all(0 < t < 600 for t in run["ours_all_seconds"] + run["peer_all_seconds"])
  assert run["threads"]["torch"] == run["threads"]["xla"] >= 1
  assert run["shape"] | {"C": 16, "T": 64, "micro_batch": 4, "steps_per_client": 2, "d": 128, "head_dim": 32} == run["shape"]
  assert run["first_loss_peer"] == pytest.approx(run["first_loss_ours"], rel=1e-4)
  # the same matmul FLOPs over each side's time and the given peak
  assert run["ours_mfu"] == pytest.approx(run["round_flops"] / run["ours_seconds"] / 1e11)
  assert run["peer_mfu"] == pytest.approx(run["round_flops"] / run["peer_seconds"] / 1e11)


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

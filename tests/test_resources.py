"""Resource accounting: counts add up, the client's share grows with k, FLOPs are right despite XLA
counting a scan body once, LLaMA-7B numbers from a config.json alone, and --split_k=auto."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

import models
from federated import client, resources
from fellrec_jax.config import RunConfig
from models.hf_checkpoint import hf_config

LLAMA_7B_DIR = pathlib.Path(__file__).parent / "fixtures" / "llama-7b"
LORA = models.LoraConfig(rank=8, alpha=16, dropout=0.05, targets=("q", "v"))


def _tiny(**kw):
  return dataclasses.replace(models.tiny_llama(vocab_size=97, **kw), lora=LORA)


@pytest.mark.parametrize("tied", [True, False])
def test_client_and_server_counts_add_up(tied):
  cfg = _tiny(tie_embeddings=tied)
  base = models.init_params(cfg, jax.random.key(0))
  lora = models.init_lora(cfg, jax.random.key(1))
  total = sum(x.size for x in jax.tree.leaves(base))
  total_lora = sum(x.size for x in jax.tree.leaves(lora))
  for k in range(cfg.num_layers):
    s = resources.param_split(cfg, base, k, lora=lora)
    assert s["total_params"] == total
    assert s["client_params"] + s["server_params"] == total  # the tied table is counted once
    assert s["client_param_bytes"] + s["server_param_bytes"] == 4 * total
    assert s["client_lora_params"] + s["server_lora_params"] == total_lora
    # AdamW: two fp32 moments per adapter parameter (+ a step count)
    assert 8 * s["client_lora_params"] <= s["client_opt_bytes"] <= 8 * s["client_lora_params"] + 16
  frozen = resources.param_split(cfg, base, 1, lora=lora, server_lora="frozen")
  assert frozen["server_lora_params"] == 0 and frozen["server_opt_bytes"] == 0


@pytest.mark.slow  # compiles the split step at every k (~17 s cold)
def test_client_share_grows_with_k_and_traffic_matches_the_split_step():
  cfg = _tiny()
  rows = [resources.report(cfg, k, batch_size=2, seq_len=16, micro_per_round=3)
          for k in range(cfg.num_layers)]
  for key in ("client_share_params", "client_share_flops", "client_footprint_bytes", "client_flops_per_example"):
    values = [r[key] for r in rows]
    assert all(a < b for a, b in zip(values, values[1:])), (key, values)
  assert rows[-1]["server_params"] == 0 and rows[-1]["server_flops_per_example"] < 1e3
  base = models.init_params(cfg, jax.random.key(0))
  lora = models.init_lora(cfg, jax.random.key(1))
  batch = {"input_ids": jnp.ones((2, 16), jnp.int32), "attention_mask": jnp.ones((2, 16), jnp.int32),
           "target_index": jnp.zeros((2, 4), jnp.int32), "target_mask": jnp.ones((2, 4), jnp.int32),
           "example_mask": jnp.ones((2,), jnp.int32)}
  traffic = {}  # counted from static shapes while tracing; no need to run the step

  def step(base, lora, batch):
    *out, counted = client.split_value_and_grad(client.LocalSpec(cfg, split_k=2), base, lora, batch, None)
    traffic.update(counted)
    return out

  jax.eval_shape(step, base, lora, batch)
  assert traffic == {"up": rows[2]["bytes_up_per_step"], "down": rows[2]["bytes_down_per_step"]}
  assert rows[2]["bytes_up_per_round"] == 3 * traffic["up"] + rows[2]["client_lora_bytes"]


def test_flops_extrapolation_matches_an_unrolled_count():
  """XLA counts a while-loop body once; a 1-trip loop is inlined. So a Python loop of 1-block segments
  gives the true count to compare the 0/1-block extrapolation with."""
  cfg = _tiny(num_layers=5)
  base = resources.abstract_params(cfg)
  lora = resources.abstract_lora(cfg)
  _, body, _ = resources.split_shapes(cfg, base, 1)  # 3 server blocks
  _, lbody, _ = resources.split_shapes(cfg, lora, 1)
  got = resources.segment_cost(cfg, "server_body", body, lbody, 2, 16).flops
  step = resources.segment_fns(cfg)["server_body"]

  def unrolled(body, lbody, act, mask, g):
    one = lambda t, i: jax.tree.map(lambda x: x[i:i + 1], t)

    def full(lb, a):
      for i in range(3):
        a = models.server_body(cfg, one(body, i), a, mask, lora=one(lb, i))
      return a
    out, vjp = jax.vjp(full, lbody, act)
    return (out, *vjp(g))

  act = jax.ShapeDtypeStruct((2, 16, cfg.hidden_size), jnp.float32)
  ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  compiled = jax.jit(unrolled).lower(body, lbody, act, ids, act).compile()
  ref = compiled.cost_analysis()
  ref = (ref[0] if isinstance(ref, (list, tuple)) else ref)["flops"]
  assert got == pytest.approx(ref, rel=0.02)
  # and what XLA reports for the scanned 3-block segment is the undercount we correct
  naive = jax.jit(step).lower(body, lbody, act, ids, act).compile().cost_analysis()
  naive = (naive[0] if isinstance(naive, (list, tuple)) else naive)["flops"]
  assert naive < 0.5 * ref


def test_llama_7b_from_config_json_alone(tmp_path):
  from launch import resources as launch_resources

  assert sorted(p.name for p in LLAMA_7B_DIR.iterdir()) == ["config.json"]  # no weights
  config = hf_config(json.loads((LLAMA_7B_DIR / "config.json").read_text()))
  assert resources.count(resources.abstract_params(config)) == 6_738_415_616
  cfg = RunConfig(model=str(LLAMA_7B_DIR), workdir=str(tmp_path), batch_size=1, cutoff_len=64,
                  partition="random", bpr_steps=10)
  out = launch_resources.run(cfg, [20])
  row = out["rows"][0]
  block = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
  assert row["client_params"] == 2 * 32000 * 4096 + 21 * block + 4096  # embed + head + 20+1 blocks + norm
  assert row["server_params"] == 11 * block
  assert 0.66 < row["client_share_params"] < 0.68
  # LoRA on a frozen base: forward 2N + activation gradients 2N FLOPs per token (N = non-embedding
  # params), plus attention; the client's first-block input gradient is skipped
  per_token = (row["client_flops_per_example"] + row["server_flops_per_example"]) / 64
  n = 32 * block + 4096 * 32000
  assert 3.6 * n < per_token < 4.4 * n
  assert 0.55 < row["client_share_flops"] < 0.75
  assert row["client_param_bytes"] == 4 * row["client_params"]
  assert row["bytes_up_per_step"] == 2 * 64 * 4096 * 4
  assert row["micro_per_round"] >= 1
  saved = json.loads((tmp_path / "resources.json").read_text())
  assert saved["rows"][0]["k"] == 20 and saved["model_config"]["num_layers"] == 32


def test_choose_split_k_is_the_largest_that_fits():
  cfg = _tiny(num_layers=5)
  foot = [resources.client_footprint_bytes(cfg, k, 2, 16) for k in range(cfg.num_layers)]
  assert all(a < b for a, b in zip(foot, foot[1:]))
  mib = lambda b: b / resources.MIB
  assert resources.choose_split_k(cfg, mib(foot[2]) + 1e-6, 2, 16) == 2
  assert resources.choose_split_k(cfg, mib(foot[2]) - 1e-6, 2, 16) == 1
  assert resources.choose_split_k(cfg, 1e6, 2, 16) == cfg.num_layers - 1
  with pytest.raises(ValueError, match="below the k=0 footprint"):
    resources.choose_split_k(cfg, mib(foot[0]) / 2, 2, 16)

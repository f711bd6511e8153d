"""Export to Hugging Face formats: PEFT loads a client's exported adapter onto transformers' model of the
exported base and computes our logits; the merged model alone does too; `--mode=export` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import models
from fellrec_jax.config import ConfigError, RunConfig
from launch import export
from models.hf_checkpoint import save_hf_dir
from models.peft_export import peft_state_dict, save_adapter

TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
# A left-padded row and a full one; logits are compared on real (mask == 1) positions.
MASK_BT = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
                    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
LLAMA3_ROPE = (8.0, 1.0, 4.0, 4)  # factor, low/high frequency factors, original context: scaled at these lengths


def _model(**overrides):
  """A 2-block d=64 decoder with LoRA r=4 on every projection and random non-zero B (a fresh B = 0 adapter
  would change nothing, so a dropped or misplaced factor could not show)."""
  lora_config = models.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=models.config.LORA_TARGETS)
  config = models.tiny_llama(vocab_size=96, num_layers=2, lora=lora_config, **overrides)
  base = models.init_params(config, jax.random.key(0))
  lora = models.init_lora(config, jax.random.key(1))
  keys = iter(jax.random.split(jax.random.key(2), len(lora["blocks"])))
  for ab in lora["blocks"].values():
    ab["b_ro"] = 0.2 * jax.random.normal(next(keys), ab["b_ro"].shape)
  return config, base, lora


def _ours(config, base, lora=None) -> tuple[np.ndarray, np.ndarray]:
  """`(ids [B, T], our logits [B, T, V])` on fixed random tokens under MASK_BT."""
  ids = np.random.default_rng(1).integers(0, config.vocab_size, MASK_BT.shape).astype(np.int32)
  return ids, np.asarray(models.apply(config, base, ids, MASK_BT, lora=lora))


def _theirs(model, ids) -> np.ndarray:
  """transformers' logits `[B, T, V]`, told our positions (which skip left padding)."""
  import torch
  positions = np.maximum(np.cumsum(MASK_BT, -1) - 1, 0)
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(MASK_BT),
                 position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()


def _max_diff(a, b) -> float:
  real = MASK_BT.astype(bool)
  return float(np.abs(a[real] - b[real]).max())


def _peft_and_merged(base_dir, adapter_dir, merged_dir):
  """PEFT's model (the exported adapter on transformers' exported base) and the merged model, both in eval."""
  peft = pytest.importorskip("peft", reason="the PEFT export check needs peft (see .ci/run)")
  transformers = pytest.importorskip("transformers")
  with_adapter = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                                adapter_dir).eval()
  return with_adapter, transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False, qkv_bias=True),
                                       dict(tie_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=5e5)],
                         ids=["llama-tied", "qwen2-untied", "llama3-rope"])
def test_peft_loads_exported_adapter_and_matches_our_logits(tmp_path, overrides):
  pytest.importorskip("torch")
  config, base, lora = _model(**overrides)
  base_dir = save_hf_dir(tmp_path / "base", config, base)
  adapter_dir = save_adapter(tmp_path / "client_0", config.lora, lora, str(base_dir))
  merged_dir = save_hf_dir(tmp_path / "client_0_merged", config, models.merge_lora(config, base, lora))
  with_adapter, merged = _peft_and_merged(base_dir, adapter_dir, merged_dir)

  # every exported factor is in PEFT's model, under its name, with its values
  import peft
  loaded = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(with_adapter).items()}
  want = peft_state_dict(lora)
  assert loaded.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(loaded[name], value)

  ids, ours = _ours(config, base, lora)
  assert _max_diff(_theirs(with_adapter, ids), ours) <= TOL
  assert _max_diff(_theirs(merged, ids), ours) <= TOL
  # negative control: the adapter moves our logits far beyond the tolerance, so a dropped, transposed or
  # misnamed factor (PEFT then keeps its own B = 0 or other values) could not pass the checks above
  _, without = _ours(config, base)
  assert _max_diff(without, ours) > 100 * TOL


def test_a_wrong_adapter_fails_the_comparison(tmp_path):
  """Negative control of the logits check: an adapter with B negated, loaded the same way, misses ours by
  far more than the tolerance."""
  pytest.importorskip("torch")
  config, base, lora = _model()
  base_dir = save_hf_dir(tmp_path / "base", config, base)
  wrong = {"blocks": {t: {"a_ir": ab["a_ir"], "b_ro": -ab["b_ro"]} for t, ab in lora["blocks"].items()}}
  adapter_dir = save_adapter(tmp_path / "client_0", config.lora, wrong, str(base_dir))
  with_adapter, _ = _peft_and_merged(base_dir, adapter_dir, base_dir)
  ids, ours = _ours(config, base, lora)
  assert _max_diff(_theirs(with_adapter, ids), ours) > 100 * TOL


def test_saved_base_loads_back_identically(tmp_path):
  """`save_hf_dir` is `load_hf_dir`'s inverse: same shapes-deciding config, same weights (bfloat16 too)."""
  for overrides in ({}, dict(tie_embeddings=False, qkv_bias=True, rope_scaling=LLAMA3_ROPE),
                    dict(param_dtype="bfloat16", compute_dtype="bfloat16")):
    config, base, _ = _model(**overrides)
    path = save_hf_dir(tmp_path / str(len(overrides)), config, base)
    loaded_config, loaded, _ = models.load_hf_dir(path, dtype=config.param_dtype)
    assert json.loads((path / "config.json").read_text())["dtype"] == config.param_dtype
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "norm_eps", "rope_theta", "rope_scaling", "tie_embeddings", "qkv_bias",
                  "max_positions", "bos_id", "eos_id", "pad_id"):
      assert getattr(loaded_config, field) == getattr(config, field), field
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, base))


def test_item_rows_go_beside_the_adapter(tmp_path):
  """Trainable item rows (PEFT has no place for them) are written to items.safetensors under our names;
  the PEFT weights file holds the LoRA factors only."""
  from safetensors.numpy import load_file
  config, base, lora = _model()
  lora["items"] = {"table_id": np.arange(12.0, dtype=np.float32).reshape(3, 4)}
  path = save_adapter(tmp_path, config.lora, lora, None)
  np.testing.assert_array_equal(load_file(path / "items.safetensors")["table_id"], lora["items"]["table_id"])
  assert load_file(path / "adapter_model.safetensors").keys() == peft_state_dict(lora).keys()


def test_several_strategies_export_from_their_own_directories(tmp_path):
  for name in ("fedavg", "fellrec"):
    (tmp_path / name / "checkpoints").mkdir(parents=True)
  (tmp_path / "comparison.md").write_text("")
  assert export.strategy_dirs(tmp_path) == {"fellrec": tmp_path / "fellrec", "fedavg": tmp_path / "fedavg"}


@pytest.mark.parametrize("keep_best", [True, False])
def test_a_checkpoint_restores_without_a_template(tmp_path, keep_best):
  """Export has no engine to build a template state from: the saved FedState comes back as nested dicts,
  and its evaluated adapters are the best ones, or the last with --keep_best=false (best_lora None)."""
  from fellrec_jax import checkpoint
  from federated.engine import FedState
  lora = {"blocks": {"q": {"a_ir": np.ones((2, 1, 4, 2), np.float32), "b_ro": np.zeros((2, 1, 2, 4), np.float32)}}}
  best = jax.tree.map(lambda x: x + 1, lora) if keep_best else None
  saved = FedState(lora=lora, opt_state={"mu": lora}, best_lora=best, best_valid=np.zeros(2, np.float32))
  checkpoint.save(checkpoint.manager(tmp_path), 1, saved, {"round": 1})
  _, state, meta = checkpoint.restore_latest(checkpoint.manager(tmp_path), None)
  jax.tree.map(np.testing.assert_array_equal, export.evaluated_adapters(state), saved.evaluated_lora)
  assert meta == {"round": 1}


def test_export_without_a_checkpoint_names_the_path(tmp_path):
  (tmp_path / "data_stats.json").write_text("{}")
  with pytest.raises(ConfigError, match=f"--workdir={tmp_path} holds no checkpoint: expected {tmp_path}/checkpoints"):
    export.run(RunConfig(mode="export", workdir=str(tmp_path)))
  assert not (tmp_path / "export").exists()


def test_export_merged_needs_export_mode():
  with pytest.raises(ConfigError, match="--export_merged=True: applies to --mode=export only"):
    RunConfig(export_merged=True)


def _main(*args):
  out = subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.mark.slow
def test_export_mode_end_to_end(tmp_path):
  """A one-round tiny run, then `--mode=export --export_merged`: each client's files are its checkpointed
  best adapter, and PEFT on the exported base, and the merged model, give our logits of that adapter."""
  pytest.importorskip("torch")
  workdir = tmp_path / "run"
  _main("--flagfile=launch/configs/quickstart.flags", "--rounds=1", "--max_train_samples=64", "--num_clients=2",
        "--partition=random", "--baselines=", "--max_eval_users=4", "--warm_start_steps=20", f"--workdir={workdir}")
  _main("--mode=export", "--export_merged", f"--workdir={workdir}")
  state, meta = export.restore(workdir)
  cfg = export.trained_config(meta["config"], RunConfig(mode="export", workdir=str(workdir)))
  config, base, _ = export.rebuild_model(cfg)
  for c in range(2):
    lora = jax.tree.map(lambda x: x[c], export.evaluated_adapters(state))
    assert np.abs(lora["blocks"]["q"]["b_ro"]).max() > 0  # trained: the check below sees the adapter
    out = workdir / "export"
    with_adapter, merged = _peft_and_merged(out / "base", out / f"client_{c}", out / f"client_{c}_merged")
    ids, ours = _ours(config, base, lora)
    assert _max_diff(_theirs(with_adapter, ids), ours) <= TOL
    assert _max_diff(_theirs(merged, ids), ours) <= TOL

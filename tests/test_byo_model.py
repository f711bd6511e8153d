"""Bring your own Flax model: an nnx model defined only here (Qwen3-style blocks: RMSNorm on each head's
queries and keys before RoPE) runs the functional forward, splits as a slice, and trains through the engine
with a real U-shaped split and FELLRec aggregation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import engine_worker
import models
from fellrec_jax.data import prepare_dataset
from federated import engine, experiment
from models import attention, modules


class QKNormBlock(nnx.Module):
  """A Qwen3 block: the Llama block with a per-head RMSNorm on q and k. Adapters on the `config.lora.targets`
  projections, as `modules.Linear` makes them."""

  def __init__(self, config, *, init, layers=(), lora_key=None):
    d, f, h = config.hidden_size, config.intermediate_size, config.head_dim
    lora_keys = modules.lora_keys_of(config, lora_key)
    dense = lambda name, i, o: modules.Linear(i, o, init=init, dtype=config.param_dtype, bias=False, layers=layers,
                                              lora=config.lora, lora_key=lora_keys.get(name))
    self.attn_norm = modules.norm(config, layers)
    self.q, self.k = dense("q", d, config.num_heads * h), dense("k", d, config.num_kv_heads * h)
    self.v, self.o = dense("v", d, config.num_kv_heads * h), dense("o", config.num_heads * h, d)
    self.q_norm = modules.RMSNorm(h, eps=config.norm_eps, dtype=config.param_dtype, layers=layers)
    self.k_norm = modules.RMSNorm(h, eps=config.norm_eps, dtype=config.param_dtype, layers=layers)
    self.mlp_norm = modules.norm(config, layers)
    self.gate, self.up, self.down = dense("gate", d, f), dense("up", d, f), dense("down", f, d)
    self.config = config

  def __call__(self, x_btd, positions_bt, mask_b1ts, *, rng=None, kv_cache=None, prefix=None):
    assert kv_cache is None and prefix is None  # training and scoring only in this test
    c = self.config
    keys = dict(zip(models.config.LORA_TARGETS, jax.random.split(rng, 7))) if rng is not None else {}
    proj = lambda name, x: getattr(self, name)(x, keys.get(name))
    b, t, _ = x_btd.shape
    h_in = self.attn_norm(x_btd)
    q = self.q_norm(proj("q", h_in).reshape(b, t, c.num_heads, c.head_dim))
    k = self.k_norm(proj("k", h_in).reshape(b, t, c.num_kv_heads, c.head_dim))
    v = proj("v", h_in).reshape(b, t, c.num_kv_heads, c.head_dim)
    inv_freq = attention.rope_frequencies(c)
    q, k = attention.apply_rope(q, positions_bt, inv_freq), attention.apply_rope(k, positions_bt, inv_freq)
    x = x_btd + proj("o", attention.attention(q, k, v, mask_b1ts))
    h_mlp = self.mlp_norm(x)
    return x + proj("down", jax.nn.silu(proj("gate", h_mlp)) * proj("up", h_mlp)), None


class Qwen3Like(nnx.Module):
  """The protocol: `(config, *, key, lora_key=None, std)`; `embed`, stacked `blocks`, `final_norm`, tied head."""

  def __init__(self, config, *, key, lora_key=None, std=0.02):
    init = modules.Normal(iter(jax.random.split(key, 16)), std)
    self.blocks = QKNormBlock(config, init=init, layers=(config.num_layers,), lora_key=lora_key)
    self.embed = modules.Embedding(config, init=init)
    self.final_norm = modules.norm(config)


def _config(vocab_size=300, **overrides):
  own = {"module": Qwen3Like, "lora": models.LoraConfig(targets=("q", "v"), dropout=0.0)}
  return models.tiny_llama(vocab_size, **(own | overrides))


def test_own_model_forward_uses_its_layers_and_splits_as_a_slice():
  config = _config()
  params = models.init_params(config, jax.random.key(0))
  assert set(params["blocks"]) >= {"q_norm", "k_norm"}
  lora = jax.tree.map(lambda x: x + 0.01, models.init_lora(config, jax.random.key(1)))
  ids = jax.random.randint(jax.random.key(2), (2, 9), 1, 300)
  mask = jnp.ones_like(ids).at[0, :3].set(0)
  full = models.apply(config, params, ids, mask, lora=lora)

  # the q/k norms are in the forward: scaling them changes the logits
  scaled = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 3.0 if "q_norm" in jax.tree_util.keystr(p) else x, params)
  assert float(jnp.abs(models.apply(config, scaled, ids, mask, lora=lora) - full).max()) > 1e-3

  # the split is a slice of the stacked layer axis: head -> server body -> tail equals the unsplit forward
  head, body, tail = models.split(config, params, 1)
  lh, lb, lt = models.split(config, lora, 1)
  act = models.client_head(config, head, ids, mask, lora=lh)
  act = models.server_body(config, body, act, mask, lora=lb)
  np.testing.assert_allclose(models.client_tail(config, tail, act, mask, lora=lt), full, rtol=1e-5, atol=1e-5)

  # the module itself: nnx.split gives (graphdef, lora_state, base_state); calling it is the same forward
  model = Qwen3Like(config, key=jax.random.key(0), lora_key=jax.random.key(1))
  _, lora_state, base_state = nnx.split(model, nnx.LoRAParam, nnx.Param)
  assert jax.tree.structure(nnx.to_pure_dict(lora_state)) == jax.tree.structure(lora)
  np.testing.assert_array_equal(nnx.to_pure_dict(base_state)["blocks"]["q"]["w_io"], params["blocks"]["q"]["w_io"])


@pytest.mark.slow  # two engine rounds (~1 minute on 2 cores)
def test_own_model_trains_through_the_engine_with_a_split_and_fellrec(tmp_path):
  cfg = engine_worker.make_config(str(tmp_path), rounds=2, lora_targets=("q", "v"), split_k=(1,))
  prep, _ = prepare_dataset("synthetic", num_clients=cfg.num_clients, partition=cfg.partition, seed=cfg.seed,
                            synthetic_kwargs=engine_worker.SYNTHETIC)
  config, _, tokenizer = experiment.load_model(cfg, list(prep.titles))
  config = dataclasses.replace(config, module=Qwen3Like)
  model = (config, models.init_params(config, jax.random.key(cfg.seed)), tokenizer)
  eng = experiment.build_engine(cfg, "fellrec", prep, model)
  start = eng.init_state(jax.random.key(cfg.seed))
  start_valid = np.average(np.asarray(eng.validate(start)[1]["loss"]), weights=np.maximum(eng.valid_counts, 1e-9))
  state, history = engine.run_rounds(eng, cfg.workdir)

  assert "q_norm" in eng.base["blocks"] and set(state.lora["blocks"]) == {"q", "v"}
  assert all(h["bytes_up"] > 0 and h["bytes_down"] > 0 for h in history)  # activations crossed the cut
  assert history[-1]["valid"]["mean_loss"] < start_valid - 0.05, (start_valid, history[-1]["valid"])
  # FELLRec personalises: after aggregation each client holds its own mixture, not one shared adapter
  b = np.asarray(state.lora["blocks"]["q"]["b_ro"])
  assert np.abs(b[0] - b[1]).max() > 1e-6 and np.abs(b).max() > 1e-4


@pytest.mark.parametrize("module", [None, Qwen3Like])
def test_the_forward_is_the_same_in_nnx_tree_mode(module):
  """Flax is moving NNX to "tree mode" (modules as plain pytrees); the framework only splits and merges, so
  the graphs built there run the same forward (the built-in model and one's own)."""
  config = _config(module=module)
  params = models.init_params(config, jax.random.key(0))
  lora = jax.tree.map(lambda x: x + 0.01, models.init_lora(config, jax.random.key(1)))
  ids = jax.random.randint(jax.random.key(2), (2, 7), 1, 300)
  want = models.apply(config, params, ids, lora=lora)
  models.transformer.graphdefs.cache_clear()
  try:
    with nnx.set_graph_mode(False):
      got = models.apply(config, params, ids, lora=lora)
      built = models.init_params(config, jax.random.key(0))
  finally:
    models.transformer.graphdefs.cache_clear()
  np.testing.assert_array_equal(got, want)
  assert jax.tree.all(jax.tree.map(np.array_equal, built, params))


def test_load_model_holds_the_loaded_weights_and_fresh_adapters():
  """`models.load_model` is `models.load` plus `init_lora` in an nnx module: splitting it gives back exactly
  that state, and calling it is `models.apply` on it."""
  lora_config = models.LoraConfig(targets=("q", "v"), dropout=0.0)
  model, _ = models.load_model("tiny-llama", lora=lora_config, lora_rng=jax.random.key(4))
  config, params, _ = models.load("tiny-llama", lora=lora_config)
  lora = jax.tree.map(lambda x: x + 0.01, models.init_lora(config, jax.random.key(4)))
  _, lora_state, base_state = nnx.split(model, nnx.LoRAParam, nnx.Param)
  assert jax.tree.all(jax.tree.map(np.array_equal, nnx.to_pure_dict(base_state), params))
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a + 0.01, b), nnx.to_pure_dict(lora_state), lora))
  nnx.update(model, jax.tree.map(lambda x: x + 0.01, lora_state))  # a trained adapter, B != 0
  ids = jax.random.randint(jax.random.key(2), (2, 6), 1, 250)
  np.testing.assert_array_equal(model(ids), models.apply(config, params, ids, lora=lora))

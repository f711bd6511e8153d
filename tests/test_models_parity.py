"""Our backbones against transformers' PyTorch models on random weights, plus LoRA and split invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import LoraConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# Rows: left-padded, right-padded, full; parity is checked on real (mask == 1) positions only.
MASK_BT = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
                    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)
VOCAB = 96


def _randomize(model, seed=0):
  """Weights large enough that a wrong transpose, permutation or bias shows up far above TOL."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.1 * noise if "norm" in name.lower() and name.endswith("weight") else 0.1 * noise)
  return model.eval()


def _ids(seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, MASK_BT.shape).astype(np.int32)


def _decoder_hf(model_type, *, tie, rope=None):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                tie_word_embeddings=tie, attn_implementation="eager")
  if rope is not None:
    common["rope_parameters"] = rope
  config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[model_type]
  torch.manual_seed(0)
  return _randomize(model_cls(config_cls(**common)))


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)


@pytest.mark.parametrize("model_type,tie,rope", [
    ("llama", True, None), ("llama", False, None), ("llama", False, LLAMA3_ROPE),
    ("mistral", False, None), ("qwen2", True, None)],
    ids=["llama-tied", "llama-untied", "llama3-rope", "mistral", "qwen2-bias"])
def test_decoder_matches_transformers(tmp_path, model_type, tie, rope):
  hf = _decoder_hf(model_type, tie=tie, rope=rope)
  hf.save_pretrained(tmp_path)
  config, params, _ = models.load(tmp_path)
  assert (config.tie_embeddings, config.qkv_bias) == (tie, model_type == "qwen2")
  assert (config.rope_scaling is not None) == (rope is not None)

  ids, mask = _ids(), MASK_BT
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)  # our positions skip left padding; tell HF the same
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  got = np.asarray(jax.jit(lambda p, x, m: models.apply(config, p, x, m))(params, ids, mask))
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() <= TOL
  assert np.abs(want[real]).max() > 0.1  # the comparison is not between near-zero outputs


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
  hf = _decoder_hf("llama", tie=False)
  hf.save_pretrained(tmp_path / "one")
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  _, single, _ = models.load(tmp_path / "one")
  _, sharded, _ = models.load(tmp_path / "sharded")
  jax.tree.map(np.testing.assert_array_equal, single, sharded)


def test_bert_matches_transformers(tmp_path):
  hf_config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
  torch.manual_seed(0)
  hf = _randomize(transformers.BertModel(hf_config))
  hf.save_pretrained(tmp_path)
  config, params, _ = models.load(tmp_path)
  assert config.arch == "bert"

  ids, mask = _ids(), MASK_BT[1:]  # BERT's absolute positions assume right padding
  ids = ids[1:]
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  got = np.asarray(models.apply(config, params, ids, mask))
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() <= TOL


# ----------------------------------------------------------------------------- LoRA and split

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _model_with_lora(name, rng=0):
  """A 4-block tiny model and LoRA adapters on every projection, with B randomised (so LoRA acts)."""
  targets = ALL_TARGETS if name == "tiny-llama" else tuple(t for t in ALL_TARGETS if t != "gate")
  config, params, tokenizer = models.load(name, lora=LoraConfig(rank=4, targets=targets))
  lora = models.init_lora(config, jax.random.key(rng))
  keys = iter(jax.random.split(jax.random.key(rng + 1), 64))
  lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)
  ids, mask = tokenizer.batch_encode(["a short one", "a rather longer sentence here"], padding_side="left")
  return config, params, lora, ids, mask


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_lora_with_zero_b_changes_nothing(name):
  config, params, _, ids, mask = _model_with_lora(name)
  fresh = models.init_lora(config, jax.random.key(3))
  np.testing.assert_array_equal(models.apply(config, params, ids, mask),
                                models.apply(config, params, ids, mask, lora=fresh))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_gradients_flow_to_lora_only(name):
  config, params, lora, ids, mask = _model_with_lora(name)
  fresh = models.init_lora(config, jax.random.key(3))

  def loss(lora_params, base_params):  # differentiated w.r.t. the adapters (argnums=0) only
    out = models.apply(config, base_params, ids, mask, lora=lora_params)
    return jnp.sum(jnp.square(out) * mask[..., None])

  grad = jax.jit(jax.grad(loss))
  # Gradient values, not the tree's shape: <grad, d> against a central difference of the loss along
  # random directions d of the adapters. The loss projects the outputs on a fixed random tensor (a sum of
  # squares is nearly constant after an encoder's final LayerNorm, whose gradient is then ~0).
  proj = jax.random.normal(jax.random.key(5), models.apply(config, params, ids, mask, lora=lora).shape)
  linear = jax.jit(lambda lp: jnp.sum(models.apply(config, params, ids, mask, lora=lp) * proj * mask[..., None]))
  g = jax.jit(jax.grad(linear))(lora)
  keys = iter(jax.random.split(jax.random.key(7), 64))
  eps = 0.03  # along a unit-norm direction
  for _ in range(3):
    d = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape), lora)
    norm = np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(d)))
    shifted = lambda sign: jax.tree.map(lambda x, y: x + sign * eps * y / norm, lora, d)
    fd = (float(linear(shifted(1))) - float(linear(shifted(-1)))) / (2 * eps)
    analytic = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d))) / norm
    assert abs(analytic) > 0.1, analytic  # a direction the loss actually moves along (measured 1.2 to 9.9)
    # fp32 central difference: rounding |loss| 6e-8 / eps ~ 1e-4 relative, truncation O(eps^2); measured
    # <= 7e-4 relative. A wrong gradient (missing LoRA scale, A/B swapped, a layer dropped) is off by O(1).
    np.testing.assert_allclose(analytic, fd, rtol=5e-3, err_msg=name)
  for target, g in grad(lora, params)["blocks"].items():
    assert bool(jnp.all(jnp.abs(g["a_ir"]).sum((1, 2)) > 0)), target  # every layer's A and B
    assert bool(jnp.all(jnp.abs(g["b_ro"]).sum((1, 2)) > 0)), target
  # At init (B = 0) only B receives gradient, as in PEFT: the first step moves B, then A.
  for target, g in grad(fresh, params)["blocks"].items():
    assert bool(jnp.all(jnp.abs(g["b_ro"]).sum((1, 2)) > 0)), target
    assert not bool(jnp.any(g["a_ir"])), target


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_split_equals_unsplit(name):
  config, params, lora, ids, mask = _model_with_lora(name)
  want = models.apply(config, params, ids, mask, lora=lora)
  num_layers = config.num_layers
  for k in sorted({0, 1, num_layers // 2, num_layers - 1}):
    head, body, tail = models.split(config, params, k)
    lora_head, lora_body, lora_tail = models.split(config, lora, k)
    act = models.client_head(config, head, ids, mask, lora=lora_head)
    act = models.server_body(config, body, act, mask, lora=lora_body)
    got = models.client_tail(config, tail, act, mask, lora=lora_tail)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"k={k}")

"""`models.merge_lora` folds the adapters into the base exactly; `remat=True` and `scan_layers=False` change
memory and speed, not numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import LoraConfig

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _setup(name):
  targets = ALL_TARGETS if name == "tiny-llama" else tuple(t for t in ALL_TARGETS if t != "gate")
  config, params, tokenizer = models.load(name, lora=LoraConfig(rank=4, alpha=8.0, targets=targets))
  lora = models.init_lora(config, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), 64))
  lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(keys), x.shape), lora)  # B != 0: LoRA acts
  ids, mask = tokenizer.batch_encode(["a short one", "a rather longer sentence here"], padding_side="left")
  return config, params, lora, jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_merged_model_equals_base_plus_lora_forward(name):
  config, params, lora, ids, mask = _setup(name)
  want = np.asarray(models.apply(config, params, ids, mask, lora=lora))
  merged = models.merge_lora(config, params, lora)
  got = np.asarray(models.apply(config, merged, ids, mask))
  real = np.asarray(mask) > 0
  # W + s A B in one matmul vs W x + s (x A) B: fp32 reassociation only (outputs are O(1))
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4)
  base = np.asarray(models.apply(config, params, ids, mask))
  # the control: the adapters move the outputs far more than the tolerance, so equality says something
  assert np.abs(base[real] - want[real]).max() > 100 * 1e-4
  # the merge changed exactly the targeted weights, by scale * A @ B
  for target, ab in lora["blocks"].items():
    delta = merged["blocks"][target]["w_io"] - params["blocks"][target]["w_io"]
    np.testing.assert_allclose(delta, config.lora.scale * np.einsum("lir,lro->lio", ab["a_ir"], ab["b_ro"]),
                               rtol=1e-4, atol=1e-6)


def _primitive_names(jaxpr, out):
  """Every primitive's name in `jaxpr` and the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    out.add(eqn.primitive.name)
    for v in eqn.params.values():
      for j in (v if isinstance(v, (list, tuple)) else [v]):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          _primitive_names(inner, out)
        elif hasattr(j, "eqns"):
          _primitive_names(j, out)
  return out


# each variant, and the primitive only its program holds (the scan is gone when the layers are unrolled)
VARIANTS = {"remat": ({"remat": True}, lambda names: any("remat" in n or "checkpoint" in n for n in names)),
            "unscanned": ({"scan_layers": False}, lambda names: "scan" not in names)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_remat_and_unscanned_layers_give_the_same_loss_and_gradients(name, variant):
  config, params, lora, ids, mask = _setup(name)
  overrides, marks = VARIANTS[variant]
  other = dataclasses.replace(config, **overrides)
  proj = jax.random.normal(jax.random.key(2), models.apply(config, params, ids, mask).shape)

  def loss(cfg):
    return lambda lp: jnp.sum(models.apply(cfg, params, ids, mask, lora=lp) * proj * mask[..., None])

  # the variant is really on: its program has the mark (a checkpoint primitive; no scan), the default's not
  names = lambda cfg: _primitive_names(jax.make_jaxpr(jax.grad(loss(cfg)))(lora).jaxpr, set())
  assert marks(names(other)), names(other)
  assert not marks(names(config))
  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(loss(c)))(lora) for c in (config, other))
  # the same ops, fused differently: equal up to fp32 reassociation (measured <= 4e-5 relative on the
  # smallest gradient entries, 1.6e-5 on this projected loss, a sum with cancellations), far below an O(1)
  # error such as a block whose gradient is cut or recomputed with other inputs
  np.testing.assert_allclose(l1, l0, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(g0)) > 0  # gradients that can disagree


def test_unscanned_layers_decode_the_same_tokens_through_the_cache():
  config, params, lora, ids, mask = _setup("tiny-llama")
  unscanned = dataclasses.replace(config, scan_layers=False)
  new = [np.asarray(models.greedy(c, params, ids, mask, max_new_tokens=6, lora=lora)) for c in (config, unscanned)]
  np.testing.assert_array_equal(new[1], new[0])
  assert len(set(new[0].ravel().tolist())) > 1  # real tokens, not one repeated pad

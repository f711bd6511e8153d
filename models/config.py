"""Static model and LoRA configuration.

Both are frozen (hashable) dataclasses so they can be passed to `jax.jit` as static arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the named projections; the update is `(alpha / rank) * x @ A @ B`."""

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q", "v")

  def __post_init__(self):
    unknown = set(self.targets) - set(LORA_TARGETS)
    if unknown:
      raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_TARGETS}")
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder (`arch="llama"`) or a BERT-family encoder (`arch="bert"`).

  `rope_scaling` is `None` or the llama3 tuple
  `(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)`.
  """

  arch: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: tuple[float, float, float, int] | None = None
  tie_embeddings: bool = False
  qkv_bias: bool = False
  max_positions: int = 2048
  type_vocab_size: int = 2
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True  # False: a Python loop over the blocks (one program per layer; see run_blocks)
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int = 0
  lora: LoraConfig | None = None
  causal: bool = False  # an encoder run with a causal mask (item-as-token sequences: every position trains)
  # your own nnx model class (README, "Bring your own Flax model"); None: `models.Transformer`
  module: Any = None

  def __post_init__(self):
    if self.arch not in ("llama", "bert"):
      raise ValueError(f"unknown arch {self.arch!r}; expected 'llama' or 'bert'")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    for name in ("param_dtype", "compute_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  @property
  def is_decoder(self) -> bool:
    return self.arch == "llama"

  @property
  def left_padded(self) -> bool:
    """Inputs end at the last column (decoders, causal encoders), so position T-1 represents the sequence."""
    return self.is_decoder or self.causal

  @property
  def dtype(self):
    return jnp.dtype(self.compute_dtype)


def tiny_llama(vocab_size: int = 512, **overrides) -> ModelConfig:
  """A 4-block random-init decoder with GQA, small enough for CPU tests and the quickstart."""
  fields = dict(arch="llama", vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=16, intermediate_size=128, rope_theta=10000.0,
                tie_embeddings=True, max_positions=1024)
  return ModelConfig(**(fields | overrides))


def tiny_bert(vocab_size: int = 512, **overrides) -> ModelConfig:
  """A 4-block random-init encoder of the MiniLM class."""
  fields = dict(arch="bert", vocab_size=vocab_size, hidden_size=64, num_layers=4, num_heads=4,
                num_kv_heads=4, head_dim=16, intermediate_size=128, norm_eps=1e-12, max_positions=512)
  return ModelConfig(**(fields | overrides))

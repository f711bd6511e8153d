"""HF model directories: config.json -> ModelConfig, `*.safetensors` (sharded or not) -> params, for
Llama, Mistral, Qwen2 and BERT checkpoints."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
from safetensors import safe_open

from models.config import ModelConfig
from models.layout import KeyMap, assemble, readable
from models.tokenizer import Tokenizer
from models.transformer import Params

DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")


def load_hf_dir(path: str | pathlib.Path, *, dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer | None]:
  """An HF model directory: config.json, `model.safetensors` or a sharded `model.safetensors.index.json`.

  Mistral's sliding window is not applied: outputs match for sequences up to the window length.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} has no config.json; not an HF model directory")
  raw = readable(path / "config.json", "JSON", lambda: json.loads((path / "config.json").read_text()))
  tokenizer = Tokenizer.from_dir(path)
  config = hf_config(raw, dtype=dtype)
  if tokenizer is not None:  # the tokenizer's special tokens are the ones prompts are built with; config.json fills gaps
    tokenizer.bos_id = config.bos_id if tokenizer.bos_id is None else tokenizer.bos_id
    tokenizer.eos_id = config.eos_id if tokenizer.eos_id is None else tokenizer.eos_id
    config = dataclasses.replace(config, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)

  files = _safetensors_files(path)
  normalize = _bert_key if config.arch == "bert" else _decoder_key
  sources = {}  # our naming of a checkpoint key -> (key as stored, file)
  for file in files:
    for key in readable(file, "safetensors", lambda: _safetensors_keys(file)):
      sources[normalize(key)] = (key, file)

  def read(name: str) -> np.ndarray:
    key, file = sources[name]
    return readable(file, "safetensors", lambda: _safetensors_tensor(file, key))

  key_map = _bert_keys(config) if config.arch == "bert" else _decoder_keys(config)
  ignored = _BERT_IGNORED if config.arch == "bert" else _DECODER_IGNORED
  if config.arch == "llama" and config.tie_embeddings:
    ignored = ignored + (r"lm_head\.weight",)  # some tied checkpoints store the shared table twice
  located = {name: f"{key!r} in {file.name}" for name, (key, file) in sources.items()}
  params = assemble(config, key_map, located, read, ignored, source=str(path))
  return config, params, tokenizer


def decoder_state_dict(config: ModelConfig, params: Params) -> dict[str, np.ndarray]:
  """Our decoder's params as a transformers `*ForCausalLM` state dict (torch `[out, in]` matrices, one tensor
  per block): the inverse of `load_hf_dir`'s assembly, for handing our weights to PyTorch. A tied model's
  `lm_head.weight` is its token table, as transformers' own state dict lists it."""
  if config.arch != "llama":
    raise ValueError(f"decoder_state_dict needs a decoder, got arch={config.arch!r}")
  state = {}
  for key, (path, layer) in _decoder_keys(config).items():
    leaf = params
    for part in path:
      leaf = leaf[part]
    array = np.asarray(leaf if layer is None else leaf[layer])
    state[key] = array.T if path[-1] == "w_io" else array
  if config.tie_embeddings:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
  return state


def decoder_hf_config(config: ModelConfig) -> dict:
  """Our decoder's config.json in transformers' layout (`hf_config`'s inverse): Llama, or Qwen2 when the
  q/k/v projections carry biases. Mistral checkpoints come back as Llama: we never apply the sliding window,
  so the same weights compute the same function. The rotary settings are written under both transformers 5's
  `rope_parameters` and transformers 4's `rope_theta`/`rope_scaling`, so either version reads the same."""
  if config.arch != "llama":
    raise ValueError(f"decoder_hf_config needs a decoder, got arch={config.arch!r}")
  rope = {"rope_type": "default", "rope_theta": config.rope_theta}
  if config.rope_scaling is not None:
    factor, low, high, original = config.rope_scaling
    rope |= {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": original}
  model_type = "qwen2" if config.qkv_bias else "llama"
  return {"architectures": ["Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"], "model_type": model_type,
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
          "max_position_embeddings": config.max_positions, "tie_word_embeddings": config.tie_embeddings,
          "attention_bias": False, "mlp_bias": False, "bos_token_id": config.bos_id, "eos_token_id": config.eos_id,
          "pad_token_id": config.pad_id, "rope_parameters": rope, "rope_theta": config.rope_theta,
          "rope_scaling": None if config.rope_scaling is None else rope, "dtype": config.param_dtype}


def save_hf_dir(path: str | pathlib.Path, config: ModelConfig, params: Params) -> pathlib.Path:
  """Writes our decoder as a transformers model directory, `load_hf_dir`'s inverse: `config.json`
  (`decoder_hf_config`) and `model.safetensors` (`decoder_state_dict`; a tied model without `lm_head.weight`,
  as transformers saves it). Returns the directory."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  state = decoder_state_dict(config, params)
  if config.tie_embeddings:
    del state["lm_head.weight"]
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path / "model.safetensors"),
            metadata={"format": "pt"})  # transformers refuses safetensors files without a format
  (path / "config.json").write_text(json.dumps(decoder_hf_config(config), indent=1))
  return path


def hf_config(raw: dict, *, dtype: str = "float32") -> ModelConfig:
  """ModelConfig from a config.json dict (transformers 4 or 5 field names)."""
  model_type = raw.get("model_type")
  common = dict(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], num_layers=raw["num_hidden_layers"],
                num_heads=raw["num_attention_heads"], intermediate_size=raw["intermediate_size"],
                max_positions=raw.get("max_position_embeddings", 2048), param_dtype=dtype, compute_dtype=dtype)
  if model_type == "bert":
    _require(raw, "hidden_act", "gelu")
    _require(raw, "position_embedding_type", "absolute")
    heads = raw["num_attention_heads"]
    return ModelConfig(arch="bert", num_kv_heads=heads, head_dim=raw["hidden_size"] // heads,
                       norm_eps=raw.get("layer_norm_eps", 1e-12), type_vocab_size=raw.get("type_vocab_size", 2),
                       pad_id=raw.get("pad_token_id") or 0, **common)
  if model_type not in DECODER_MODEL_TYPES:
    raise ValueError(f"unsupported model_type {model_type!r}; supported: {DECODER_MODEL_TYPES + ('bert',)}")
  _require(raw, "hidden_act", "silu")
  for flag in ("attention_bias", "mlp_bias"):  # Llama variants with biases on o/MLP projections
    if raw.get(flag):
      raise ValueError(f"config.json sets {flag}=true, which this decoder does not implement")
  rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    scaling = None
  elif rope_type == "llama3":
    scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
               int(rope["original_max_position_embeddings"]))
  else:
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: 'default', 'llama3'")
  heads = raw["num_attention_heads"]
  eos = raw.get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) else eos  # Llama 3 lists several stop ids
  pad = raw.get("pad_token_id")
  return ModelConfig(arch="llama", num_kv_heads=raw.get("num_key_value_heads") or heads,
                     head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                     norm_eps=raw.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
                     rope_scaling=scaling, tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
                     qkv_bias=model_type == "qwen2", bos_id=raw.get("bos_token_id"), eos_id=eos,
                     pad_id=pad if pad is not None else (eos or 0), **common)


def _require(raw: dict, field: str, expected: str):
  if raw.get(field, expected) != expected:
    raise ValueError(f"config.json {field}={raw[field]!r} is not supported (expected {expected!r})")


def _safetensors_keys(file: pathlib.Path) -> list[str]:
  with safe_open(file, framework="numpy") as handle:
    return list(handle.keys())


def _safetensors_tensor(file: pathlib.Path, key: str) -> np.ndarray:
  with safe_open(file, framework="numpy") as handle:
    if handle.get_slice(key).get_dtype() != "BF16":
      return handle.get_tensor(key)
  with safe_open(file, framework="flax") as handle:  # numpy has no bfloat16; jax brings ml_dtypes'
    return np.asarray(handle.get_tensor(key))


def _safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = readable(index, "safetensors index", lambda: json.loads(index.read_text())["weight_map"])
    files = [path / name for name in sorted(set(weight_map.values()))]
  else:
    files = sorted(path.glob("*.safetensors"))
  if not files:
    raise FileNotFoundError(f"{path} has no *.safetensors files (PyTorch .bin checkpoints are not read)")
  for file in files:
    if not file.exists():
      raise FileNotFoundError(f"shard {file.name} listed in {index.name} is missing from {path}")
  return files


# Buffers and heads saved alongside the weights that the backbones do not use.
_DECODER_IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)
_BERT_IGNORED = (r"embeddings\.position_ids", r"pooler\..*", r"cls\..*")


def _decoder_key(key: str) -> str:
  """Keys of a bare `LlamaModel` save lack the `model.` prefix of `*ForCausalLM`."""
  return key if key.startswith(("model.", "lm_head.")) else "model." + key


def _bert_key(key: str) -> str:
  """`BertFor*` saves prefix `bert.`, a `BertModel` (sentence-transformers) save does not; old ones say gamma/beta."""
  key = key.removeprefix("bert.")
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))


def _decoder_keys(config: ModelConfig) -> KeyMap:
  keys: KeyMap = {"model.embed_tokens.weight": (("embed", "table_vd"), None),
                  "model.norm.weight": (("final_norm", "scale_d"), None)}
  if not config.tie_embeddings:
    keys["lm_head.weight"] = (("head", "w_io"), None)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    keys[p + "input_layernorm.weight"] = (("blocks", "attn_norm", "scale_d"), i)
    keys[p + "post_attention_layernorm.weight"] = (("blocks", "mlp_norm", "scale_d"), i)
    for proj in ("q", "k", "v", "o"):
      keys[f"{p}self_attn.{proj}_proj.weight"] = (("blocks", proj, "w_io"), i)
    if config.qkv_bias:
      for proj in ("q", "k", "v"):
        keys[f"{p}self_attn.{proj}_proj.bias"] = (("blocks", proj, "b_o"), i)
    for proj in ("gate", "up", "down"):
      keys[f"{p}mlp.{proj}_proj.weight"] = (("blocks", proj, "w_io"), i)
  return keys


def _bert_keys(config: ModelConfig) -> KeyMap:
  keys: KeyMap = {"embeddings.word_embeddings.weight": (("embed", "table_vd"), None),
                  "embeddings.position_embeddings.weight": (("embed", "position_pd"), None),
                  "embeddings.token_type_embeddings.weight": (("embed", "type_td"), None),
                  "embeddings.LayerNorm.weight": (("embed_norm", "scale_d"), None),
                  "embeddings.LayerNorm.bias": (("embed_norm", "bias_d"), None)}
  modules = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
             "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"}
  norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm"}
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}."
    for module, name in modules.items():
      keys[f"{p}{module}.weight"] = (("blocks", name, "w_io"), i)
      keys[f"{p}{module}.bias"] = (("blocks", name, "b_o"), i)
    for module, name in norms.items():
      keys[f"{p}{module}.weight"] = (("blocks", name, "scale_d"), i)
      keys[f"{p}{module}.bias"] = (("blocks", name, "bias_d"), i)
  return keys

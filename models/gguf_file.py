"""GGUF files (llama / qwen2 architectures, any quantisation `gguf` dequantizes): config from the
metadata, dequantized weights with llama.cpp's Q/K row permutation undone, and the tokenizer."""

from __future__ import annotations

import pathlib
import re

import numpy as np

from models.config import ModelConfig
from models.layout import KeyMap, assemble, readable
from models.tokenizer import Tokenizer
from models.transformer import Params

# llama.cpp's converter permutes Q/K rows for these architectures only (qwen2 runs NeoX rope unpermuted).
_GGUF_ROPE_PERMUTED = ("llama",)
_GGUF_ARCHS = ("llama", "qwen2")


def load_gguf(path: str | pathlib.Path, *, dtype: str = "float32") -> tuple[ModelConfig, Params, Tokenizer | None]:
  """A GGUF file: dequantized weights, config and tokenizer from its metadata, Q/K rows un-permuted."""
  import gguf  # only needed for GGUF files

  path = pathlib.Path(path)
  reader = readable(path, "GGUF", lambda: gguf.GGUFReader(path))
  meta = {field.name: field.contents() for field in reader.fields.values()}
  tensors = {t.name: t for t in reader.tensors}
  config = gguf_config(meta, tensors, dtype=dtype)
  arch = meta["general.architecture"]

  def read(name: str) -> np.ndarray:
    t = tensors[name]
    array = readable(path, "GGUF", lambda: gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32)
    if arch in _GGUF_ROPE_PERMUTED and re.search(r"\.attn_[qk]\.", name):
      heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
      array = unpermute_rope_rows(array, heads)
    return array

  located = {name: f"{name!r} in {path.name}" for name in tensors}
  params = assemble(config, _gguf_keys(config), located, read, (), source=str(path))
  return config, params, Tokenizer.from_gguf(meta)


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

"""One tokenizer wrapper for every model source: an HF directory, a GGUF file's metadata, or a built-in one.

All sources end up as a `tokenizers.Tokenizer` (Rust, torch-free) plus the special-token ids and the chat
template. Batches come back as numpy `(ids [B, T] int32, mask [B, T] int32)`: right-padded for training,
left-padded for batched generation (so every row's last real token sits at position T-1).
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Iterable, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders, models as tok_models, pre_tokenizers, processors, trainers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Ids 0, 1, 2 of the built-in decoder tokenizers, laid out like SmolLM2's so ChatML prompts tokenize
# to single special tokens.
DECODER_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENCODER_SPECIALS = ("[PAD]", "[CLS]", "[SEP]")


class Tokenizer:
  """Text <-> ids for one model.

  `bos_id`/`eos_id` may be None (e.g. BERT); `pad_id` falls back to `eos_id`, then 0. `add_bos` is the
  model's own convention for `batch_encode(add_bos=None)`: the wrapped tokenizer's post-processor (BOS for
  Llama, [CLS] ... [SEP] for BERT, nothing for SmolLM2) is applied then.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None = None, chat_template: str | None = None):
    # Padding and truncation are done per batch here; a tokenizer.json may carry its own (MiniLM's pads to 128).
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.backend = tokenizer
    self.bos_id = bos_id
    self.eos_id = eos_id
    self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    self.chat_template = chat_template

  # --------------------------------------------------------------------------- construction

  @classmethod
  def from_dir(cls, path: str | pathlib.Path) -> Tokenizer | None:
    """The tokenizer of an HF model directory, or None when it has none.

    Reads `tokenizer.json` directly; a directory with only slow-tokenizer files (vocab.txt,
    tokenizer.model) is converted by transformers' `AutoTokenizer` (torch-free).
    """
    path = pathlib.Path(path)
    tok_config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    if (path / "tokenizer.json").exists():
      backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif any((path / name).exists() for name in ("vocab.txt", "tokenizer.model", "vocab.json")):
      import transformers  # only for slow-tokenizer formats; heavy to import
      backend = transformers.AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    else:
      return None
    template = tok_config.get("chat_template")
    if (path / "chat_template.jinja").exists():  # where transformers 5 saves it
      template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
      template = {t["name"]: t["template"] for t in template}.get("default")

    def special_id(name: str) -> int | None:
      token = tok_config.get(name) or special_map.get(name)
      if isinstance(token, dict):
        token = token.get("content")
      return None if token is None else backend.token_to_id(token)

    return cls(backend, bos_id=special_id("bos_token"), eos_id=special_id("eos_token"),
               pad_id=special_id("pad_token"), chat_template=template)

  @classmethod
  def byte_level(cls, *, encoder: bool = False, corpus: Iterable[str] | None = None,
                 vocab_size: int = 1024) -> Tokenizer:
    """A built-in byte-level BPE: the 256 byte symbols only, or merges trained on `corpus`.

    Decoders get `<|endoftext|>`=0 (pad), `<|im_start|>`=1 (bos), `<|im_end|>`=2 (eos) and no
    automatic BOS; encoders get `[PAD]`=0, `[CLS]`=1, `[SEP]`=2 wrapped around every text.
    """
    specials = ENCODER_SPECIALS if encoder else DECODER_SPECIALS
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(list(specials) + sorted(alphabet))}
    backend = tokenizers.Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if corpus is not None:
      trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                    initial_alphabet=alphabet, show_progress=False)
      backend.train_from_iterator(corpus, trainer=trainer)
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
    pad_id, first_id, last_id = (backend.token_to_id(t) for t in specials)
    if encoder:
      backend.post_processor = processors.TemplateProcessing(
          single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
          special_tokens=[("[CLS]", first_id), ("[SEP]", last_id)])
      return cls(backend, bos_id=None, eos_id=None, pad_id=pad_id)
    return cls(backend, bos_id=first_id, eos_id=last_id, pad_id=pad_id)

  @classmethod
  def from_gguf(cls, meta: dict) -> Tokenizer | None:
    """The GPT-2-style byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata; None when
    the file has no tokenizer."""
    import gguf  # only needed for GGUF files

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
    return cls(backend, bos_id=bos, eos_id=meta.get("tokenizer.ggml.eos_token_id"),
               pad_id=meta.get("tokenizer.ggml.padding_token_id"), chat_template=meta.get("tokenizer.chat_template"))

  # --------------------------------------------------------------------------- encoding

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without any special tokens added."""
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch_encode(self, texts: Sequence[str], *, padding_side: str = "right", max_length: int | None = None,
                   add_bos: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [B, T] int32, mask [B, T] int32)`, padded with `pad_id` to the longest row.

    `add_bos=None` applies the tokenizer's own special tokens (see the class docstring); True/False
    prepends `bos_id` or nothing. `max_length` truncates each row's text from the right so that the
    row, special tokens included, has at most `max_length` ids.
    """
    if padding_side not in ("left", "right"):
      raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if add_bos and self.bos_id is None:
      raise ValueError("add_bos=True but this tokenizer has no bos token")
    own_specials = add_bos is None and self.backend.post_processor is not None
    num_specials = self.backend.num_special_tokens_to_add(False) if own_specials else int(bool(add_bos))
    rows = []
    for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False):
      if max_length is not None:
        encoding.truncate(max(max_length - num_specials, 0))
      if own_specials:
        encoding = self.backend.post_process(encoding)
      rows.append(([self.bos_id] if add_bos else []) + encoding.ids)
    return pad_rows(rows, self.pad_id, padding_side)

  # --------------------------------------------------------------------------- chat

  def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for `[{"role": ..., "content": ...}, ...]` (the model's template, else ChatML)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    token = lambda i: None if i is None else self.backend.id_to_token(i)
    return env.from_string(self.chat_template or CHATML_TEMPLATE).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=token(self.bos_id) or "", eos_token=token(self.eos_id) or "")


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, padding_side: str) -> tuple[np.ndarray, np.ndarray]:
  """Ragged id lists -> `(ids [B, T] int32, mask [B, T] int32)` with T the longest row."""
  width = max((len(r) for r in rows), default=0)
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for b, row in enumerate(rows):
    cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
    ids[b, cols] = row
    mask[b, cols] = 1
  return ids, mask


def _raise_template_error(message: str):
  raise jinja2.exceptions.TemplateError(message)


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _gguf_pre_tokenizer(name: str) -> pre_tokenizers.PreTokenizer:
  """The `tokenizers` pre-tokenizer matching a GGUF `tokenizer.ggml.pre` name."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in ("default", "gpt-2"):
    return byte_level
  if name == "smollm":  # SmolLM's tokenizer.json: digits one by one, then GPT-2 byte-level splitting
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  raise ValueError(f"unsupported GGUF pre-tokenizer {name!r}; supported: 'default', 'gpt-2', 'smollm'")

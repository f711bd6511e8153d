"""Texts and items as vectors: the model's representation of a text (a user's prompt or history, an item's
title) and each client's item vectors, in fixed-shape batches. Training (discriminative item tables and
targets) and evaluation (ranking by them) both read them from here.

Text representation (`text_representations`, `models.sequence_representation`):
  decoder: ids `[bos] + encode(text)` (as training tokenizes), left-padded; the last layer's hidden state
    after the final norm at the last real token (BIGRec's `hidden_states[-1][:, -1]`);
  encoder: the tokenizer's own `[CLS] ... [SEP]`, right-padded (absolute positions); the mean over real
    tokens of the last hidden states (sentence-transformers pooling).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import models
from fellrec_jax.data import tokenization
from federated import client
from models import transformer as tfm
from models.tokenizer import Tokenizer, pad_rows

PAD_MULTIPLE = 16


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
  """`n` rounded up to a multiple of `multiple` (at least one): fewer distinct shapes to compile."""
  return max(multiple, -(-n // multiple) * multiple)


def pad_batch(config: models.ModelConfig, rows: Sequence[Sequence[int]], pad_id: int, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """`(ids [B, width], mask [B, width])`: left-padded for decoders and causal encoders (last column = last
  token), right for encoders."""
  side = "left" if config.left_padded else "right"
  ids, mask = pad_rows(rows, pad_id, side)
  extra = width - ids.shape[1]
  spec = ((0, 0), (extra, 0)) if side == "left" else ((0, 0), (0, extra))
  return np.pad(ids, spec, constant_values=pad_id), np.pad(mask, spec)


def batch_indices(n: int, batch_size: int) -> list[np.ndarray]:
  """Index arrays of length `batch_size` covering range(n); the last one is filled with index 0 (a real
  row, so padded generation rows finish when real ones do). Callers keep the first n results."""
  return [np.pad(np.arange(s, min(s + batch_size, n)), (0, max(0, s + batch_size - n)))
          for s in range(0, n, batch_size)]


text_representations = jax.jit(models.sequence_representation, static_argnames="config")


def embed_texts(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer, texts: Sequence[str], *,
                lora: tfm.Params | None = None, batch_size: int = 256, width: int | None = None) -> np.ndarray:
  """`[N, D]` float32 `text_representations` of `texts` in batches of `min(batch_size, N)`. With `width`
  every batch is `[B, width]` (one compiled shape across calls); without it the rows go in length order,
  each batch as wide as its longest row rounded up to 16, so a few long texts do not pad every batch."""
  rows = tokenization.text_rows(config, tokenizer, texts, config.max_positions)
  if not rows:
    return np.zeros((0, config.hidden_size), np.float32)
  order = np.arange(len(rows)) if width else np.argsort([len(r) for r in rows], kind="stable")
  out = np.zeros((len(rows), config.hidden_size), np.float32)
  size = max(1, min(batch_size, len(rows)))
  for start, idx in zip(range(0, len(rows), size), batch_indices(len(rows), size)):
    batch = [rows[i] for i in order[idx]]
    ids, mask = pad_batch(config, batch, tokenizer.pad_id, max(width or 0, round_up(max(map(len, batch)))))
    real = order[start:start + size]  # the last batch's filler rows are not written back
    out[real] = np.asarray(text_representations(config, base, ids, mask, lora))[:len(real)]
  return out


def item_embeddings(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer, titles: Sequence[str], *,
                    batch_size: int = 256) -> np.ndarray:
  """`[I, D]` base-model (no LoRA) embeddings of the bare titles. Compute once per base model and pass
  them as `item_emb=` to every evaluation."""
  return embed_texts(config, base, tokenizer, titles, batch_size=batch_size)


def client_item_vectors(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer, lora: tfm.Params | None,
                        titles: Sequence[str], item_emb: np.ndarray, item_side: str) -> np.ndarray:
  """`[I, D]` one client's item vectors: its trained table or low-rank correction of `item_emb`
  (`item_side="table"`), its titles re-encoded under its adapters ("encoder"), or the base-model title
  embeddings `item_emb` ("frozen")."""
  if item_side == "table":
    return np.asarray(client.item_vectors({"items": {"table_id": jnp.asarray(item_emb)}}, lora))
  if item_side == "encoder":
    return embed_texts(dataclasses.replace(config, causal=False), base, tokenizer, titles, lora=lora)
  return item_emb

"""U-shaped split of a model at block k into three segments.

client_head = embeddings + blocks[:k]; server_body = blocks[k:L-1]; client_tail = blocks[L-1:] + final
norm + head (+ the embedding table when the head is tied). Splitting is slicing the layer axis, for
base params and LoRA params alike. The server segment's signature takes activations, the padding mask
and its own params/adapters only: token ids and labels cannot reach it.
"""

from __future__ import annotations

import jax

from models.config import ModelConfig
from models import transformer as tfm
from models.transformer import Params


def _slice_blocks(blocks: Params, start: int, stop: int) -> Params:
  return jax.tree.map(lambda x: x[start:stop], blocks)


def split(config: ModelConfig, params: Params, k: int) -> tuple[Params, Params, Params]:
  """`(head, body, tail)` pytrees for `0 <= k <= L-1`; also splits a LoRA tree (`{"blocks": ...}`)."""
  last = config.num_layers - 1
  if not 0 <= k <= last:
    raise ValueError(f"split k={k} out of range [0, {last}] for a {config.num_layers}-block model")
  blocks = params["blocks"]
  head = {key: params[key] for key in tfm.HEAD_KEYS if key in params}
  tail = {key: params[key] for key in tfm.TAIL_KEYS if key in params}
  if config.tie_embeddings and "embed" in params:
    tail["embed"] = params["embed"]
  return (head | {"blocks": _slice_blocks(blocks, 0, k)},
          {"blocks": _slice_blocks(blocks, k, last)},
          tail | {"blocks": _slice_blocks(blocks, last, config.num_layers)})


def _lora_blocks(lora: Params | None):
  return None if lora is None else lora["blocks"]


def client_head(config: ModelConfig, head: Params, input_ids_bt: jax.Array, attention_mask_bt: jax.Array, *,
                lora: Params | None = None, rng: jax.Array | None = None) -> jax.Array:
  """Embeddings and the first k blocks: token ids -> activations `act_btd` sent to the server."""
  x = tfm.embed(config, head, input_ids_bt)
  return tfm.run_blocks(config, head["blocks"], x, attention_mask_bt, lora_blocks=_lora_blocks(lora), rng=rng)


def server_body(config: ModelConfig, body: Params, act_btd: jax.Array, attention_mask_bt: jax.Array, *,
                lora: Params | None = None, rng: jax.Array | None = None) -> jax.Array:
  """The offloaded middle blocks: activations in, activations out."""
  return tfm.run_blocks(config, body["blocks"], act_btd, attention_mask_bt, lora_blocks=_lora_blocks(lora), rng=rng)


def client_body_copy(config: ModelConfig, body: Params, act_btd: jax.Array, attention_mask_bt: jax.Array) -> jax.Array:
  """The body blocks' frozen base weights run on the client, without adapters (`--private_response`: the
  positions the server must not see go through this copy instead)."""
  return tfm.run_blocks(config, body["blocks"], act_btd, attention_mask_bt)


def client_tail(config: ModelConfig, tail: Params, act_btd: jax.Array, attention_mask_bt: jax.Array, *,
                lora: Params | None = None, rng: jax.Array | None = None, hidden: bool = False,
                at: jax.Array | None = None, tail_input_btd: jax.Array | None = None) -> jax.Array:
  """The last block, final norm and head: logits `[B, T, V]` (decoder), or hidden states `[B, T, D]` (encoder,
  or `hidden=True`); at positions `at` `[B, R]` only when given. `tail_input_btd` is added to the activations
  first, as `transformer.apply` adds it before the last block."""
  if tail_input_btd is not None:
    act_btd = act_btd + tail_input_btd.astype(act_btd.dtype)
  x = tfm.run_blocks(config, tail["blocks"], act_btd, attention_mask_bt, lora_blocks=_lora_blocks(lora), rng=rng)
  return tfm.outputs(config, tail, x, hidden=hidden, at=at)

"""The inversion attack of `federated.attack` on item-as-token inputs (`--disc_input=items`).

What crosses the cut. Each position of a training row is one history item: its frozen input vector (the
base model's embedding of the item's public title, `base["items"]["input_id"]`) goes through the
embeddings' position terms and the head blocks [0, k), and the server receives `[B, T, D]` activations and
the padding mask. The item at each position is what the attack tries to read.

Threat model (as for prompts). The server knows the base weights, the public catalogue and so every
item's input vector (it can embed the titles with the public base model), the row length and the
left-padding convention, the lengths of the rows it receives (the mask), and the head adapters it
aggregates (none under `--cache_head`). Where the strategies mix the item rows by the clients' item counts
(`--item_aggregation=rows` with a trainable table or item-ID embeddings) it receives those counts too, so
it may sample its public items by that popularity; otherwise uniformly. It does not know any client's
sequence.

Attacks: (a) nearest embedding, the item whose input vector is most cosine-similar to the activation;
(b) the learned per-position inverter, trained on public rows (random catalogue items, row lengths drawn
from the masks it received, chunked as training rows are) rendered through the same head and defense.

Metrics (`item_recovery`): one position per item, so `token_accuracy`, `history_token_accuracy` and
`title_recovery` are all the fraction of history items recovered (positions not sent count as not
recovered). `target_recovery` is None: the label is an item id scored on the client tail and never
crosses the cut.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

import models
from fellrec_jax.data import pipeline
from federated import attack
from federated.cut_defense import CutDefense
from models.config import ModelConfig

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ItemRows:
  """N rows of item ids `[N, T]` (left-padded with 0) and their mask, as the attack reads them."""

  ids: np.ndarray
  mask: np.ndarray

  @property
  def prompt_mask(self) -> np.ndarray:
    """Every real position is input (there is no response to keep back)."""
    return self.mask > 0


def private_rows(chunks: pipeline.ItemSequences, *, num: int, seed: int) -> ItemRows:
  """`num` of a client's training rows (chosen at random, kept in order): what its head sent up."""
  pick = np.sort(np.random.default_rng(seed).choice(len(chunks), size=min(num, len(chunks)), replace=False))
  return ItemRows(np.asarray(chunks.input_ids[pick]), np.asarray(chunks.attention_mask[pick]))


def public_rows(num_items: int, lengths: Sequence[int], *, num: int, seq_len: int, seed: int,
                popularity: np.ndarray | None = None) -> ItemRows:
  """`num` rows the server can make alone: sequences of random catalogue items (by `popularity`, else
  uniform), each as long as a row length drawn from `lengths`, chunked as training chunks are."""
  if num_items < 1 or not len(lengths):
    raise ValueError(f"public rows need items and row lengths, got {num_items} items, {len(lengths)} lengths")
  rng = np.random.default_rng(seed)
  p = None if popularity is None else np.asarray(popularity, np.float64) / np.sum(popularity)
  sizes = rng.choice(np.asarray(lengths), size=num)
  chunks = pipeline.sequence_chunks([rng.choice(num_items, size=int(n) + 1, p=p) for n in sizes], seq_len)
  return ItemRows(chunks.input_ids, chunks.attention_mask)


def item_recovery(pred_nt: np.ndarray, rows: ItemRows, seen_nt: np.ndarray | None = None) -> dict[str, Any]:
  """The fraction of real positions whose item was recovered (under every per-item metric name)."""
  hit = (pred_nt == rows.ids) & ((rows.mask if seen_nt is None else seen_nt) > 0)
  share = float(hit[rows.mask > 0].mean()) if np.any(rows.mask > 0) else float("nan")
  return {"token_accuracy": share, "history_token_accuracy": share, "title_recovery": share, "target_recovery": None}


def attack_items_at_k(config: ModelConfig, base: Params, item_input_vd: np.ndarray, k: int, victims: ItemRows,
                      public: ItemRows, *, victim_lora: Params | None = None, inverter_steps: int = 400,
                      inverter_hidden: int = 512, seed: int = 0, defense: CutDefense = CutDefense()) -> dict[str, Any]:
  """Both attacks at cut k (`config` the causal item-as-token model, `item_input_vd` the items' input
  vectors); the stronger one's value per metric, and each attack's own."""
  params = models.item_token_params(base, np.asarray(item_input_vd, np.float32))
  act_victims, act_public = (attack.cut_activations(config, params, r.ids, r.mask, k, lora=victim_lora)
                             for r in (victims, public))
  return {"k": k, **attack.invert(defense, params["embed"]["table_vd"], act_victims, victims, act_public, public,
                                  item_recovery, inverter_steps=inverter_steps, inverter_hidden=inverter_hidden,
                                  seed=seed)}


def run_item_attack(config: ModelConfig, base: Params, item_input_vd: np.ndarray, ks: Sequence[int],
                    victims: ItemRows, public: ItemRows, **kwargs) -> dict[str, Any]:
  """`attack.json`'s content for item inputs: per-k lists of every metric and both attacks' own."""
  out = attack.per_k_table([attack_items_at_k(config, base, item_input_vd, k, victims, public, **kwargs) for k in ks])
  out["tail_offloaded"] = {"label_recovery": None,  # not applicable: item labels are scored on the client tail
                           "logit_argmax_target_accuracy": None}
  out["num_victim_rows"] = int(len(victims.ids))
  out["num_victim_items"] = int(np.sum(victims.mask > 0))
  out["num_public_rows"] = int(len(public.ids))
  return out

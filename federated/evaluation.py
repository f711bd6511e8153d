"""Held-out ranking evaluation of per-client adapters: BIGRec generation + grounding, and scoring every item.

Every evaluation runs client by client over `prep.eval_examples(c, part)` (the users with a `part` target,
the first `max_users` of each client), ranks the whole catalogue for each user and returns
`fellrec_jax.metrics.summarize`'s `{"overall", "clients", "balance"}`.

Text representations and client item vectors: `federated.representations`. Items are embedded from their
bare titles and generations with quotes stripped (the released evaluation), although responses are trained
as `"Title"`: both sides unquoted, so a generation equal to a title has that title's embedding.

Generative (BIGRec): the client's adapter beam-searches a response to each prompt (`[bos] + encode(prompt)`,
the prompt ending in "### Response:\n"); the response is decoded up to eos and stripped of whitespace and
double quotes; items are ranked by L2 distance between its embedding and every item embedding. A response
that is exactly a title takes that title's cached embedding instead of a re-embedding that could differ
in the last bits, so it grounds to that item at distance exactly 0.

Discriminative: the user is the client-adapted representation of the same prompt text; items score
by cosine similarity with the base-model item embeddings (RecFormer).

Excluded items (never ranked, as the released "history" mask of train+valid items): the user's eval
history from the windows, their whole training sequence `prep.split.train[u]`, and for "test" also
their validation targets.

Shapes are fixed per evaluation (batch B, width a multiple of 16 over all clients' prompts; the last
batch of a client is padded with copies of its first row), so generation compiles once per call shape.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import models
from fellrec_jax import baselines, metrics
from fellrec_jax.config import DECODINGS
from fellrec_jax.data import PreparedData, examples, tokenization
from federated import client, losses
from federated.representations import (batch_indices, client_item_vectors, embed_texts, item_embeddings, pad_batch,
                                       round_up, text_representations)
from models import transformer as tfm
from models.tokenizer import Tokenizer

# ----------------------------------------------------------------------------- representations

@jax.jit
def squared_distances(query_bd: jax.Array, items_id: jax.Array) -> jax.Array:
  """`[B, I]` squared L2 distances, as sums of squared differences (exactly 0 for equal vectors, unlike
  the |a|^2 + |b|^2 - 2ab expansion)."""
  return jnp.sum(jnp.square(query_bd[:, None, :] - items_id[None, :, :]), axis=-1)


# ----------------------------------------------------------------------------- per-client inputs

def excluded_items(prep: PreparedData, windows: examples.Windows, part: str) -> list[np.ndarray]:
  """Per evaluated user: eval history ∪ training sequence (∪ validation targets for "test")."""
  sp = prep.split
  out = []
  for u, hist, mask in zip(windows.user, windows.history, windows.history_mask):
    parts = [hist[mask > 0], sp.train[u]] + ([sp.valid_targets[u]] if part == "test" else [])
    out.append(np.unique(np.concatenate([np.asarray(p, np.int64) for p in parts])))
  return out


def _prompts(prep: PreparedData, windows: examples.Windows) -> list[str]:
  return [prompt for prompt, _ in prep.prompts(windows)]


def _all_clients(prep: PreparedData, part: str, max_users: int | None
                 ) -> list[tuple[examples.Windows, list[np.ndarray], list[np.ndarray]]]:
  """Per client, its first `max_users` evaluated users' `(windows, targets, excluded items)`."""
  out = []
  for c in range(prep.num_clients):
    windows, targets = prep.eval_examples(c, part)
    windows = windows.take(np.arange(len(windows))[:max_users])
    out.append((windows, targets[:len(windows)], excluded_items(prep, windows, part)))
  return out


def _client_lora(lora_c: tfm.Params | None, c: int) -> tfm.Params | None:
  return None if lora_c is None else jax.tree.map(lambda x: x[c], lora_c)


def _check_clients(prep: PreparedData, lora_c: tfm.Params | None) -> None:
  if lora_c is None:
    return
  lead = {x.shape[0] for x in jax.tree.leaves(lora_c)}
  if lead != {prep.num_clients}:
    raise ValueError(f"lora_c must carry a leading clients axis of {prep.num_clients}, got {sorted(lead)}")


# ----------------------------------------------------------------------------- generative

def clean_response(text: str) -> str:
  """A generated response as a title: surrounding whitespace and double quotes removed."""
  return text.strip().strip('"').strip()


def generate_responses(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer, lora: tfm.Params | None,
                       ids_bt: np.ndarray, mask_bt: np.ndarray, *, num_beams: int, max_new_tokens: int,
                       stop_id: int | None) -> list[str]:
  """Cleaned best-beam responses `[B]` to left-padded prompts `[B, T]`, each ending before `stop_id`
  (`response_end`)."""
  tokens_bn, _ = models.beam_search(config, base, ids_bt, mask_bt, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                    eos_id=stop_id, pad_id=tokenizer.pad_id, lora=lora)
  out = []
  for row in np.asarray(tokens_bn):
    if stop_id is not None and (row == stop_id).any():
      row = row[:np.argmax(row == stop_id)]
    out.append(clean_response(tokenizer.decode(row)))
  return out


def ground(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer, texts: Sequence[str],
           item_emb: np.ndarray, titles: Sequence[str], exclude_bi: np.ndarray, k: int, *, width: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """Nearest non-excluded items to each of B texts: `(ids [B, k'] int32 (-1: none), L2 distances [B, k'])`,
  k' = min(k, I).

  Args:
    texts: B cleaned responses, embedded in one `[B, width]` batch. item_emb: `[I, D]` from
      `item_embeddings(titles)`. exclude_bi: `[B, I]` bool.
  """
  emb_bd = embed_texts(config, base, tokenizer, texts, batch_size=len(texts), width=width)
  index = {t: i for i, t in reversed(list(enumerate(titles)))}  # the first item of a repeated title
  for b, text in enumerate(texts):
    if text in index:
      emb_bd[b] = item_emb[index[text]]
  ids_bk, neg_d2_bk = metrics.top_k(-squared_distances(emb_bd, item_emb), exclude_bi, min(k, item_emb.shape[0]))
  return np.asarray(ids_bk), np.sqrt(np.maximum(-np.asarray(neg_d2_bk), 0.0))


Ranker = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _evaluate(config: models.ModelConfig, tokenizer: Tokenizer, lora_c: tfm.Params | None, prep: PreparedData,
              part: str, *, ks: Sequence[int], batch_size: int, max_users: int | None, max_prompt_len: int,
              ranker: Callable[[tfm.Params | None], Ranker], item_inputs: bool = False) -> dict:
  """Ranks every client's users in fixed-shape batches and summarizes: `ranker(client's lora)` (built once per
  client) maps `ids [B, T], mask [B, T], exclude [B, I]` to `ranked [B, K]`. Inputs are the prompts' tokens
  (T over all clients) or, with `item_inputs`, the users' history item ids (T = history_len, left-padded);
  B = min(batch_size, largest client)."""
  _check_clients(prep, lora_c)
  clients = _all_clients(prep, part, max_users)
  if item_inputs:
    rows = [[h[m > 0].tolist() for h, m in zip(w.history, w.history_mask)] for w, _, _ in clients]
    width, pad_id = prep.split.history_len, 0
  else:
    rows = [tokenization.text_rows(config, tokenizer, _prompts(prep, w), max_prompt_len) for w, _, _ in clients]
    width, pad_id = round_up(max((len(r) for rs in rows for r in rs), default=1)), tokenizer.pad_id
  batch = max(1, min(batch_size, max(len(rs) for rs in rows)))
  per_client = []
  for c, ((_, targets, excluded), client_rows) in enumerate(zip(clients, rows)):
    if not client_rows:
      per_client.append({})
      continue
    start = time.perf_counter()
    rank = ranker(_client_lora(lora_c, c))
    exclude_ui = metrics.exclusion_mask(excluded, len(prep.titles))
    ranked = [rank(*pad_batch(config, [client_rows[i] for i in idx], pad_id, width), exclude_ui[idx])
              for idx in batch_indices(len(client_rows), batch)]
    per_client.append(metrics.user_metrics(np.concatenate(ranked)[:len(client_rows)], targets, ks))
    logging.info("%s ranking: client %d/%d, %d users, %.0fs", part, c + 1, len(clients), len(client_rows),
                 time.perf_counter() - start)
  return metrics.summarize(per_client)


def response_end(tokenizer: Tokenizer, prompt: str) -> int | None:
  """The token that ends a response in `--prompt` format `prompt`: eos, or the title line's newline."""
  return tokenizer.encode("\n")[-1] if prompt == "sequence" else tokenizer.eos_id


def catalogue_trie(tokenizer: Tokenizer, titles: Sequence[str], prompt: str = "alpaca") -> models.Trie:
  """The trie of every item's response as training tokenizes it: `encode('"Title"') + [eos]`, or in the
  sequence format `encode('"Title"\\n')`, which must end with the newline token on its own (a training
  chunk's lines are encoded together, so a merge across the line end would differ from the trie)."""
  end = response_end(tokenizer, prompt)
  if end is None:
    raise ValueError("constrained decoding needs a tokenizer with an eos token: it ends every catalogue response")
  if prompt != "sequence":
    return models.build_trie([tokenizer.encode(examples.quoted(t)) + [end] for t in titles], end)
  sequences = [tokenizer.encode(examples.title_line(t)) for t in titles]
  merged = [t for t, seq in zip(titles, sequences) if seq[-1] != end or end in seq[:-1]]
  if merged:
    raise ValueError(f"--prompt=sequence: the tokenizer does not end {len(merged)} title line(s) with the newline "
                     f"token alone (e.g. {merged[0]!r}); use --prompt=compact")
  return models.build_trie(sequences, end)


def evaluate_generative(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer,
                        lora_c: tfm.Params | None, prep: PreparedData, part: str, *,
                        ks: Sequence[int] = metrics.DEFAULT_KS, decoding: str = "l2", num_beams: int = 4,
                        max_new_tokens: int = 32, batch_size: int = 64, max_users: int | None = None,
                        item_emb: np.ndarray | None = None) -> dict:
  """Generative evaluation of each client's adapter on its own users.

  decoding "l2" (BIGRec, see the module docstring): the best of `num_beams` beams, grounded by L2
  distance. "constrained": `models.constrained_beam_search` over the trie of the catalogue's responses
  with each user's excluded items removed: the `num_beams` finished beams, by sequence logprob, are the
  ranking, so metrics at K > `num_beams` count only those items.

  Args:
    lora_c: adapters with a leading clients axis C (client c uses `x[c]`), or None for the base model.
    part: "valid" or "test".
    max_users: evaluate only each client's first users.
    item_emb: `[I, D]` from `item_embeddings` (L2 grounding), computed here when None.
  Returns:
    `{"overall": {metric, "test_users"}, "clients": [{metric, "test_users"}], "balance": {metric: {std,
    min, max, range, cv}}}` for metrics recall/ndcg/hr @ ks ("test_users" counts the `part` users).
  """
  if not config.is_decoder:
    raise ValueError("generative evaluation needs a decoder; use evaluate_discriminative for encoders")
  if decoding not in DECODINGS:
    raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
  stop_id = response_end(tokenizer, prep.prompt)
  if decoding == "constrained":
    trie = catalogue_trie(tokenizer, prep.titles, prep.prompt)

    def ranker(lora):
      def rank(ids_bt, mask_bt, exclude_bi):
        return np.asarray(models.constrained_beam_search(config, base, ids_bt, mask_bt, trie, exclude_bi,
                                                         num_beams=num_beams, eos_id=stop_id, lora=lora)[0])
      return rank

    max_prompt_len = config.max_positions - trie.depth
  else:
    if item_emb is None:
      item_emb = item_embeddings(config, base, tokenizer, prep.titles)
    # Re-encoded responses rarely exceed the generated tokens; a fixed width keeps one compiled shape.
    response_width = round_up(max_new_tokens + 1)

    def ranker(lora):
      def rank(ids_bt, mask_bt, exclude_bi):
        texts = generate_responses(config, base, tokenizer, lora, ids_bt, mask_bt, num_beams=num_beams,
                                   max_new_tokens=max_new_tokens, stop_id=stop_id)
        return ground(config, base, tokenizer, texts, item_emb, prep.titles, exclude_bi, max(ks),
                      width=response_width)[0]
      return rank

    max_prompt_len = config.max_positions - max_new_tokens
  return _evaluate(config, tokenizer, lora_c, prep, part, ks=ks, batch_size=batch_size, max_users=max_users,
                   max_prompt_len=max_prompt_len, ranker=ranker)


# ----------------------------------------------------------------------------- discriminative

score_items = jax.jit(losses.item_scores, static_argnames="score")  # [B, I]; training divides by a temperature


def evaluate_discriminative(config: models.ModelConfig, base: tfm.Params, tokenizer: Tokenizer,
                            lora_c: tfm.Params | None, prep: PreparedData, part: str, *,
                            ks: Sequence[int] = metrics.DEFAULT_KS, batch_size: int = 64,
                            max_users: int | None = None, item_emb: np.ndarray | None = None,
                            item_side: str = "frozen", item_tokens: bool = False, score: str = "cosine") -> dict:
  """Scores every item for each user: `losses.item_scores` (`score`: cosine or dot) of the client-adapted
  `text_representations` of the user's input (the prompt's tokens, or with `item_tokens` the history's items
  embedded with the base-model title embeddings, run causally: `config.causal`) and the client's item
  vectors (`client_item_vectors`); excluded items masked. Arguments and result as `evaluate_generative`."""
  if item_emb is None:
    item_emb = item_embeddings(dataclasses.replace(config, causal=False), base, tokenizer, prep.titles)
  k = min(max(ks), item_emb.shape[0])

  def ranker(lora):
    items_id = jnp.asarray(client_item_vectors(config, base, tokenizer, lora, prep.titles, item_emb, item_side))
    params = tfm.item_token_params(base, jnp.asarray(item_emb)) if item_tokens else base

    def rank(ids_bt, mask_bt, exclude_bi):
      users_bd = text_representations(config, params, ids_bt, mask_bt, lora,
                                      client.tail_input(lora or {}, jnp.asarray(ids_bt)))
      scores_bi = score_items(users_bd, items_id, score)
      return np.asarray(metrics.top_k(scores_bi, exclude_bi, k)[0])
    return rank

  return _evaluate(config, tokenizer, lora_c, prep, part, ks=ks, batch_size=batch_size, max_users=max_users,
                   max_prompt_len=config.max_positions, ranker=ranker, item_inputs=item_tokens)


# ----------------------------------------------------------------------------- floors

def score_baseline(prep: PreparedData, part: str, score: baselines.ScoreFn,
                   ks: Sequence[int] = metrics.DEFAULT_KS, *, max_users: int | None = None) -> dict:
  """Ranks each client's evaluated users (the same users, targets and `excluded_items` as the LLM
  evaluation) by `score(users [U], histories) -> [U, I]` (histories: `baselines.eval_histories`).
  Result as `evaluate_generative`."""
  num_items = len(prep.titles)
  k = min(max(ks), num_items)
  per_client = []
  for windows, targets, excluded in _all_clients(prep, part, max_users):
    if not len(windows):
      per_client.append({})
      continue
    exclude_ui = metrics.exclusion_mask(excluded, num_items)
    scores_ui = score(windows.user, baselines.eval_histories(prep.split, windows.user, part))
    ranked, _ = metrics.top_k(scores_ui, exclude_ui, k)
    per_client.append(metrics.user_metrics(np.asarray(ranked), targets, ks))
  return metrics.summarize(per_client)


def popularity_baseline(prep: PreparedData, part: str, ks: Sequence[int] = metrics.DEFAULT_KS, *,
                        max_users: int | None = None) -> dict:
  """Most-popular items (training interaction counts over all users) with the same exclusions; the
  floor every LLM strategy should clear. Result as `evaluate_generative`."""
  return score_baseline(prep, part, baselines.most_popular(prep.split.train, len(prep.titles)), ks,
                        max_users=max_users)


def reference_rows(prep: PreparedData, part: str, names: Sequence[str] = baselines.NAMES,
                   ks: Sequence[int] = metrics.DEFAULT_KS, *, max_users: int | None = None, seed: int = 0,
                   **fit_kwargs) -> dict[str, dict]:
  """The conventional reference rows every comparison reports: most-popular (always) and the other `names`
  of `baselines.NAMES`, fitted on `prep.split.train` (`baselines.fit_baselines(..., seed=seed,
  **fit_kwargs)`: item-kNN's k and SASRec's epochs chosen on "valid") and scored by `score_baseline`.

  Returns:
    `{name: evaluate_generative-style result | {"fit": facts about the fit (chosen k, epochs, seconds)}}`.
  """
  names = ("most_popular",) + tuple(n for n in names if n != "most_popular")
  fitted = baselines.fit_baselines(prep.split, len(prep.titles), names, seed=seed, **fit_kwargs)
  return {name: score_baseline(prep, part, f.score, ks, max_users=max_users) | {"fit": f.info}
          for name, f in fitted.items()}


def random_baseline(prep: PreparedData, part: str, ks: Sequence[int] = metrics.DEFAULT_KS, *,
                    max_users: int | None = None) -> dict:
  """The expected metrics of a uniformly random ranking with the same exclusions. Result as
  `evaluate_generative`."""
  num_items = len(prep.titles)
  per_client = []
  for _, targets, excluded in _all_clients(prep, part, max_users):
    gts = [np.unique(t) for t in targets]
    per_client.append(metrics.random_user_metrics(
        np.asarray([num_items - len(ex) for ex in excluded]), np.asarray([len(gt) for gt in gts]),
        np.asarray([len(np.setdiff1d(gt, ex)) for gt, ex in zip(gts, excluded)]), ks) if gts else {})
  return metrics.summarize(per_client)

"""An honest-but-curious server inverts the activations it receives at the split cut k.

Threat model. The server follows the protocol but reads everything it is sent. It knows the base
weights (public pretrained weights; it holds blocks [k, L-1) anyway), the tokenizer, the prompt
template and the public item catalogue (titles). It does not know the clients' histories or their
adapters. It sees, per training micro-batch, `act_up = client_head(ids)` `[B, T, D]` and the attention
mask (padding positions). Goal: the client's input tokens, in particular the item titles of the user's
history (and, because generative training feeds the response in with teacher forcing, the next-item
title too).

Attacks:
  (a) nearest embedding: token at t = argmax_v cos(act_t, E_v) over the whole vocabulary. At k = 0 the
      activations are the token embeddings, so this is exact (for an embedding table with distinct rows).
  (b) learned inversion: the server renders public prompts itself (catalogue titles as random
      histories in the same template), runs them through the base head (blocks [:k], no adapters),
      and fits a per-position MLP decoder `act_t -> token_t` with optax. Its output vocabulary is the
      set of tokens seen in that public text (the server knows what the prompts can contain).
Adapters: the victims' activations are produced with `victim_lora` (default none = fresh adapters,
whose B = 0 leaves the base function unchanged). The server aggregates the adapters, head blocks
included, so it renders its public prompts through the same head adapters.
Defenses (`federated.cut_defense`): the victims' activations reach the server as `to_server` makes
them (clipped, noised, response positions zeroed and masked); the server knows the mechanism and its
setting, so it trains its inverter on public activations passed through the same defense (fresh noise).
Positions the server is not sent (mask 0) count as not recovered.

Metrics (over the victims' prompts):
  token_accuracy: recovered tokens / prompt tokens (bos + prompt, padding excluded).
  history_token_accuracy: the same over tokens inside history titles only (the template is public).
  title_recovery: fraction of history titles all of whose tokens were recovered.
  target_recovery: fraction of next-item (response) titles all of whose tokens were recovered.
And if the tail were offloaded too, the server would compute the loss, whose input is the label
tokens: label recovery is 1.0 by construction; `logit_argmax_target_accuracy` additionally measures what
it reads off the logits alone (argmax at t vs the response token at t+1) with the base model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from fellrec_jax.data import examples, tokenization
from federated.cut_defense import CutDefense, to_server
from models.config import ModelConfig

Params = dict[str, Any]


# ----------------------------------------------------------------------------- prompts with title spans

@dataclasses.dataclass(frozen=True)
class PromptSet:
  """N tokenized training prompts (prompt + response, as clients train on them), right-padded.

  ids, mask: [N, T] int32.  prompt_mask: [N, T] bool, the bos + prompt tokens.
  title_spans: per row, token [start, stop) of every history title still in the row.
  target_spans: per row, token [start, stop) of the response title (or None if cut off).
  """

  ids: np.ndarray
  mask: np.ndarray
  prompt_mask: np.ndarray
  title_spans: tuple[tuple[tuple[int, int], ...], ...]
  target_spans: tuple[tuple[int, int] | None, ...]


def _token_span(offsets: Sequence[tuple[int, int]], start: int, stop: int) -> tuple[int, int]:
  """Token indices [a, b) of the tokens overlapping characters [start, stop)."""
  hit = [i for i, (s, e) in enumerate(offsets) if s < stop and e > start]
  return (hit[0], hit[-1] + 1) if hit else (0, 0)


def _quoted_spans(text: str, titles: Sequence[str], from_char: int) -> list[tuple[int, int]]:
  """Character spans of `"title"` occurrences in order (the quotes belong to the rendered title)."""
  spans, pos = [], from_char
  for t in titles:
    at = text.find(f'"{t}"', pos)
    if at < 0:
      raise ValueError(f"title {t!r} not found in the prompt")
    spans.append((at + 1, at + 1 + len(t)))
    pos = at + len(t) + 2
  return spans


def render_prompts(records: Sequence[dict], history_titles: Sequence[Sequence[str]], tokenizer, *,
                   cutoff: int = 512, pad_multiple: int = 8) -> PromptSet:
  """Tokenizes as training does (`fellrec_jax.data.tokenization.truncate`: [bos] + prompt + response + [eos],
  oldest prompt tokens dropped past `cutoff`) and records where each title's tokens are."""
  backend = tokenizer.backend
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  rows, prompt_lens, title_spans, target_spans = [], [], [], []
  for rec, hist in zip(records, history_titles):
    prompt, response = examples.prompt_text(rec)
    enc_p = backend.encode(prompt, add_special_tokens=False)
    enc_r = backend.encode(response, add_special_tokens=False)
    ids, p_len = tokenization.truncate(bos, list(enc_p.ids), list(enc_r.ids) + eos, cutoff)
    drop = len(bos) + len(enc_p.ids) - p_len  # the oldest prompt tokens the cutoff removed
    shift = len(bos) - drop
    spans = []
    for s, e in _quoted_spans(prompt, hist, prompt.find("### Input:")):
      a, b = _token_span(enc_p.offsets, s, e)
      if a >= drop and b > a:
        spans.append((a + shift, b + shift))
    target = None
    if response.startswith('"') and len(response) > 2:
      a, b = _token_span(enc_r.offsets, 1, len(response) - 1)
      if b <= len(ids) - p_len and b > a:
        target = (a + p_len, b + p_len)
    rows.append(ids)
    prompt_lens.append(p_len)
    title_spans.append(tuple(spans))
    target_spans.append(target)
  t = -(-max(len(r) for r in rows) // pad_multiple) * pad_multiple
  ids = np.full((len(rows), t), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
    mask[i, :len(r)] = 1
  prompt_mask = (np.arange(t)[None] < np.asarray(prompt_lens)[:, None]) & (mask > 0)
  return PromptSet(ids, mask, prompt_mask, tuple(title_spans), tuple(target_spans))


def private_prompts(windows: examples.Windows, titles: Sequence[str], noun: str, tokenizer, **kwargs) -> PromptSet:
  """The clients' own training prompts (their histories are what the attack tries to read)."""
  records = examples.window_records(windows, titles, noun)
  hists = [[titles[i] for i in h[m > 0]] for h, m in zip(windows.history, windows.history_mask)]
  return render_prompts(records, hists, tokenizer, **kwargs)


def public_prompts(titles: Sequence[str], noun: str, tokenizer, *, num: int, history_len: int, seed: int,
                   **kwargs) -> PromptSet:
  """What the server can make without any client: random catalogue titles as histories and target."""
  rng = np.random.default_rng(seed)
  records, hists = [], []
  for _ in range(num):
    n = int(rng.integers(1, history_len + 1))
    pick = rng.choice(len(titles), size=n + 1, replace=len(titles) < n + 1)
    hist = [titles[i] for i in pick[:n]]
    records.append(examples.bigrec_prompt(hist, titles[pick[n]], noun))
    hists.append(hist)
  return render_prompts(records, hists, tokenizer, **kwargs)


# ----------------------------------------------------------------------------- what the server sees

def cut_activations(config: ModelConfig, base: Params, ids: np.ndarray, mask: np.ndarray, k: int, *,
                    lora: Params | None = None, batch_size: int = 64) -> np.ndarray:
  """`client_head` outputs `[N, T, D]` (fp32 numpy) at cut k: what the server receives."""
  head, _, _ = models.split(config, base, k)
  l_head = None if lora is None else models.split(config, lora, k)[0]
  fn = jax.jit(lambda h, lh, i, m: models.client_head(config, h, i, m, lora=lh))
  out = [np.asarray(fn(head, l_head, ids[s:s + batch_size], mask[s:s + batch_size]), np.float32)
         for s in range(0, ids.shape[0], batch_size)]
  return np.concatenate(out)


def server_view(defense: CutDefense, act_ntd: np.ndarray, prompts: PromptSet, key: jax.Array,
                *, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """`(act [N, T, D], mask [N, T])` as the server receives them under `defense`: with a private response
  only the prompt positions (`prompts.prompt_mask`) are sent."""
  visible = prompts.prompt_mask.astype(np.int32) if defense.private_response else prompts.mask
  send = jax.jit(lambda a, v, k: to_server(defense, a, v, k))
  out = [np.asarray(send(act_ntd[s:s + batch_size], visible[s:s + batch_size], jax.random.fold_in(key, s)))
         for s in range(0, act_ntd.shape[0], batch_size)]
  return np.concatenate(out), visible * prompts.mask


# ----------------------------------------------------------------------------- (a) nearest embedding

def nearest_embedding(table_vd: jax.Array, act_ntd: np.ndarray, *, chunk: int = 4096) -> np.ndarray:
  """Token ids `[N, T]`: the vocabulary row most cosine-similar to each activation."""
  table = jnp.asarray(table_vd, jnp.float32)
  table = table / jnp.maximum(jnp.linalg.norm(table, axis=-1, keepdims=True), 1e-12)
  flat = act_ntd.reshape(-1, act_ntd.shape[-1])
  best = jax.jit(lambda t, x: jnp.argmax(x @ t.T, axis=-1))  # the table is an argument, not a baked constant
  out = [np.asarray(best(table, jnp.asarray(flat[s:s + chunk]))) for s in range(0, flat.shape[0], chunk)]
  return np.concatenate(out).reshape(act_ntd.shape[:2]).astype(np.int32)


# ----------------------------------------------------------------------------- (b) learned inversion

@dataclasses.dataclass(frozen=True)
class Inverter:
  """A per-position MLP `act_t [D] -> token` over a compact vocabulary `vocab [V']` (global ids)."""

  params: Params
  vocab: np.ndarray

  def predict(self, act_ntd: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    flat = act_ntd.reshape(-1, act_ntd.shape[-1])
    fn = jax.jit(lambda p, x: jnp.argmax(_mlp(p, x), axis=-1))
    out = np.concatenate([np.asarray(fn(self.params, jnp.asarray(flat[s:s + chunk])))
                          for s in range(0, flat.shape[0], chunk)])
    return self.vocab[out].reshape(act_ntd.shape[:2]).astype(np.int32)


def _mlp(p: Params, x_nd: jax.Array) -> jax.Array:
  """RMS-normalised input (hidden-state norms grow with depth) -> GELU hidden layer -> logits [N, V']."""
  x = x_nd * jax.lax.rsqrt(jnp.mean(jnp.square(x_nd), axis=-1, keepdims=True) + 1e-6)
  h = jax.nn.gelu(x @ p["w1"] + p["b1"])
  return h @ p["w2"] + p["b2"]


def train_inverter(act_ntd: np.ndarray, ids_nt: np.ndarray, mask_nt: np.ndarray, *, hidden: int = 512,
                   steps: int = 400, batch_size: int = 1024, learning_rate: float = 3e-3, seed: int = 0) -> Inverter:
  """Fits the MLP on the server's own (activation, token) pairs at real (unpadded) positions."""
  keep = mask_nt.reshape(-1) > 0
  x = act_ntd.reshape(-1, act_ntd.shape[-1])[keep].astype(np.float32)
  tokens = ids_nt.reshape(-1)[keep]
  vocab, y = np.unique(tokens, return_inverse=True)
  d, v = x.shape[1], len(vocab)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  params = {"w1": jax.random.normal(k1, (d, hidden)) / np.sqrt(d), "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, v)) / np.sqrt(hidden), "b2": jnp.zeros(v)}
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
  xs, ys = jnp.asarray(x), jnp.asarray(y, jnp.int32)

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, xb), yb).mean()

  @jax.jit
  def fit(p, xs, ys, key):
    def step(carry, k):
      p, opt = carry
      idx = jax.random.randint(k, (batch_size,), 0, xs.shape[0])
      g = jax.grad(loss_fn)(p, xs[idx], ys[idx])
      updates, opt = tx.update(g, opt, p)
      return (optax.apply_updates(p, updates), opt), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), jax.random.split(key, steps))
    return p

  params = fit(params, xs, ys, k3)
  return Inverter(jax.device_get(params), vocab)


# ----------------------------------------------------------------------------- metrics

def recovery(pred_nt: np.ndarray, prompts: PromptSet, seen_nt: np.ndarray | None = None) -> dict[str, float]:
  """Token accuracy over prompt tokens and history-title tokens; exact title and target recovery.
  Positions outside `seen_nt` (what the server was sent; default all) are not recovered."""
  hit = (pred_nt == prompts.ids) & (prompts.mask > 0 if seen_nt is None else seen_nt > 0)
  title_ok, title_tok, target_ok = [], [], []
  for row, spans in enumerate(prompts.title_spans):
    for a, b in spans:
      title_ok.append(bool(hit[row, a:b].all()))
      title_tok.append(hit[row, a:b])
  for row, span in enumerate(prompts.target_spans):
    if span is not None:
      target_ok.append(bool(hit[row, span[0]:span[1]].all()))
  mean = lambda xs: float(np.mean(xs)) if len(xs) else float("nan")
  return {"token_accuracy": float(hit[prompts.prompt_mask].mean()),
          "history_token_accuracy": mean(np.concatenate(title_tok)) if title_tok else float("nan"),
          "title_recovery": mean(title_ok), "target_recovery": mean(target_ok)}


def logit_argmax_target_accuracy(config: ModelConfig, base: Params, prompts: PromptSet, *,
                                 lora: Params | None = None, batch_size: int = 32) -> float:
  """If the server also ran the tail it would see logits: argmax at t vs the response token at t+1."""
  fn = jax.jit(lambda p, lp, i, m: jnp.argmax(models.apply(config, p, i, m, lora=lp), axis=-1))
  preds = np.concatenate([np.asarray(fn(base, lora, prompts.ids[s:s + batch_size], prompts.mask[s:s + batch_size]))
                          for s in range(0, len(prompts.ids), batch_size)])
  hits = [preds[r, a - 1:b - 1] == prompts.ids[r, a:b] for r, span in enumerate(prompts.target_spans)
          if span is not None for a, b in [span]]
  return float(np.mean(np.concatenate(hits))) if hits else float("nan")


def attack_at_k(config: ModelConfig, base: Params, k: int, victims: PromptSet, public: PromptSet, *,
                victim_lora: Params | None = None, inverter_steps: int = 400, inverter_hidden: int = 512,
                seed: int = 0, defense: CutDefense = CutDefense()) -> dict[str, Any]:
  """Both attacks at cut k under `defense`; the reported `token_accuracy` etc. are those of the stronger
  one per metric."""
  act_victims, act_public = (cut_activations(config, base, p.ids, p.mask, k, lora=victim_lora) for p in (victims, public))
  return {"k": k, **invert(defense, base["embed"]["table_vd"], act_victims, victims, act_public, public, recovery,
                           inverter_steps=inverter_steps, inverter_hidden=inverter_hidden, seed=seed)}


def invert(defense: CutDefense, table_vd, act_victims: np.ndarray, victims, act_public: np.ndarray, public,
           score, *, inverter_steps: int = 400, inverter_hidden: int = 512, seed: int = 0) -> dict[str, Any]:
  """Both attacks on head outputs as the server receives them under `defense`: nearest row of `table_vd`
  and an inverter trained on the public rows' (noised) activations against their `ids`. `victims`/`public`
  carry `ids`, `mask` and `prompt_mask` (the positions sent under a private response); `score(pred, seen)`
  the metrics. Returns the stronger attack's value per metric (None where a metric does not apply), and
  both attacks' own under "nearest" and "learned"."""
  key_victims, key_public = jax.random.split(jax.random.key(seed + 7919))
  view_victims, seen = server_view(defense, act_victims, victims, key_victims)
  nearest = score(nearest_embedding(table_vd, view_victims), victims, seen)
  view_public, seen_public = server_view(defense, act_public, public, key_public)
  inverter = train_inverter(view_public, public.ids, seen_public, hidden=inverter_hidden, steps=inverter_steps,
                            seed=seed)
  learned = score(inverter.predict(view_victims), victims, seen)
  best = {m: None if nearest[m] is None else max(nearest[m], learned[m]) for m in nearest}
  return {**best, "nearest": nearest, "learned": learned}


def per_k_table(per_k: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """`attack_at_k` results (one per cut) as per-k lists of every metric, the stronger attack's and each one's."""
  metrics = ("token_accuracy", "history_token_accuracy", "title_recovery", "target_recovery")
  out: dict[str, Any] = {"k": [r["k"] for r in per_k]}
  for m in metrics:
    out[m] = [r[m] for r in per_k]
  for attack in ("nearest", "learned"):
    out[attack] = {m: [r[attack][m] for r in per_k] for m in metrics}
  return out


def run_attack(config: ModelConfig, base: Params, ks: Sequence[int], victims: PromptSet, public: PromptSet, *,
               victim_lora: Params | None = None, inverter_steps: int = 400, inverter_hidden: int = 512,
               seed: int = 0, defense: CutDefense = CutDefense()) -> dict[str, Any]:
  """`attack.json`'s content: per-k lists of every metric, both attacks, and the tail-offload numbers."""
  out = per_k_table([attack_at_k(config, base, k, victims, public, victim_lora=victim_lora,
                                 inverter_steps=inverter_steps, inverter_hidden=inverter_hidden, seed=seed,
                                 defense=defense) for k in ks])
  out["tail_offloaded"] = {
      "label_recovery": 1.0,  # the loss's inputs are the label tokens: a server running the tail holds them
      "logit_argmax_target_accuracy": logit_argmax_target_accuracy(config, base, victims, lora=victim_lora)}
  out["num_victim_prompts"] = int(len(victims.ids))
  out["num_victim_titles"] = int(sum(len(s) for s in victims.title_spans))
  out["num_public_prompts"] = int(len(public.ids))
  return out

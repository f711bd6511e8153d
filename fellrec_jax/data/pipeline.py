"""Per-client examples -> stacked, lockstep numpy batches for the vmapped client step.

Batches are a pure function of (seed, epoch, step): client c's epoch-`epoch` order is a grain
`MapDataset` shuffle seeded by (seed, epoch, c), and step s takes that order's s-th slice of
`batch_size`. So an iterator is resumed exactly from the dict {"seed", "epoch", "step"}.

What grain does and what is kept by hand: the per-epoch reshuffle is grain's (`MapDataset.shuffle`). The
iterator state is those three integers, stored in each checkpoint, rather than C grain iterators' `get_state`:
a `MapDataset` is random access, so they are the whole position, and the lockstep across clients (an
exhausted client yields all-padding batches) is not a grain transformation. No prefetching: a round's
batches are gathered at once, before its one jitted program, in 0.3-0.5 s against 90-138 s of local
training per quickstart round (measured, shared cores).

Lockstep: an epoch has S = max_c steps_c steps (steps_c = ceil(n_c / B)); at each step every client
yields a batch. A client's last batch is zero-padded to B, and a client that has run out of data
yields an all-padding batch; padded rows have example_mask 0 (and all other masks 0).

Generative batch (`TokenizedExamples`), right-padded, T fixed for a run:
  input_ids      [C, B, T] int32  prompt then response tokens, then pad_id
  attention_mask [C, B, T] int32  1 on real tokens
  target_index   [C, B, R] int32  positions t whose next token t+1 is a token to predict (a response
                                  token, or any token after the first when train_on_inputs), in
                                  order, then 0 on padding: loss = sum_r target_mask[r] *
                                  CE(logits[target_index[r]], input_ids[target_index[r] + 1]).
                                  R (<= T-1) is fixed for a run: the most targets of any example,
                                  so the head runs at R positions rather than T.
  target_mask    [C, B, R] int32  1 on real entries of target_index
  example_mask   [C, B]    int32  1 on real examples
Discriminative prompt batch (`PromptExamples`): input_ids, attention_mask [C, B, T], target [C, B],
  example_mask [C, B].
Item-as-token batch (`ItemSequences`): input_ids (item ids, left-padded with 0, most recent last),
  attention_mask [C, B, T], target [C, B, T] (the next item at each position) or [C, B] (held out: the
  item after the last column), example_mask [C, B].
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import grain
from absl import logging
import numpy as np

from fellrec_jax.data import examples as examples_lib
from fellrec_jax.data.prepare import PreparedData
from fellrec_jax.data.sources import DataError
from fellrec_jax.data.tokenization import Tokenizer, encode_parts, truncate


def targets_from_loss_mask(loss_mask: np.ndarray, num_targets: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`loss_mask [..., T]` (1 where the next token is a target) -> `(target_index, target_mask) [..., R]`:
  each row's target positions in order, then zeros. R defaults to the most targets of any row; a row
  with more than `num_targets` targets is an error, never cut silently."""
  loss_mask = np.asarray(loss_mask) > 0
  if loss_mask[..., -1].any():
    raise ValueError("loss_mask[..., T-1] must be 0: no token follows the last position")
  most = int(loss_mask.sum(-1).max(initial=0))
  num_targets = most if num_targets is None else num_targets
  if most > num_targets:
    raise ValueError(f"a row has {most} target tokens, more than num_targets={num_targets}")
  order = np.argsort(~loss_mask, axis=-1, kind="stable")[..., :num_targets]
  target_mask = np.take_along_axis(loss_mask, order, axis=-1)
  return np.where(target_mask, order, 0).astype(np.int32), target_mask.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
  """One client's tokenized examples, stored ragged.

  Attributes:
    tokens: [sum L_n] int32 all examples' ids concatenated.
    offsets: [N+1] int64, example n is tokens[offsets[n]:offsets[n+1]].
    loss_start: [N] first position whose token is predicted (P, or 1 when train_on_inputs).
    seq_len: T, the padded length of every batch.
    pad_id: id written on padding.
    num_targets: R, the length of `target_index` rows (at least every example's number of targets).
  """

  tokens: np.ndarray
  offsets: np.ndarray
  loss_start: np.ndarray
  seq_len: int
  pad_id: int
  num_targets: int

  def __len__(self) -> int:
    return int(self.loss_start.shape[0])

  def gather(self, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Examples `idx` (len <= B) as one right-padded batch of B rows ([B, T] / [B])."""
    b, t = batch_size, self.seq_len
    out = {"input_ids": np.full((b, t), self.pad_id, np.int32), "attention_mask": np.zeros((b, t), np.int32),
           "example_mask": np.zeros(b, np.int32)}
    loss_mask = np.zeros((b, t), np.int32)
    for r, n in enumerate(idx):
      ids = self.tokens[self.offsets[n]:self.offsets[n + 1]]
      out["input_ids"][r, :len(ids)] = ids
      out["attention_mask"][r, :len(ids)] = 1
      loss_mask[r, self.loss_start[n] - 1:len(ids) - 1] = 1
      out["example_mask"][r] = 1
    out["target_index"], out["target_mask"] = targets_from_loss_mask(loss_mask, self.num_targets)
    return out


@dataclasses.dataclass(frozen=True)
class ItemSequences:
  """One client's item-as-token examples (`--disc_input=items`): rows of item ids, each position one item.

  Attributes:
    input_ids: [N, T] int32 item ids, LEFT-padded with 0 (the most recent item in column T-1).
    attention_mask: [N, T] int32, 1 on real items.
    target: [N, T] int32, the item that follows each input (0 on padding): training chunks, where every
      position predicts its next item; or [N], the item after the last column: held-out users.
    head_act: optional [N, T, D] float32, the client head's activations of each row, computed once when the
      head has no adapters (`--cache_head`).
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  target: np.ndarray
  head_act: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def seq_len(self) -> int:
    return int(self.input_ids.shape[1])

  def gather(self, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Rows `idx` zero-padded to B: input_ids, attention_mask [B, T], target [B, T] or [B], example_mask [B]
    (and head_act [B, T, D])."""
    pad = batch_size - len(idx)
    idx = np.asarray(idx, np.int64)
    rows = lambda a: np.concatenate([a[idx], np.zeros((pad, *a.shape[1:]), a.dtype)])
    out = {"input_ids": rows(self.input_ids), "attention_mask": rows(self.attention_mask),
           "target": rows(self.target),
           "example_mask": np.concatenate([np.ones(len(idx), np.int32), np.zeros(pad, np.int32)])}
    if self.head_act is not None:
      out["head_act"] = rows(self.head_act)
    return out


def sequence_chunks(sequences: Sequence[np.ndarray], seq_len: int) -> ItemSequences:
  """Every training position exactly once: a sequence of n items has targets s[1:], each predicted from
  the items before it; the pairs (s[j-1] -> s[j]) are cut from the most recent end into rows of `seq_len`
  positions, left-padded, so a row's context starts at its first column (as SASRec's max_len windows)."""
  ids, targets = [], []
  for seq in sequences:
    seq = np.asarray(seq, np.int32)
    for end in range(len(seq), 1, -seq_len):
      start = max(1, end - seq_len)
      ids.append(seq[start - 1:end - 1])
      targets.append(seq[start:end])
  n = len(ids)
  out = ItemSequences(np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32),
                      np.zeros((n, seq_len), np.int32))
  for r, (i, t) in enumerate(zip(ids, targets)):
    out.input_ids[r, seq_len - len(i):] = i
    out.attention_mask[r, seq_len - len(i):] = 1
    out.target[r, seq_len - len(t):] = t
  return out


@dataclasses.dataclass(frozen=True)
class PromptExamples:
  """One client's token rows (e.g. prompts) with a target item each, for discriminative training.

  Attributes:
    tokens, offsets: ragged rows as in `TokenizedExamples`.
    target: [N] int32 item ids.
    seq_len: T; pad_id: id written on padding.
    left_pad: left padding (decoders: the last column is the last token) or right (encoders).
  """

  tokens: np.ndarray
  offsets: np.ndarray
  target: np.ndarray
  seq_len: int
  pad_id: int
  left_pad: bool

  @classmethod
  def from_rows(cls, rows: Sequence[Sequence[int]], target: np.ndarray, *, seq_len: int, pad_id: int,
                left_pad: bool) -> PromptExamples:
    lengths = [len(r) for r in rows]
    return cls(np.asarray([i for r in rows for i in r], np.int32),
               np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]), np.asarray(target, np.int32),
               seq_len, pad_id, left_pad)

  def __len__(self) -> int:
    return int(self.target.shape[0])

  def gather(self, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """input_ids / attention_mask [B, T], target / example_mask [B]."""
    b, t = batch_size, self.seq_len
    out = {"input_ids": np.full((b, t), self.pad_id, np.int32), "attention_mask": np.zeros((b, t), np.int32),
           "target": np.zeros(b, np.int32), "example_mask": np.zeros(b, np.int32)}
    for r, n in enumerate(idx):
      ids = self.tokens[self.offsets[n]:self.offsets[n + 1]][-t:]
      cols = slice(t - len(ids), t) if self.left_pad else slice(0, len(ids))
      out["input_ids"][r, cols] = ids
      out["attention_mask"][r, cols] = 1
      out["target"][r] = self.target[n]
      out["example_mask"][r] = 1
    return out


ClientExamples = TokenizedExamples | ItemSequences | PromptExamples


def tokenize_clients(prompts: Sequence[Sequence[tuple[str, str]]], tokenizer: Tokenizer, *, cutoff: int = 512,
                     train_on_inputs: bool = False, pad_multiple: int = 8) -> list[TokenizedExamples]:
  """Tokenized (prompt, response) pairs per client. T = the longest example over all clients rounded up
  to `pad_multiple` (and at most `cutoff`), R = the most targets of any example likewise (at most T-1);
  both the same for every client so batches stack."""
  encoded = [[encode_parts(tokenizer, *pair) for pair in pairs] for pairs in prompts]
  full = [sum(map(len, parts)) for client in encoded for parts in client]
  truncated = sum(n > cutoff for n in full)
  if truncated:
    logging.info("--cutoff_len=%d: %d of %d examples lost their oldest prompt tokens (longest: %d tokens)", cutoff,
                 truncated, len(full), max(full))
  per_client = [[truncate(*parts, cutoff) for parts in client] for client in encoded]
  round_up = lambda n: -(-n // pad_multiple) * pad_multiple
  longest = max((len(ids) for toks in per_client for ids, _ in toks), default=2)
  seq_len = min(cutoff, round_up(longest))
  loss_starts = [np.asarray([1 if train_on_inputs else max(p, 1) for _, p in toks], np.int64) for toks in per_client]
  most_targets = max((len(ids) - start for toks, starts in zip(per_client, loss_starts)
                      for (ids, _), start in zip(toks, starts)), default=1)
  num_targets = min(seq_len - 1, round_up(max(most_targets, 1)))
  out = []
  for toks, starts in zip(per_client, loss_starts):
    lengths = [len(ids) for ids, _ in toks]
    out.append(TokenizedExamples(
        tokens=np.asarray([i for ids, _ in toks for i in ids], np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]),
        loss_start=starts, seq_len=seq_len, pad_id=tokenizer.pad_id, num_targets=num_targets))
  return out


def generative_clients(prep: PreparedData, tokenizer: Tokenizer, *, max_chunks: int | None = None, seed: int = 0,
                       **kwargs) -> list[TokenizedExamples]:
  """Tokenized training prompts per client (`tokenize_clients` keyword arguments): a window each, or with
  `prep.prompt == "sequence"` the `sequence_chunk_starts` chunks."""
  if prep.prompt == "sequence":
    prompts = [prep.sequence_prompts(c, starts)
               for c, starts in enumerate(sequence_chunk_starts(prep, max_chunks=max_chunks, seed=seed))]
  else:
    prompts = [prep.prompts(prep.client_windows(c)) for c in range(prep.num_clients)]
  return tokenize_clients(prompts, tokenizer, **kwargs)


def sequence_chunk_starts(prep: PreparedData, *, max_chunks: int | None = None, seed: int = 0
                          ) -> list[list[tuple[int, int]]]:
  """Per client, the `(user, start)` of its users' `--prompt=sequence` training chunks
  (`examples.sequence_chunk` of `history_len` targets): every training position >= 1 is a target of
  exactly one chunk. `max_chunks` keeps a seeded sample over all clients."""
  h = prep.split.history_len
  chunks = [(u, start) for u, seq in enumerate(prep.split.train) for start in examples_lib.chunk_starts(len(seq), h)]
  total = len(chunks)
  if max_chunks is not None and max_chunks < total:
    chunks = [chunks[i] for i in np.sort(np.random.default_rng(seed).choice(total, max_chunks, replace=False))]
  per_client = [[] for _ in range(prep.num_clients)]
  for u, start in chunks:
    per_client[prep.clients[u]].append((u, start))
  logging.info("--prompt=sequence: %d of %d training chunks of up to %d targets, per client %s", len(chunks), total,
               h, [len(c) for c in per_client])
  return per_client


def heldout_windows(prep: PreparedData, part: str, max_users: int | None = None) -> list[examples_lib.Windows]:
  """Per client, its `part` ("valid"/"test") windows labelled with each user's first target;
  `max_users` keeps each client's first users only."""
  out = []
  for c in range(prep.num_clients):
    windows, targets = prep.eval_examples(c, part)
    windows = dataclasses.replace(windows, target=np.asarray([t[0] for t in targets], np.int32))
    out.append(windows.take(np.arange(len(windows))[:max_users]))
  return out


def heldout_clients(prep: PreparedData, tokenizer: Tokenizer, part: str, *, max_users: int | None = None,
                    **kwargs) -> list[TokenizedExamples]:
  """Per client, `heldout_windows` prompts answered with the first target's title: the held-out
  language-model loss."""
  return tokenize_clients([prep.prompts(w) for w in heldout_windows(prep, part, max_users)], tokenizer, **kwargs)


def item_sequence_clients(prep: PreparedData, seq_len: int) -> list[ItemSequences]:
  """Per client, `sequence_chunks` of its users' whole training sequences (`--disc_input=items`)."""
  return [sequence_chunks([prep.split.train[u] for u in prep.client_users(c)], seq_len)
          for c in range(prep.num_clients)]


def heldout_item_clients(prep: PreparedData, part: str, max_users: int | None = None) -> list[ItemSequences]:
  """Per client, `heldout_windows` as item rows whose last column predicts the user's first target."""
  return [ItemSequences(w.history, w.history_mask, w.target) for w in heldout_windows(prep, part, max_users)]


def steps_per_epoch(clients: Sequence[ClientExamples], batch_size: int) -> np.ndarray:
  """[C] int: ceil(n_c / batch_size), the steps in which client c has real examples."""
  return np.asarray([-(-len(ex) // batch_size) for ex in clients], np.int64)


def _shuffle_seed(seed: int, epoch: int, client: int) -> int:
  return int(np.random.SeedSequence([seed, epoch, client]).generate_state(1)[0])


def client_batches(ex: ClientExamples, *, batch_size: int, seed: int, epoch: int, client: int) -> grain.MapDataset:
  """grain MapDataset of client `client`'s batches in epoch `epoch` (element s = step s, dict of [B, ...])."""
  return (grain.MapDataset.range(len(ex)).shuffle(seed=_shuffle_seed(seed, epoch, client))
          .batch(batch_size, drop_remainder=False).map(lambda idx: ex.gather(idx, batch_size)))


def _stack(per_client: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {k: np.stack([b[k] for b in per_client]) for k in per_client[0]}


def _epoch(clients: Sequence[ClientExamples], batch_size: int, seed: int, epoch: int, start: int) -> Iterator[dict]:
  steps = steps_per_epoch(clients, batch_size)
  datasets = [client_batches(ex, batch_size=batch_size, seed=seed, epoch=epoch, client=c) if len(ex) else None
              for c, ex in enumerate(clients)]
  empty = np.zeros(0, np.int64)
  for s in range(start, int(steps.max())):
    yield _stack([ds[s] if s < steps[c] else ex.gather(empty, batch_size)
                  for c, (ex, ds) in enumerate(zip(clients, datasets))])


def epoch_batches(clients: Sequence[ClientExamples], *, batch_size: int, seed: int, epoch: int,
                  start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Yields the stacked [C, B, ...] batches of one lockstep epoch, steps start_step..S-1."""
  return _epoch(clients, batch_size, seed, epoch, start_step)


def batch_at(clients: Sequence[ClientExamples], *, batch_size: int, seed: int, epoch: int, step: int) -> dict[str, np.ndarray]:
  """The stacked batch of (epoch, step); random access, equal to what the iterators yield there."""
  return next(_epoch(clients, batch_size, seed, epoch, step))


def iterate(clients: Sequence[ClientExamples], *, batch_size: int, state: dict[str, int]
            ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
  """Endless lockstep batches from `state` = {"seed", "epoch", "step"}; yields (batch, next_state),
  where next_state resumes right after that batch (save it with the model checkpoint).
  Start a run with {"seed": seed, "epoch": 0, "step": 0}."""
  if steps_per_epoch(clients, batch_size).max(initial=0) == 0:
    raise DataError("no client has any training example")
  seed, epoch, step = state["seed"], state["epoch"], state["step"]
  while True:
    n = int(steps_per_epoch(clients, batch_size).max())
    for s, batch in enumerate(_epoch(clients, batch_size, seed, epoch, step), start=step):
      nxt = {"seed": seed, "epoch": epoch, "step": s + 1} if s + 1 < n else {"seed": seed, "epoch": epoch + 1, "step": 0}
      yield batch, nxt
    epoch, step = epoch + 1, 0

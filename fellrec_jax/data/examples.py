"""Training windows and BIGRec prompts.

A window is (user, history, target): the target is an item of the user's training sequence and the
history is up to `history_len` items before it (at least one). Generative training renders a window
as a BIGRec Alpaca-style prompt (or `--prompt=compact`: its input only); discriminative training uses
the ids. `--prompt=sequence` renders the history as one quoted title per line and the target as the
next line, so one training chunk carries many targets (`sequence_chunk`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
# The input and the response marker only: ~20 tokens instead of ~80 of every SmolLM2 training example (the
# preamble and instruction are the same for every example), for CPU budgets.
COMPACT_TEMPLATE = "### Input:\n{input}\n\n### Response:\n"
TEMPLATES = {"alpaca": ALPACA_TEMPLATE, "compact": COMPACT_TEMPLATE}
SEQUENCE_HEADER = "The user has interacted with the following {nouns}, oldest first, one per line:\n"
PROMPTS = (*TEMPLATES, "sequence")


@dataclasses.dataclass(frozen=True)
class Windows:
  """M training windows.

  Attributes:
    user: [M] int32 dense user id.
    history: [M, H] int32 item ids, LEFT-padded with 0 so the most recent item is at H-1.
    history_mask: [M, H] int32, 1 on real history items.
    target: [M] int32 item id.
    text: [M] verbatim {instruction, input, output} records (BIGRec JSON import), or None to render
      prompts from titles.
  """

  user: np.ndarray
  history: np.ndarray
  history_mask: np.ndarray
  target: np.ndarray
  text: tuple[dict, ...] | None = None

  def __len__(self) -> int:
    return int(self.user.shape[0])

  def take(self, idx: np.ndarray) -> Windows:
    return Windows(self.user[idx], self.history[idx], self.history_mask[idx], self.target[idx],
                   None if self.text is None else tuple(self.text[i] for i in idx))


def pad_histories(histories: Sequence[np.ndarray], history_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads id lists (keeping the last `history_len`) -> (history [M, H], mask [M, H]) int32."""
  hist = np.zeros((len(histories), history_len), np.int32)
  mask = np.zeros((len(histories), history_len), np.int32)
  for m, h in enumerate(histories):
    h = np.asarray(h)[-history_len:] if history_len else np.zeros(0, np.int32)
    if len(h):
      hist[m, -len(h):] = h
      mask[m, -len(h):] = 1
  return hist, mask


def training_windows(train: Sequence[np.ndarray], history_len: int) -> Windows:
  """Windows at every position p >= 1 of each user's training sequence (history = items
  [p-history_len, p)), in (user, position) order."""
  users, hists, targets = [], [], []
  for u, seq in enumerate(train):
    for p in range(1, len(seq)):
      users.append(u)
      hists.append(seq[max(0, p - history_len):p])
      targets.append(seq[p])
  hist, mask = pad_histories(hists, history_len)
  return Windows(np.asarray(users, np.int32), hist, mask, np.asarray(targets, np.int32))


def _plural(noun: str) -> str:
  return noun if noun.endswith("s") else noun + "s"


def quoted(title: str) -> str:
  """A title as BIGRec writes it in prompts and responses."""
  return f'"{title}"'


def title_line(title: str) -> str:
  """`--prompt=sequence`'s unit: a quoted title and a newline, both in the history and as the response."""
  return quoted(title) + "\n"


def sequence_prompt(history_titles: Sequence[str], target_titles: Sequence[str], noun: str = "item"
                    ) -> tuple[str, str]:
  """(prompt, response) of `--prompt=sequence`: a header, the history one title line each, oldest first;
  the response is the next titles' lines (one for a window, many for a training chunk, none to evaluate)."""
  return (SEQUENCE_HEADER.format(nouns=_plural(noun)) + "".join(map(title_line, history_titles)),
          "".join(map(title_line, target_titles)))


def sequence_chunk(seq: np.ndarray, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """`(context, targets)` item ids of the training chunk of `seq` whose targets are `seq[start:start +
  length]` (start >= 1): the context is the `length` items before them (fewer at the sequence's start),
  so each target is predicted from between `length` and `2 * length - 1` items, as a window's history."""
  return seq[max(0, start - length):start], seq[start:start + length]


def chunk_starts(n: int, length: int) -> range:
  """Starts of the chunks that make each position >= 1 of an n-item sequence a target exactly once."""
  return range(1, n, length)


def bigrec_prompt(history_titles: Sequence[str], target_title: str | None, noun: str = "item") -> dict:
  """BIGRec instruction record: {"instruction", "input", "output"} ("output" is "" without target).
  Titles are double-quoted and comma-separated, oldest first; the output is the quoted title."""
  nouns = _plural(noun)
  return {
      "instruction": f"Given a list of {nouns} the user has interacted with before, please recommend a "
                     f"new {noun} that the user likes to the user.",
      "input": f"The user has interacted with the following {nouns} before: "
               + ", ".join(map(quoted, history_titles)),
      "output": "" if target_title is None else quoted(target_title),
  }


def prompt_text(record: dict, template: str = ALPACA_TEMPLATE) -> tuple[str, str]:
  """(prompt, response) strings of an instruction record, by default in the Alpaca template as BIGRec."""
  return template.format(instruction=record["instruction"], input=record["input"]), record["output"]


def window_records(w: Windows, titles: Sequence[str], noun: str) -> list[dict]:
  """Instruction records of each window (verbatim ones when the windows carry text); a target < 0
  (evaluation) gives an empty output."""
  if w.text is not None:
    return list(w.text)
  return [bigrec_prompt([titles[i] for i in h[m > 0]], titles[t] if t >= 0 else None, noun)
          for h, m, t in zip(w.history, w.history_mask, w.target)]

"""Text -> token ids, the one home of the rules: a training example is `[bos] + prompt + response + [eos]`
(`tokenize`), a text to embed or continue `[bos] + text` (`text_rows`), and past a length limit the oldest
prompt tokens go first (`truncate`), since a history's most recent titles and the response marker sit at the
end. Training, evaluation and the inversion attack all tokenize through here.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
  bos_id: int | None
  eos_id: int | None
  pad_id: int

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""


def tokenize(tokenizer: Tokenizer, prompt: str, response: str, *, cutoff: int = 512) -> tuple[list[int], int]:
  """[bos] + encode(prompt) + encode(response) + [eos], at most `cutoff` tokens; returns (ids, P) with P
  the number of prompt tokens (bos included). A None bos/eos id is left out.

  Over-long examples keep the whole response and bos, and drop the oldest prompt tokens (the front
  of the template), because the history's most recent titles and the "### Response:" marker sit at the
  end of the prompt. A response longer than the cutoff alone is cut at its end.
  """
  return truncate(*encode_parts(tokenizer, prompt, response), cutoff)


def encode_parts(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int], list[int]]:
  """The untruncated `([bos], encode(prompt), encode(response) + [eos])`."""
  head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  tail = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  return head, tokenizer.encode(prompt), tokenizer.encode(response) + tail


def truncate(head: list[int], body: list[int], resp: list[int], cutoff: int) -> tuple[list[int], int]:
  """`head + body + resp` cut to `cutoff` tokens as `tokenize` cuts: the whole head and response (the
  response cut at its end only if it alone is too long), the body's oldest tokens dropped. Returns `(ids,
  len(head) + kept body tokens)`. The one cutoff rule: training, evaluation prompts and the attack use it."""
  resp = resp[:cutoff - len(head)]
  room = cutoff - len(head) - len(resp)
  body = body[len(body) - room:] if 0 < room < len(body) else (body if room > 0 else [])
  return head + body + resp, len(head) + len(body)


def text_rows(config, tokenizer, texts: Sequence[str], max_len: int
              ) -> list[list[int]]:
  """Token ids per text to embed or continue, the oldest tokens dropped beyond `max_len` (`truncate`):
  decoders (`config.is_decoder`) `[bos] + encode(text)`; encoders the tokenizer's own `[CLS] ... [SEP]`."""
  if config.is_decoder:
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [truncate(head, ids, [], max_len)[0] for ids in map(tokenizer.encode, texts)]
  backend = tokenizer.backend
  rows = []
  for text in texts:
    enc = backend.encode(text, add_special_tokens=False)
    enc.truncate(max_len - backend.num_special_tokens_to_add(False), direction="left")
    rows.append(backend.post_process(enc).ids)
  return rows

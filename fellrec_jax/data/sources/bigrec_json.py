"""BIGRec/FELLRec instruction JSON: the records kept verbatim, the catalogue from their quoted titles."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fellrec_jax.data.sources.dataset import DataError, Dataset
from fellrec_jax.data.sources.lines import require_file

_QUOTED = re.compile(r'"(.*?)"(?=\s*(?:,|$))', re.S)


def parse_titles(text: str) -> list[str]:
  """Titles quoted in a BIGRec input/output string: '... before: "A", "B"' -> ["A", "B"]."""
  _, sep, tail = text.rpartition(": ")
  return _QUOTED.findall((tail if sep else text).strip())


def read_bigrec_json(path: str | Path) -> Dataset:
  """Reads BIGRec/FELLRec instruction files: a directory with train.json (required), valid.json and
  test.json (optional), or one .json file (taken as train). Each is a JSON list of
  {instruction, input, output, user}. The records are kept verbatim in `examples`; the item catalogue
  is every quoted title, and each user's interactions are the titles of their records in file order
  (train, valid, test; history then output), with the order index as timestamp (duplicates are
  removed later). The split itself comes from the records' parts, see `prepare`."""
  p = Path(path)
  files = {"train": p} if p.is_file() else {part: p / f"{part}.json" for part in ("train", "valid", "test")}
  require_file(files["train"], "BIGRec training instructions")
  records = []
  for part, f in files.items():
    if not f.exists():
      continue
    try:
      data = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
      raise DataError(f"{f}: not valid utf-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
      raise DataError(f"{f}, line {e.lineno}: malformed JSON ({e.msg})") from e
    if not isinstance(data, list):
      raise DataError(f"{f}: expected a JSON list of instruction records")
    for n, rec in enumerate(data):
      missing = [k for k in ("instruction", "input", "output", "user") if not isinstance(rec, dict) or k not in rec]
      if missing:
        raise DataError(f"{f}, record {n}: missing fields {missing}")
      not_text = [k for k in ("instruction", "input", "output") if not isinstance(rec[k], str)]
      if not_text:
        raise DataError(f"{f}, record {n}: fields {not_text} must be strings, got "
                        f"{[type(rec[k]).__name__ for k in not_text]}")
      if not parse_titles(rec["output"]):
        raise DataError(f"{f}, record {n}: output has no quoted title: {rec['output']!r}")
      records.append({**{k: rec[k] for k in ("instruction", "input", "output")},
                      "user": str(rec["user"]), "part": part})

  titles: dict[str, int] = {}
  users: dict[str, int] = {}
  for rec in records:
    users.setdefault(rec["user"], len(users))
    for t in parse_titles(rec["input"]) + parse_titles(rec["output"]):
      titles.setdefault(t, len(titles))
  rows = [(users[r["user"]], titles[t]) for r in records
          for t in parse_titles(r["input"]) + parse_titles(r["output"])]
  u, i = zip(*rows) if rows else ((), ())
  return Dataset(
      name="bigrec_json",
      item_noun="item",
      titles=tuple(titles),
      categories=None,
      user_keys=tuple(users),
      item_keys=tuple(titles),
      user=np.asarray(u, np.int32),
      item=np.asarray(i, np.int32),
      timestamp=np.arange(len(rows), dtype=np.int64),
      examples=tuple(records),
  )

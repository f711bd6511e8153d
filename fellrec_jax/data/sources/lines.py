"""What every reader shares: lines read with exact 1-based numbers, bad lines raised or counted
(`skip_bad_lines`), and the interactions gathered against an item catalogue into a `Dataset`."""

from __future__ import annotations

import csv
import gzip
import math
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import logging

from fellrec_jax.data.sources.dataset import DataError, Dataset

class LineErrors:
  """Raises or counts bad lines of one file."""

  def __init__(self, path: Path, skip: bool):
    self.path, self.skip, self.skipped = path, skip, 0

  def bad(self, lineno: int, msg: str) -> None:
    if not self.skip:
      raise DataError(f"{self.path}, line {lineno}: {msg} (pass skip_bad_lines=True to skip such lines)")
    self.skipped += 1

  def fatal(self, lineno: int, msg: str) -> DataError:
    return DataError(f"{self.path}, line {lineno}: {msg}")

  def log(self) -> None:
    if self.skipped:
      logging.warning("%s: skipped %d bad lines", self.path, self.skipped)


def require_file(path: Path, what: str) -> Path:
  if not path.is_file():
    raise DataError(f"missing file: {path} ({what})")
  return path


def numbered_lines(path: Path, encoding: str, errs: LineErrors) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, text) of non-blank lines. Decodes line by line (not through a
  text stream) so a bad byte is reported on its own line."""
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode(encoding)
        except UnicodeDecodeError as e:
          errs.bad(lineno, f"not valid {encoding} text ({e.reason} at byte {e.start})")
          continue
        line = line.rstrip("\r\n")
        if line.strip():
          yield lineno, line
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
    raise DataError(f"{path}: cannot read ({e})") from e


def csv_rows(path: Path, encoding: str, errs: LineErrors, required: tuple[str, ...]):
  """Yields (lineno, {column: value}) of a headered CSV, checking the header has `required`."""
  lines = numbered_lines(path, encoding, errs)
  first = next(lines, None)
  if first is None:
    raise DataError(f"{path}: empty file")
  header = next(csv.reader([first[1]]))
  missing = [c for c in required if c not in header]
  if missing:
    raise errs.fatal(first[0], f"wrong columns: need {list(required)}, got {header}")
  idx = [header.index(c) for c in required]
  for lineno, line in lines:
    row = next(csv.reader([line]))
    if len(row) != len(header):
      errs.bad(lineno, f"expected {len(header)} fields, got {len(row)}")
      continue
    yield lineno, {c: row[i] for c, i in zip(required, idx)}


def split_rows(path: Path, encoding: str, errs: LineErrors, sep: str, min_fields: int):
  for lineno, line in numbered_lines(path, encoding, errs):
    row = line.split(sep)
    if len(row) < min_fields:
      errs.bad(lineno, f"expected at least {min_fields} {sep!r}-separated fields, got {len(row)}")
      continue
    yield lineno, row


def finite_number(value: str | float | None) -> float | None:
  """`value` as a finite float, or None (not a number, nan or inf)."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


class InteractionBuilder:
  """Accumulates interactions against a catalogue {item key: (title, category)}."""

  def __init__(self, catalogue: dict[str, tuple[str, str | None]]):
    self.catalogue = catalogue
    self.users: dict[str, int] = {}
    self.rows: list[tuple[int, str, int, float]] = []

  def add(self, errs: LineErrors, lineno: int, user: str, item: str, ts: str, rating: str | float | None) -> None:
    t, r = finite_number(ts), finite_number(rating)
    if t is None or r is None or abs(t) >= 2.0 ** 62:  # seconds; 2**62 leaves int64 room for differences
      errs.bad(lineno, f"timestamp/rating must be finite numbers (a timestamp below 2**62), got {ts!r}/{rating!r}")
      return
    if item not in self.catalogue:
      errs.bad(lineno, f"item {item!r} has no title in the item metadata")
      return
    self.rows.append((self.users.setdefault(user, len(self.users)), item, int(t), r))

  def build(self, name: str, noun: str, has_rating: bool = True, where: str = "") -> Dataset:
    if not self.rows:
      raise DataError(f"{where}: no interactions read")
    used = {item for _, item, _, _ in self.rows}
    # Items keep catalogue order, restricted to those interacted with.
    keys = [k for k in self.catalogue if k in used]
    dense = {k: i for i, k in enumerate(keys)}
    cats = [self.catalogue[k][1] for k in keys]
    u, it, t, r = zip(*self.rows)
    return Dataset(
        name=name,
        item_noun=noun,
        titles=tuple(self.catalogue[k][0] for k in keys),
        categories=None if all(c is None for c in cats) else tuple(c or "unknown" for c in cats),
        user_keys=tuple(self.users),
        item_keys=tuple(keys),
        user=np.asarray(u, np.int32),
        item=np.asarray([dense[k] for k in it], np.int32),
        timestamp=np.asarray(t, np.int64),
        rating=np.asarray(r, np.float32) if has_rating else None,
    )

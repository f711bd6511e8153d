"""Raw recommendation datasets -> one `Dataset` type.

Readers: MovieLens (three file layouts), Amazon reviews (2018 and 2023 formats), the BIGRec/FELLRec
instruction JSON, and a synthetic generator (the built-in default, needs no files).

Every reader reads the item catalogue first and then the interactions line by line, so a bad line is
reported with its file and 1-based line number. `skip_bad_lines=True` turns such errors into counted,
logged skips; a missing file or a wrong header is always an error.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from absl import logging


class DataError(ValueError):
  """Bad or missing input data; the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Interactions with dense ids; arrays are aligned, one entry per interaction.

  Attributes:
    name: dataset name, e.g. "movielens".
    item_noun: singular noun for prompts ("movie", "item").
    titles: [I] item titles indexed by dense item id.
    categories: [I] item categories, or None when the source has none.
    user_keys: [U] original user ids (strings) indexed by dense user id.
    item_keys: [I] original item ids (strings).
    user, item: [N] int32 dense ids.
    timestamp: [N] int64 (seconds, or an order index where the source has no time).
    rating: [N] float32, or None.
    examples: ready instruction records (bigrec_json only): dicts with instruction, input, output,
      user (a user key) and part ("train" / "valid" / "test"); None otherwise.
  """

  name: str
  item_noun: str
  titles: tuple[str, ...]
  categories: tuple[str, ...] | None
  user_keys: tuple[str, ...]
  item_keys: tuple[str, ...]
  user: np.ndarray
  item: np.ndarray
  timestamp: np.ndarray
  rating: np.ndarray | None = None
  examples: tuple[dict, ...] | None = None

  @property
  def num_users(self) -> int:
    return len(self.user_keys)

  @property
  def num_items(self) -> int:
    return len(self.titles)

  @property
  def num_interactions(self) -> int:
    return int(self.user.shape[0])

  def select(self, keep: np.ndarray) -> Dataset:
    """Keeps interactions where `keep` [N] bool is set; users/items left without any are dropped
    and the remaining ids re-densified in their old order."""
    users, items = self.user[keep], self.item[keep]
    u_old = np.unique(users)
    i_old = np.unique(items)
    return dataclasses.replace(
        self,
        titles=tuple(self.titles[i] for i in i_old),
        categories=None if self.categories is None else tuple(self.categories[i] for i in i_old),
        user_keys=tuple(self.user_keys[u] for u in u_old),
        item_keys=tuple(self.item_keys[i] for i in i_old),
        user=np.searchsorted(u_old, users).astype(np.int32),
        item=np.searchsorted(i_old, items).astype(np.int32),
        timestamp=self.timestamp[keep],
        rating=None if self.rating is None else self.rating[keep],
    )


# ----------------------------------------------------------------------------------------------
# Line reading with exact line numbers.


class _Errors:
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


def _require(path: Path, what: str) -> Path:
  if not path.is_file():
    raise DataError(f"missing file: {path} ({what})")
  return path


def _lines(path: Path, encoding: str, errs: _Errors) -> Iterator[tuple[int, str]]:
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


def _csv_rows(path: Path, encoding: str, errs: _Errors, required: tuple[str, ...]):
  """Yields (lineno, {column: value}) of a headered CSV, checking the header has `required`."""
  lines = _lines(path, encoding, errs)
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


def _split_rows(path: Path, encoding: str, errs: _Errors, sep: str, min_fields: int):
  for lineno, line in _lines(path, encoding, errs):
    row = line.split(sep)
    if len(row) < min_fields:
      errs.bad(lineno, f"expected at least {min_fields} {sep!r}-separated fields, got {len(row)}")
      continue
    yield lineno, row


def _finite(value: str | float | None) -> float | None:
  """`value` as a finite float, or None (not a number, nan or inf)."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


class _Builder:
  """Accumulates interactions against a catalogue {item key: (title, category)}."""

  def __init__(self, catalogue: dict[str, tuple[str, str | None]]):
    self.catalogue = catalogue
    self.users: dict[str, int] = {}
    self.rows: list[tuple[int, str, int, float]] = []

  def add(self, errs: _Errors, lineno: int, user: str, item: str, ts: str, rating: str | float | None) -> None:
    t, r = _finite(ts), _finite(rating)
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


# ----------------------------------------------------------------------------------------------
# MovieLens.

_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                  "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                  "Romance", "Sci-Fi", "Thriller", "War", "Western")


def read_movielens(data_dir: str | Path, *, skip_bad_lines: bool = False) -> Dataset:
  """Reads ml-latest*/ml-25m (`ratings.csv`+`movies.csv`), ml-100k (`u.data`+`u.item`, latin-1) or
  ml-1m/10m (`ratings.dat`+`movies.dat`, `::`-separated, latin-1); the layout is detected from the
  files present. Category = the first listed genre."""
  d = Path(data_dir)
  if not d.is_dir():
    raise DataError(f"missing data directory: {d}")
  catalogue: dict[str, tuple[str, str | None]] = {}
  b = _Builder(catalogue)
  if (d / "ratings.csv").exists():
    errs = _Errors(_require(d / "movies.csv", "MovieLens movie titles"), skip_bad_lines)
    for _, row in _csv_rows(errs.path, "utf-8", errs, ("movieId", "title", "genres")):
      catalogue[row["movieId"]] = (row["title"], row["genres"].split("|")[0])
    errs.log()
    errs = _Errors(d / "ratings.csv", skip_bad_lines)
    for lineno, row in _csv_rows(errs.path, "utf-8", errs, ("userId", "movieId", "rating", "timestamp")):
      b.add(errs, lineno, row["userId"], row["movieId"], row["timestamp"], row["rating"])
  elif (d / "u.data").exists():
    errs = _Errors(_require(d / "u.item", "ml-100k movie titles"), skip_bad_lines)
    for lineno, row in _split_rows(errs.path, "latin-1", errs, "|", 5 + len(_ML100K_GENRES)):
      flags = row[5:5 + len(_ML100K_GENRES)]
      genre = next((g for g, f in zip(_ML100K_GENRES, flags) if f == "1"), "unknown")
      catalogue[row[0]] = (row[1], genre)
    errs.log()
    errs = _Errors(d / "u.data", skip_bad_lines)
    for lineno, row in _split_rows(errs.path, "latin-1", errs, "\t", 4):
      b.add(errs, lineno, row[0], row[1], row[3], row[2])
  elif (d / "ratings.dat").exists():
    errs = _Errors(_require(d / "movies.dat", "MovieLens movie titles"), skip_bad_lines)
    for lineno, row in _split_rows(errs.path, "latin-1", errs, "::", 3):
      catalogue[row[0]] = (row[1], row[2].split("|")[0])
    errs.log()
    errs = _Errors(d / "ratings.dat", skip_bad_lines)
    for lineno, row in _split_rows(errs.path, "latin-1", errs, "::", 4):
      b.add(errs, lineno, row[0], row[1], row[3], row[2])
  else:
    raise DataError(f"{d}: no MovieLens ratings file (expected ratings.csv, u.data or ratings.dat)")
  errs.log()
  return b.build("movielens", "movie", where=str(errs.path))


# ----------------------------------------------------------------------------------------------
# Amazon reviews.


def _json_lines(path: Path, errs: _Errors) -> Iterator[tuple[int, dict]]:
  for lineno, line in _lines(path, "utf-8", errs):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      errs.bad(lineno, f"malformed JSON ({e.msg})")
      continue
    if not isinstance(rec, dict):
      errs.bad(lineno, "expected a JSON object")
      continue
    yield lineno, rec


def _amazon_files(d: Path) -> tuple[Path, Path]:
  found = [p for p in sorted(d.iterdir()) if re.search(r"\.jsonl?(\.gz)?$", p.name)]
  meta = [p for p in found if p.name.startswith("meta_")]
  reviews = [p for p in found if not p.name.startswith("meta_")]
  if len(reviews) != 1 or len(meta) != 1:
    raise DataError(f"{d}: expected one reviews file and one meta_* file (.json/.jsonl[.gz]), "
                    f"found reviews={[p.name for p in reviews]} meta={[p.name for p in meta]}")
  return reviews[0], meta[0]


def read_amazon(data_dir: str | Path, *, item_noun: str = "item", skip_bad_lines: bool = False) -> Dataset:
  """Reads Amazon reviews: the 2018 format (reviewerID, asin, unixReviewTime, overall; meta with
  asin, title, main_cat/category) or the 2023 format (user_id, parent_asin, timestamp in ms, rating;
  meta with parent_asin, title, main_category). The format is detected from the first review.
  Items whose meta has no title count as missing a title."""
  d = Path(data_dir)
  if not d.is_dir():
    raise DataError(f"missing data directory: {d}")
  reviews_path, meta_path = _amazon_files(d)
  errs = _Errors(reviews_path, skip_bad_lines)
  reviews = _json_lines(reviews_path, errs)
  first = next(reviews, None)
  if first is None:
    raise DataError(f"{reviews_path}: no reviews")
  if "reviewerID" in first[1]:
    fields, item_key, ms = ("reviewerID", "asin", "unixReviewTime", "overall"), "asin", False
  elif "user_id" in first[1]:
    fields, item_key, ms = ("user_id", "parent_asin", "timestamp", "rating"), "parent_asin", True
  else:
    raise errs.fatal(first[0], "wrong fields: need reviewerID/asin/unixReviewTime/overall (2018) or "
                     f"user_id/parent_asin/timestamp/rating (2023), got {sorted(first[1])}")

  catalogue: dict[str, tuple[str, str | None]] = {}
  merrs = _Errors(meta_path, skip_bad_lines)
  for lineno, rec in _json_lines(meta_path, merrs):
    title = rec.get("title")
    if item_key not in rec:
      merrs.bad(lineno, f"meta record has no {item_key!r}")
    elif isinstance(title, str) and title.strip():
      cat = rec.get("main_category") or rec.get("main_cat") or (rec.get("category") or [None])[0]
      catalogue[str(rec[item_key])] = (title.strip(), cat if isinstance(cat, str) else None)
  merrs.log()

  b = _Builder(catalogue)
  for lineno, rec in [first, *reviews]:
    if any(f not in rec for f in fields):
      errs.bad(lineno, f"missing one of the fields {list(fields)}")
      continue
    ts = rec[fields[2]] // 1000 if ms and isinstance(rec[fields[2]], int) else rec[fields[2]]
    b.add(errs, lineno, str(rec[fields[0]]), str(rec[fields[1]]), str(ts), rec[fields[3]])
  errs.log()
  return b.build("amazon", item_noun, where=str(reviews_path))


# ----------------------------------------------------------------------------------------------
# BIGRec instruction JSON.

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
  _require(files["train"], "BIGRec training instructions")
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


# ----------------------------------------------------------------------------------------------
# Synthetic (built-in default).

_ADJECTIVES = ("Silent", "Crimson", "Hidden", "Golden", "Broken", "Distant", "Frozen", "Wild", "Lost",
               "Electric", "Velvet", "Iron", "Paper", "Midnight", "Hollow", "Bright", "Secret", "Last")
_NOUNS = ("Harbor", "Garden", "Mirror", "Signal", "Orchard", "Tower", "River", "Engine", "Lantern",
          "Forest", "Compass", "Island", "Letter", "Canyon", "Station", "Voyage", "Crown", "Machine")
_GENRES = ("Mystery", "Comedy", "Sci-Fi", "Drama", "Horror", "Romance", "Western", "Fantasy")


def synthetic(*, num_users: int = 200, num_items: int = 120, num_groups: int = 5,
              num_categories: int = 6, interactions_per_user: int = 20, follow_prob: float = 0.7,
              seed: int = 0) -> Dataset:
  """A small learnable dataset with group structure, deterministic for `seed`.

  Items get titles "<Adjective> <Noun> <Genre>" and their genre as category. Each user belongs to a
  latent taste group g; group g likes two genres and has its own random cyclic order over its liked
  items. A user's next item is, with probability `follow_prob`, the next unseen item along the
  group's cycle after the current one, else an unseen item drawn from the group's taste (80% liked
  genres). So the next item is predictable from the last one and the group, and groups differ.
  Each user's ~`interactions_per_user` timestamps are spread over the same year, so a global
  temporal split leaves every user with items in each period.
  """
  if num_items > len(_ADJECTIVES) * len(_NOUNS) or num_categories > len(_GENRES):
    raise ValueError("synthetic: too many items or categories for the title vocabulary")
  rng = np.random.default_rng(seed)
  pairs = rng.permutation(len(_ADJECTIVES) * len(_NOUNS))[:num_items]
  cat = rng.integers(num_categories, size=num_items)
  titles = tuple(f"{_ADJECTIVES[p // len(_NOUNS)]} {_NOUNS[p % len(_NOUNS)]} {_GENRES[c]}"
                 for p, c in zip(pairs, cat))

  taste, cycles = [], []
  for _ in range(num_groups):
    liked = np.isin(cat, rng.choice(num_categories, size=2, replace=False))
    w = np.where(liked, 0.8 / max(liked.sum(), 1), 0.2 / max((~liked).sum(), 1))
    taste.append(w / w.sum())
    cycles.append(rng.permutation(np.flatnonzero(liked)))

  users, items, times = [], [], []
  group = rng.integers(num_groups, size=num_users)
  t0, year = 1_600_000_000, 365 * 86_400
  for u in range(num_users):
    g = group[u]
    n = min(num_items, max(5, interactions_per_user + int(rng.integers(-5, 6))))
    cycle, pos = cycles[g], {int(it): k for k, it in enumerate(cycles[g])}
    seen: list[int] = []
    cur = int(rng.choice(num_items, p=taste[g]))
    while True:
      seen.append(cur)
      if len(seen) == n:
        break
      nxt = None
      if cur in pos and rng.random() < follow_prob:
        for step in range(1, len(cycle)):
          cand = int(cycle[(pos[cur] + step) % len(cycle)])
          if cand not in seen:
            nxt = cand
            break
      if nxt is None:
        p = taste[g].copy()
        p[seen] = 0.0
        nxt = int(rng.choice(num_items, p=p / p.sum()))
      cur = nxt
    users += [u] * n
    items += seen
    times += sorted((t0 + rng.integers(0, year, size=n)).tolist())
  return Dataset(
      name="synthetic",
      item_noun="item",
      titles=titles,
      categories=tuple(_GENRES[c] for c in cat),
      user_keys=tuple(f"u{u}" for u in range(num_users)),
      item_keys=tuple(f"i{i}" for i in range(num_items)),
      user=np.asarray(users, np.int32),
      item=np.asarray(items, np.int32),
      timestamp=np.asarray(times, np.int64),
  )

"""Amazon reviews, 2018 and 2023 formats: a reviews file and a meta_* file of JSON lines."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from fellrec_jax.data.sources.dataset import DataError, Dataset
from fellrec_jax.data.sources.lines import InteractionBuilder, LineErrors, numbered_lines

def _json_lines(path: Path, errs: LineErrors) -> Iterator[tuple[int, dict]]:
  for lineno, line in numbered_lines(path, "utf-8", errs):
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
  errs = LineErrors(reviews_path, skip_bad_lines)
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
  merrs = LineErrors(meta_path, skip_bad_lines)
  for lineno, rec in _json_lines(meta_path, merrs):
    title = rec.get("title")
    if item_key not in rec:
      merrs.bad(lineno, f"meta record has no {item_key!r}")
    elif isinstance(title, str) and title.strip():
      cat = rec.get("main_category") or rec.get("main_cat") or (rec.get("category") or [None])[0]
      catalogue[str(rec[item_key])] = (title.strip(), cat if isinstance(cat, str) else None)
  merrs.log()

  b = InteractionBuilder(catalogue)
  for lineno, rec in [first, *reviews]:
    if any(f not in rec for f in fields):
      errs.bad(lineno, f"missing one of the fields {list(fields)}")
      continue
    ts = rec[fields[2]] // 1000 if ms and isinstance(rec[fields[2]], int) else rec[fields[2]]
    b.add(errs, lineno, str(rec[fields[0]]), str(rec[fields[1]]), str(ts), rec[fields[3]])
  errs.log()
  return b.build("amazon", item_noun, where=str(reviews_path))

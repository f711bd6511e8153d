"""MovieLens in its three file layouts (ml-latest / ml-25m CSV, ml-100k, ml-1m / ml-10m)."""

from __future__ import annotations

from pathlib import Path

from fellrec_jax.data.sources.dataset import DataError, Dataset
from fellrec_jax.data.sources.lines import InteractionBuilder, LineErrors, csv_rows, require_file, split_rows

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
  b = InteractionBuilder(catalogue)
  if (d / "ratings.csv").exists():
    errs = LineErrors(require_file(d / "movies.csv", "MovieLens movie titles"), skip_bad_lines)
    for _, row in csv_rows(errs.path, "utf-8", errs, ("movieId", "title", "genres")):
      catalogue[row["movieId"]] = (row["title"], row["genres"].split("|")[0])
    errs.log()
    errs = LineErrors(d / "ratings.csv", skip_bad_lines)
    for lineno, row in csv_rows(errs.path, "utf-8", errs, ("userId", "movieId", "rating", "timestamp")):
      b.add(errs, lineno, row["userId"], row["movieId"], row["timestamp"], row["rating"])
  elif (d / "u.data").exists():
    errs = LineErrors(require_file(d / "u.item", "ml-100k movie titles"), skip_bad_lines)
    for lineno, row in split_rows(errs.path, "latin-1", errs, "|", 5 + len(_ML100K_GENRES)):
      flags = row[5:5 + len(_ML100K_GENRES)]
      genre = next((g for g, f in zip(_ML100K_GENRES, flags) if f == "1"), "unknown")
      catalogue[row[0]] = (row[1], genre)
    errs.log()
    errs = LineErrors(d / "u.data", skip_bad_lines)
    for lineno, row in split_rows(errs.path, "latin-1", errs, "\t", 4):
      b.add(errs, lineno, row[0], row[1], row[3], row[2])
  elif (d / "ratings.dat").exists():
    errs = LineErrors(require_file(d / "movies.dat", "MovieLens movie titles"), skip_bad_lines)
    for lineno, row in split_rows(errs.path, "latin-1", errs, "::", 3):
      catalogue[row[0]] = (row[1], row[2].split("|")[0])
    errs.log()
    errs = LineErrors(d / "ratings.dat", skip_bad_lines)
    for lineno, row in split_rows(errs.path, "latin-1", errs, "::", 4):
      b.add(errs, lineno, row[0], row[1], row[3], row[2])
  else:
    raise DataError(f"{d}: no MovieLens ratings file (expected ratings.csv, u.data or ratings.dat)")
  errs.log()
  return b.build("movielens", "movie", where=str(errs.path))

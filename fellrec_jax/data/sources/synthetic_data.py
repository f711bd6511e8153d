"""The built-in default dataset: synthetic users with a learnable taste-group structure, no files needed."""

from __future__ import annotations

import numpy as np

from fellrec_jax.data.sources.dataset import Dataset

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

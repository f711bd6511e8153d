"""The one type every reader returns (`Dataset`: interactions with dense ids) and the error of bad input."""

from __future__ import annotations

import dataclasses

import numpy as np

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

"""One call from a dataset name to split, client assignment and training windows, plus stats."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import logging

from fellrec_jax.data import examples as examples_lib
from fellrec_jax.data import partition as partition_lib
from fellrec_jax.data import preprocess as preprocess_lib
from fellrec_jax.data import sources
from fellrec_jax.data.sources import DataError, Dataset

DATASETS = ("synthetic", "movielens", "amazon", "bigrec_json")
PARTITIONS = ("kmeans", "random", "dirichlet", "mapping")
# The global temporal split suits Amazon-like data but leaves MovieLens with few test users
# (ml-latest-small: 29 of 610), so MovieLens defaults to leave-one-out.
DEFAULT_SPLIT = {"synthetic": "temporal", "movielens": "loo", "amazon": "temporal", "bigrec_json": "given"}


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """Everything downstream needs; user/item ids are the dense ids of `dataset`.

  Attributes:
    dataset: the filtered Dataset (titles [I], interactions).
    split: per-user train sequences and valid/test histories + targets.
    clients: [U] int32 client of each user.
    num_clients: C.
    train: all training windows (after the sample cap), across clients.
    prompt: how their prompts are rendered (`examples.PROMPTS`): a template of `examples.TEMPLATES`, or
      "sequence" (`examples.sequence_prompt`).
  """

  dataset: Dataset
  split: preprocess_lib.Split
  clients: np.ndarray
  num_clients: int
  train: examples_lib.Windows
  prompt: str = "alpaca"

  def prompts(self, windows: examples_lib.Windows) -> list[tuple[str, str]]:
    """(prompt, response) of each window in this data's format (an empty response for eval windows)."""
    noun = self.dataset.item_noun
    if self.prompt != "sequence":
      return [examples_lib.prompt_text(r, examples_lib.TEMPLATES[self.prompt])
              for r in examples_lib.window_records(windows, self.titles, noun)]
    if windows.text is not None:
      raise sources.DataError("--prompt=sequence renders titles of item ids, but these windows are verbatim prompt "
                      "records (bigrec_json): use --prompt=alpaca or compact")
    return [examples_lib.sequence_prompt([self.titles[i] for i in h[m > 0]], [self.titles[t]] if t >= 0 else [], noun)
            for h, m, t in zip(windows.history, windows.history_mask, windows.target)]

  def sequence_prompts(self, c: int, starts: Sequence[tuple[int, int]]) -> list[tuple[str, str]]:
    """`--prompt=sequence` training chunks `(user, start)` of client c's users (`examples.sequence_chunk`
    of `history_len` targets) as (prompt, response)."""
    out = []
    for u, start in starts:
      context, targets = examples_lib.sequence_chunk(self.split.train[u], start, self.split.history_len)
      out.append(examples_lib.sequence_prompt([self.titles[i] for i in context], [self.titles[i] for i in targets],
                                              self.dataset.item_noun))
    return out

  @property
  def titles(self) -> tuple[str, ...]:
    return self.dataset.titles

  def client_users(self, c: int) -> np.ndarray:
    """[U_c] dense ids of client c's users."""
    return np.flatnonzero(self.clients == c)

  def client_windows(self, c: int) -> examples_lib.Windows:
    return self.train.take(np.flatnonzero(self.clients[self.train.user] == c))

  def eval_examples(self, c: int, part: str) -> tuple[examples_lib.Windows, list[np.ndarray]]:
    """Client c's M users that have a `part` ("valid" / "test") target, as (windows with target -1,
    [M] int32 arrays of all their target items). `examples.window_records` renders their prompts
    with an empty output."""
    hist, targets = ((self.split.valid_history, self.split.valid_targets) if part == "valid"
                     else (self.split.test_history, self.split.test_targets))
    users = np.asarray([u for u in self.client_users(c) if len(targets[u])], np.int32)
    h, m = examples_lib.pad_histories([hist[u] for u in users], self.split.history_len)
    return examples_lib.Windows(users, h, m, np.full(len(users), -1, np.int32)), [targets[u] for u in users]


def _load(name: str, data_dir: str | Path | None, seed: int, skip_bad_lines: bool,
          synthetic_kwargs: dict[str, Any] | None) -> Dataset:
  if name == "synthetic":
    return sources.synthetic(seed=seed, **(synthetic_kwargs or {}))
  if data_dir is None:
    raise DataError(f"dataset {name!r} needs data_dir")
  if name == "movielens":
    return sources.read_movielens(data_dir, skip_bad_lines=skip_bad_lines)
  if name == "amazon":
    return sources.read_amazon(data_dir, skip_bad_lines=skip_bad_lines)
  if name == "bigrec_json":
    return sources.read_bigrec_json(data_dir)
  raise ValueError(f"unknown dataset {name!r} (expected one of {DATASETS})")


def _bigrec_split(ds: Dataset, history_len: int) -> tuple[preprocess_lib.Split, examples_lib.Windows]:
  """Split and windows straight from BIGRec records: train windows are the train records (ids parsed
  from the quoted titles, text kept verbatim); a user's valid/test history is their first record's
  input in that part, and the targets are the outputs of all their records in that part."""
  index = {t: i for i, t in enumerate(ds.titles)}
  users = {k: u for u, k in enumerate(ds.user_keys)}
  ids = lambda text: np.asarray([index[t] for t in sources.parse_titles(text)], np.int32)
  per = {p: [[] for _ in users] for p in ("train", "valid", "test")}
  for rec in ds.examples:
    per[rec["part"]][users[rec["user"]]].append(rec)
  e = np.zeros(0, np.int32)
  train, hist, targets = [], {"valid": [], "test": []}, {"valid": [], "test": []}
  for u in range(len(users)):
    seq = np.concatenate([e] + [np.concatenate([ids(r["input"]), ids(r["output"])]) for r in per["train"][u]])
    train.append(seq[np.sort(np.unique(seq, return_index=True)[1])])
    for p in ("valid", "test"):
      recs = per[p][u]
      hist[p].append(ids(recs[0]["input"])[-history_len:] if recs else e)
      targets[p].append(np.unique(np.concatenate([e] + [ids(r["output"]) for r in recs])) if recs else e)
  split = preprocess_lib.Split("given", history_len, tuple(train), tuple(hist["valid"]), tuple(targets["valid"]),
                               tuple(hist["test"]), tuple(targets["test"]))
  recs = [r for r in ds.examples if r["part"] == "train"]
  h, m = examples_lib.pad_histories([ids(r["input"]) for r in recs], history_len)
  windows = examples_lib.Windows(np.asarray([users[r["user"]] for r in recs], np.int32), h, m,
                                 np.asarray([ids(r["output"])[0] for r in recs], np.int32),
                                 tuple({k: r[k] for k in ("instruction", "input", "output")} for r in recs))
  return split, windows


def client_stats(prep: PreparedData) -> list[dict[str, int]]:
  """Per client: users, train_examples, valid_users, test_users, interactions (all periods), items."""
  ds, valid, test = prep.dataset, prep.split.valid_users(), prep.split.test_users()
  out = []
  for c in range(prep.num_clients):
    on = prep.clients == c
    inter = on[ds.user]
    out.append({"users": int(on.sum()), "train_examples": len(prep.client_windows(c)),
                "valid_users": int((on & valid).sum()), "test_users": int((on & test).sum()),
                "interactions": int(inter.sum()), "items": int(np.unique(ds.item[inter]).size)})
  return out


def prepare_dataset(name: str, data_dir: str | Path | None = None, *, num_clients: int = 5,
                    partition: str = "kmeans", split: str | None = None, seed: int = 0,
                    history_len: int = 10, k_core: int = 5, min_rating: float | None = None,
                    max_train_samples: int | None = None, dirichlet_alpha: float = 0.5,
                    mapping_file: str | Path | None = None, skip_bad_lines: bool = False,
                    bpr_steps: int = 2000, synthetic_kwargs: dict[str, Any] | None = None,
                    ) -> tuple[PreparedData, dict[str, Any]]:
  """Loads, filters, splits and partitions a dataset.

  Args:
    name: "synthetic" (no files needed), "movielens", "amazon" or "bigrec_json".
    data_dir: directory with the raw files (a .json file also works for bigrec_json).
    num_clients: C.
    partition: "kmeans" (BPR-MF user embeddings + KMeans, FELLRec), "random" (IID), "dirichlet"
      (non-IID over users' dominant item category) or "mapping" (CSV `user,client` in mapping_file).
    split: "temporal" (global 80/10/10), "loo" (leave-one-out), or None for the dataset default
      (`DEFAULT_SPLIT`); bigrec_json always uses the split given by its files.
    seed: seeds the synthetic data, BPR, KMeans, random/Dirichlet partitions and the sample cap.
    history_len: N, the items shown as history.
    k_core, min_rating: filtering (`preprocess.preprocess`); not applied to bigrec_json records.
    max_train_samples: optional seeded cap on training windows (over all clients).
  Returns:
    (PreparedData, stats) with stats = {"users", "items", "interactions", "split", "partition",
    "clients": [{"users", "train_examples", "valid_users", "test_users", "interactions", "items"}]},
    counts after filtering.
  """
  if partition not in PARTITIONS:
    raise ValueError(f"unknown partition {partition!r} (expected one of {PARTITIONS})")
  ds = _load(name, data_dir, seed, skip_bad_lines, synthetic_kwargs)
  if name == "bigrec_json":
    if split not in (None, "given"):
      raise ValueError("bigrec_json uses the split of its train/valid/test files; pass split=None")
    ds = preprocess_lib.preprocess(ds, k_core=0)
    sp, windows = _bigrec_split(ds, history_len)
  else:
    ds = preprocess_lib.preprocess(ds, min_rating=min_rating, k_core=k_core)
    sp = preprocess_lib.make_split(ds, split or DEFAULT_SPLIT[name], history_len=history_len)
    windows = examples_lib.training_windows(sp.train, history_len)
  if max_train_samples is not None and max_train_samples < len(windows):
    windows = windows.take(np.sort(np.random.default_rng(seed).choice(len(windows), max_train_samples, replace=False)))

  if partition == "kmeans":
    emb = partition_lib.bpr_user_embeddings(sp.train, ds.num_items, steps=bpr_steps, seed=seed)
    clients = partition_lib.kmeans(emb, num_clients, seed=seed)
  elif partition == "random":
    clients = partition_lib.random_partition(ds.num_users, num_clients, seed=seed)
  elif partition == "dirichlet":
    if ds.categories is None:
      raise DataError(f"dataset {name!r} has no item categories for the dirichlet partition")
    _, cat_ids = np.unique(np.asarray(ds.categories), return_inverse=True)
    label = partition_lib.dominant_category(sp.train, cat_ids)
    clients = partition_lib.dirichlet_partition(label, num_clients, alpha=dirichlet_alpha, seed=seed)
  else:
    if mapping_file is None:
      raise ValueError("partition='mapping' needs mapping_file")
    clients = partition_lib.mapping_partition(mapping_file, ds.user_keys, num_clients)
  partition_lib.check_clients(clients, num_clients, partition)

  prep = PreparedData(ds, sp, clients, num_clients, windows)
  per_client = client_stats(prep)
  for c, s in enumerate(per_client):
    logging.info("client %d: %s", c, ", ".join(f"{k}={v}" for k, v in s.items()))
  stats = {"users": ds.num_users, "items": ds.num_items, "interactions": ds.num_interactions,
           "split": sp.kind, "partition": partition, "clients": per_client}
  logging.info("%s: %d users, %d items, %d interactions, %s split, %d train windows",
               name, ds.num_users, ds.num_items, ds.num_interactions, sp.kind, len(windows))
  return prep, stats

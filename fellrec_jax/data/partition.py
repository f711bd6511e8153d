"""User -> client assignment.

All partitioners return `clients` [U] int32 in [0, num_clients). FELLRec's own way is `kmeans_bpr`:
BPR matrix factorisation on the training interactions, then KMeans on the user embeddings, so similar
users share a client and clients are non-IID.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from fellrec_jax.data.sources import DataError


def bpr_user_embeddings(train: Sequence[np.ndarray], num_items: int, *, dim: int = 32, steps: int = 2000,
                        batch_size: int = 1024, learning_rate: float = 0.01, l2: float = 1e-4,
                        seed: int = 0) -> np.ndarray:
  """Trains BPR-MF on (user, item) training pairs; returns user embeddings [U, dim] float32.

  Each step samples `batch_size` positive pairs and one uniform negative item per pair (a sampled
  negative may occasionally be a positive; BPR tolerates that). Users without training items keep
  their random initial embedding. Deterministic for `seed`.
  """
  num_users = len(train)
  users = np.concatenate([np.full(len(s), u, np.int32) for u, s in enumerate(train)])
  items = np.concatenate([np.asarray(s, np.int32) for s in train])
  if users.size == 0:
    raise DataError("BPR partition: no training interactions")
  key = jax.random.key(seed)
  k_u, k_i, k_loop = jax.random.split(key, 3)
  params = {"user": 0.1 * jax.random.normal(k_u, (num_users, dim)),
            "item": 0.1 * jax.random.normal(k_i, (num_items, dim))}
  opt = optax.adam(learning_rate)

  def loss_fn(p, u, i, j):
    eu, ei, ej = p["user"][u], p["item"][i], p["item"][j]
    x = jnp.sum(eu * (ei - ej), -1)
    return -jnp.mean(jax.nn.log_sigmoid(x)) + l2 * jnp.mean(jnp.sum(eu**2 + ei**2 + ej**2, -1))

  @jax.jit
  def train(p, pos_u, pos_i):  # the interactions are arguments, not constants baked into the program
    def step(carry, k):
      p, s = carry
      k1, k2 = jax.random.split(k)
      idx = jax.random.randint(k1, (batch_size,), 0, pos_u.shape[0])
      neg = jax.random.randint(k2, (batch_size,), 0, num_items)
      loss, g = jax.value_and_grad(loss_fn)(p, pos_u[idx], pos_i[idx], neg)
      upd, s = opt.update(g, s, p)
      return (optax.apply_updates(p, upd), s), loss

    (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k_loop, steps))
    return p, losses

  params, losses = train(params, jnp.asarray(users), jnp.asarray(items))
  logging.info("BPR-MF: loss %.4f -> %.4f over %d steps", losses[0], losses[-1], steps)
  return np.asarray(params["user"], np.float32)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100) -> np.ndarray:
  """Lloyd's KMeans with k-means++ initialisation on x [N, D]; returns labels [N] int32.

  A cluster that empties during iteration is re-seeded with the point farthest from its centre, so
  every cluster ends non-empty whenever N >= k. Deterministic for `seed`.
  """
  n = x.shape[0]
  if n < k:
    raise DataError(f"KMeans: {n} users cannot fill {k} clients")
  x = x.astype(np.float64)
  rng = np.random.default_rng(seed)
  centres = [x[rng.integers(n)]]
  d2 = ((x - centres[0]) ** 2).sum(1)
  for _ in range(1, k):
    c = x[rng.choice(n, p=d2 / d2.sum())] if d2.sum() > 0 else x[rng.integers(n)]
    centres.append(c)
    d2 = np.minimum(d2, ((x - c) ** 2).sum(1))
  centres = np.stack(centres)
  labels = np.full(n, -1)
  for _ in range(iters):
    dist = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    new = dist.argmin(1)
    for c in range(k):
      if not (new == c).any():
        far = dist[np.arange(n), new].argmax()
        new[far] = c
        dist[far] = 0.0  # so another empty cluster takes a different point
    if (new == labels).all():
      break
    labels = new
    centres = np.stack([x[labels == c].mean(0) for c in range(k)])
  return labels.astype(np.int32)


def random_partition(num_users: int, num_clients: int, *, seed: int = 0) -> np.ndarray:
  """IID: a seeded permutation cut into near-equal parts. Returns [U] int32."""
  out = np.empty(num_users, np.int32)
  for c, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(num_users), num_clients)):
    out[part] = c
  return out


def dominant_category(train: Sequence[np.ndarray], item_category: np.ndarray) -> np.ndarray:
  """[U] the most frequent category id among each user's training items (ties: lowest id;
  no training items: -1). `item_category` is [I] int."""
  n_cat = int(item_category.max()) + 1
  return np.array([np.bincount(item_category[s], minlength=n_cat).argmax() if len(s) else -1
                   for s in train], np.int32)


def dirichlet_partition(label: np.ndarray, num_clients: int, *, alpha: float = 0.5, seed: int = 0) -> np.ndarray:
  """Label-skew non-IID: for each label value (a user's dominant category), draw client shares
  p ~ Dirichlet(alpha) and deal that label's users (in a seeded random order) to clients by p.
  Smaller alpha -> more skew. Returns [U] int32."""
  rng = np.random.default_rng(seed)
  out = np.empty(len(label), np.int32)
  for lab in np.unique(label):
    idx = rng.permutation(np.flatnonzero(label == lab))
    cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(idx)).astype(int)
    for c, part in enumerate(np.split(idx, cuts)):
      out[part] = c
  return out


def mapping_partition(path: str | Path, user_keys: Sequence[str], num_clients: int) -> np.ndarray:
  """Reads a CSV with header `user,client` (user = original user id). Users in the file but not in
  the data (e.g. removed by k-core) are ignored and counted; a data user missing from the file, or a
  client id outside [0, num_clients), is an error. Returns [U] int32."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"missing file: {path} (user->client mapping)")
  index = {k: u for u, k in enumerate(user_keys)}
  out = np.full(len(user_keys), -1, np.int32)
  ignored = 0
  with path.open(newline="", encoding="utf-8") as f:
    rows = csv.reader(f)
    header = next(rows, None)
    if header is None or [h.strip() for h in header[:2]] != ["user", "client"]:
      raise DataError(f"{path}, line 1: wrong columns: need 'user,client', got {header}")
    for row in rows:
      if not row:
        continue
      try:
        user, client = row[0].strip(), int(row[1])
      except (IndexError, ValueError):
        raise DataError(f"{path}, line {rows.line_num}: expected 'user,client' with an integer client, got {row}") from None
      if not 0 <= client < num_clients:
        raise DataError(f"{path}, line {rows.line_num}: client {client} outside [0, {num_clients})")
      if user in index:
        out[index[user]] = client
      else:
        ignored += 1
  if ignored:
    logging.info("%s: ignored %d users not in the data", path, ignored)
  missing = np.flatnonzero(out < 0)
  if missing.size:
    raise DataError(f"{path}: {missing.size} users have no client, e.g. user {user_keys[missing[0]]!r}")
  return out


def check_clients(clients: np.ndarray, num_clients: int, how: str) -> None:
  """Raises DataError naming every client left without users."""
  empty = [c for c in range(num_clients) if not (clients == c).any()]
  if empty:
    raise DataError(f"partition {how!r} left client(s) {empty} with no users "
                    f"({len(clients)} users, {num_clients} clients); use fewer clients or another partition")

"""Checkpoint tensors -> our parameter pytree: the key map type, the shape-checked assembly both file
formats use, and the error raised for a file that cannot be read.

Every checkpoint key maps to one leaf of the layout in `models.transformer` (torch `[out, in]` matrices
become `w_io` `[in, out]`; per-block tensors are stacked on the layer axis), and every tensor's shape is
checked against `init_params`' layout so that a mismatched config fails loudly with the checkpoint key
and file in the message.
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig
from models.transformer import Params, init_params

# checkpoint key -> (leaf path in our layout, layer index or None for unstacked leaves)
KeyMap = dict[str, tuple[tuple[str, ...], int | None]]


class ModelError(ValueError):
  """A model that cannot be found or read (an unknown name, a truncated file, not the format its name
  says); the message names it."""


def readable(path: pathlib.Path, kind: str, read: Callable[[], object]):
  """`read()`, with any failure of the file's parser reported as a `ModelError` naming the file."""
  try:
    return read()
  except Exception as e:  # parsers raise anything from struct/OS errors to their own types; re-raised with the file
    raise ModelError(f"{path}: not a readable {kind} file ({type(e).__name__}: {e})") from e


def assemble(config: ModelConfig, key_map: KeyMap, located: dict[str, str], read: Callable[[str], np.ndarray],
             ignored: tuple[str, ...], *, source: str) -> Params:
  """Reads every key of `key_map` into our layout, in `config.param_dtype`.

  `located` maps each available checkpoint key to a human-readable location for errors; keys neither in
  `key_map` nor matching an `ignored` pattern are an error, as are missing keys and wrong shapes.
  Matrices (`w_io` leaves) arrive torch-style `[out, in]` and are transposed.
  """
  unexpected = [k for k in located if k not in key_map and not any(re.fullmatch(p, k) for p in ignored)]
  if unexpected:
    raise ValueError(f"unexpected tensor {located[unexpected[0]]} ({len(unexpected)} in all) for a "
                     f"{config.num_layers}-block {config.arch} model; is the config right? ({source})")
  missing = [k for k in key_map if k not in located]
  if missing:
    raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} in all) in {source}")

  expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  dtype = jnp.dtype(config.param_dtype)
  leaves: dict[tuple[str, ...], np.ndarray | list] = {}
  for key, (path, layer) in key_map.items():
    array = read(key)
    if path[-1] == "w_io":
      array = array.T
    want = _get(expected, path).shape[1 if layer is not None else 0:]
    if array.shape != tuple(want):
      raise ValueError(f"tensor {located[key]} has shape {array.shape} in our layout, expected {tuple(want)} "
                       f"for {'/'.join(path)} ({source})")
    array = np.ascontiguousarray(array, dtype=dtype)
    if layer is None:
      leaves[path] = array
    else:
      leaves.setdefault(path, [None] * config.num_layers)[layer] = array

  params: Params = {}
  for path, value in leaves.items():
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(np.stack(value) if isinstance(value, list) else value)
  return params


def _get(tree: Params, path: tuple[str, ...]):
  for part in path:
    tree = tree[part]
  return tree

"""The ('clients', 'model') device mesh and the shardings of per-client and shared state.

Per-client pytrees (leading clients axis) are split over `clients`; shared base weights are split
over `model` by rules on their names (`MODEL_AXIS_RULES`) and replicated over `clients`.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

CLIENTS, MODEL = "clients", "model"


def make_mesh(clients: int | None = None, model: int = 1) -> jax.sharding.Mesh:
  """A `(clients, model)` mesh over all devices; `clients=None` takes every device left after `model`."""
  n = jax.device_count()
  if model < 1 or n % model:
    raise ValueError(f"--mesh_model={model} must divide the {n} available devices")
  clients = clients or n // model
  if clients * model != n:
    raise ValueError(f"--mesh_clients={clients} x --mesh_model={model} != {n} devices")
  return jax.make_mesh((clients, model), (CLIENTS, MODEL),
                       axis_types=(jax.sharding.AxisType.Auto, jax.sharding.AxisType.Auto))


def per_client(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Shardings splitting each leaf's leading clients axis (replicated when it does not divide)."""
  return jax.tree.map(lambda x: over_clients(mesh, x.shape[0]) if x.ndim else NamedSharding(mesh, P()), tree)


def over_clients(mesh: jax.sharding.Mesh, num_clients: int) -> NamedSharding:
  """One sharding for every leaf with a leading axis of `num_clients` (a pytree prefix for jit)."""
  return NamedSharding(mesh, P(CLIENTS) if num_clients % mesh.shape[CLIENTS] == 0 else P())


# Which axis of a named base leaf `model` splits (negative: counted from the end, past the stacked layer
# axis), as Megatron-style tensor parallelism does: q/k/v/gate/up on their output features, o/down on their
# input features (one all-reduce after each pair), the token table and untied head on the vocabulary, item
# tables on their rows. Leaves no rule names (norms, o/down biases, positions, token ids) are replicated.
MODEL_AXIS_RULES = (
    (r"blocks/(q|k|v|gate|up)/(w_io|b_o)", -1),
    (r"blocks/(o|down)/w_io", -2),
    (r"embed/table_vd", 0),
    (r"head/w_io", -1),
    (r"items/(input_id|table_id)", 0),
)


def model_axis(path: str) -> int | None:
  """The axis `MODEL_AXIS_RULES` splits for a leaf at `path` ("blocks/q/w_io"), or None (replicated)."""
  for pattern, axis in MODEL_AXIS_RULES:
    if re.fullmatch(pattern, path):
      return axis
  return None


def shared(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Shardings of shared (base) weights: each leaf split over `model` on the axis its name's rule gives
  (`MODEL_AXIS_RULES`), replicated over `clients`; replicated where no rule names it or `model` does not
  divide that axis."""
  size = mesh.shape[MODEL]

  def spec(path, x):
    axis = model_axis(jax.tree_util.keystr(path, simple=True, separator="/"))
    if size == 1 or axis is None or x.shape[axis] % size:
      return NamedSharding(mesh, P())
    axis %= x.ndim
    return NamedSharding(mesh, P(*[MODEL if a == axis else None for a in range(x.ndim)]))

  return jax.tree_util.tree_map_with_path(spec, tree)


def put(tree: Any, shardings: Any) -> Any:
  """Values -> global arrays laid out by `shardings`.

  A device array already laid out so is returned as is, and on one process a device array moves device
  to device (`jax.device_put`), never through the host. Otherwise every process passes the same full
  values (our data and init are deterministic) and each fills only its addressable shards, so this works
  unchanged on one host and on many.
  """
  def one(x, s):
    if isinstance(x, jax.Array):
      if x.sharding.is_equivalent_to(s, x.ndim):
        return x
      if jax.process_count() == 1:
        return jax.device_put(x, s)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def to_host(tree: Any) -> Any:
  """Global arrays -> full NumPy values on every process."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)

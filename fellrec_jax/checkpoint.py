"""Orbax checkpoints of the whole federated state: arrays (sharded) plus a JSON of loop metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like_state: Any) -> tuple[int, Any, dict] | None:
  """`(step, state, meta)` of the latest checkpoint, restored with `like_state`'s shapes and shardings."""
  step = mngr.latest_step()
  if step is None:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   meta=ocp.args.JsonRestore()))
  return step, out["state"], dict(out["meta"])

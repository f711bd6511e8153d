"""Orbax checkpoints of the whole federated state: arrays (sharded) plus a JSON of loop metadata; and the
lock that keeps one run per workdir."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from absl import logging

from fellrec_jax.config import ConfigError


def manager(workdir: str | Path, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, like_state: Any | None,
                   check_meta: Callable[[dict], None] = lambda meta: None) -> tuple[int, Any, dict] | None:
  """`(step, state, meta)` of the newest readable checkpoint, restored with `like_state`'s shapes and
  shardings; None when there is none. Without `like_state` (a reader that has no engine to build one,
  `--mode=export`) the state comes back as saved, as nested dicts of arrays on one device.

  Each checkpoint's metadata is read first and passed to `check_meta`, which raises when the checkpoint
  belongs to another configuration (that error propagates: an older checkpoint would not fit either).
  A checkpoint that cannot be read is reported in one line and the next older one is tried.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      meta = dict(mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    except Exception as e:  # noqa: BLE001 -- reported, then the previous checkpoint is tried
      _report_unreadable(mngr, step, e, steps[i + 1:])
      continue
    check_meta(meta)
    try:
      abstract = (_saved_layout(mngr, step) if like_state is None
                  else jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state))
      state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except Exception as e:  # noqa: BLE001
      _report_unreadable(mngr, step, e, steps[i + 1:])
      continue
    return step, state, meta
  return None


def _saved_layout(mngr: ocp.CheckpointManager, step: int) -> Any:
  """The saved state's tree of `ShapeDtypeStruct`s placed on one device: whatever mesh wrote it, this
  process can read it back whole."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      mngr.item_metadata(step)["state"])


def _report_unreadable(mngr: ocp.CheckpointManager, step: int, error: Exception, older: list[int]) -> None:
  first_line = (str(error).strip().splitlines() or [""])[0][:200]
  then = f"resuming from step {older[0]} instead" if older else "no older checkpoint: starting fresh"
  logging.warning("checkpoint %s is unreadable (%s: %s); %s", mngr.directory / str(step), type(error).__name__,
                  first_line, then)


@contextlib.contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
  """Holds `<workdir>/.lock` exclusively for the block (process 0 of a multi-host run), so a second run on
  the same workdir fails at once. The kernel drops the lock when its process dies, so a stale lock file
  from a killed run never blocks."""
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir).absolute() / ".lock"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_file = open(path, "a+")
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created or written ({e.strerror}: {e.filename})") from e
  with lock_file as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "unknown"
      raise ConfigError(f"--workdir={workdir} is in use by another run (pid {holder}, lock {path}); wait for it "
                        "to finish or pass another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)

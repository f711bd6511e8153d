"""Before the first round: the estimated peak memory of a round, from its programs compiled on abstract
inputs, and a refusal naming the flags to lower when it will not fit (`check_memory_fits`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from absl import logging

from federated.resources import nbytes
from fellrec_jax import host_memory
from fellrec_jax.host_memory import GIB
from fellrec_jax.config import ConfigError
from fellrec_jax.xla_stats import ProgramMemory

PyTree = Any


def _spec(x, sharding=None) -> jax.ShapeDtypeStruct:
  """An abstract stand-in of `x` with its sharding (or `sharding`), so the lowering matches the real
  call's and the later real compile is served from JAX's compilation cache."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None))


def _host_round_batches(engine) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one round's `round_batches`, `[C, S, A, B, ...]`, from one real stacked batch `[C, B, ...]`."""
  from fellrec_jax.data import pipeline  # data code is only needed here; keeps `import round_memory` light
  cfg = engine.cfg
  one = pipeline.batch_at(engine.train_examples, batch_size=cfg.batch_size, seed=cfg.seed, epoch=0, step=0)
  steps = engine.micro_per_round // cfg.grad_accum
  return {key: jax.ShapeDtypeStruct((x.shape[0], steps, cfg.grad_accum, *x.shape[1:]), x.dtype)
          for key, x in one.items()}


def _take(tree: PyTree, n: int) -> PyTree:
  """Shapes of the first n clients of a stacked tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), tree)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundProgram(ProgramMemory):
  """XLA's memory stats (bytes per device) of one compiled local round of `num_clients` clients cut at k."""

  k: int | None
  num_clients: int


def _program(compiled, k: int | None, num_clients: int) -> RoundProgram:
  return RoundProgram(k=k, num_clients=num_clients, **dataclasses.asdict(ProgramMemory.of(compiled)))


def round_programs(engine, state, batches: dict[str, jax.ShapeDtypeStruct] | None = None) -> list[RoundProgram]:
  """Lowers and compiles the engine's local-round program(s) on abstract inputs, one per distinct cut k.

  The inputs carry the shardings the engine's `local_training` passes, so the real first round finds
  these executables in JAX's compilation cache instead of compiling again. "sequential" execution
  runs one jitted client at a time, so its program is compiled for one client. `state` is a `FedState`
  (real or abstract); `batches` the shapes of one round's batches (default `_host_round_batches`).
  """
  from fellrec_jax import sharding
  batches = _host_round_batches(engine) if batches is None else batches
  sequential = engine.cfg.client_execution == "sequential"
  out = []
  for k in sorted(set(engine.cuts), key=lambda x: -1 if x is None else x):
    n = sum(1 for c in engine.cuts if c == k)
    n_compiled = 1 if sequential else n
    fn = engine._update_fn(k, n)
    if sequential:  # a Python loop over a jitted client: its program is that of one client, stacked
      fn = jax.jit(fn)
    per_client = sharding.over_clients(engine.mesh, n_compiled)
    with_clients = lambda tree: jax.tree.map(lambda x: _spec(x, per_client), _take(tree, n_compiled))
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), n_compiled))
    args = (jax.tree.map(_spec, engine.base), with_clients(state.lora), with_clients(state.opt_state),
            with_clients(batches), _spec(keys, per_client))
    compiled = fn.lower(*args).compile()
    out.append(_program(compiled, k, n_compiled))
  return out


def heldout_program(engine, state) -> RoundProgram:
  """Memory stats of the engine's jitted held-out loss (`Engine.validate`) on abstract inputs."""
  fn = engine._heldout
  args = (jax.tree.map(_spec, engine.base), jax.tree.map(_spec, state.lora), jax.tree.map(_spec, engine.valid_batches))
  return _program(fn.lower(*args).compile(), None, engine.num_clients)


def _device_bytes(tree: PyTree) -> int:
  """Bytes of `tree` on one device: each leaf's shard, by its sharding (the whole leaf without one)."""
  shard = lambda x: x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
  return sum(math.prod(shard(x)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _devices_per_host(engine) -> int:
  """Devices of the engine's mesh on this process: CPU "devices" all draw on the one host memory."""
  return sum(1 for d in engine.mesh.devices.flat if d.process_index == jax.process_index())


def _group_size(engine, num_clients: int) -> int:
  """Clients one device runs at once in a round: `--client_group_size` capped at its shard of the clients
  (`client.in_groups`); 1 for "sequential"."""
  if engine.cfg.client_execution == "sequential":
    return 1
  shards = engine.mesh.shape["clients"]
  per_shard = num_clients // shards if num_clients % shards == 0 else num_clients
  return min(engine.cfg.client_group_size or per_shard, per_shard)


def estimate_round_peak(engine, state=None, *, with_heldout: bool = True) -> dict[str, Any]:
  """Estimated peak resident memory (bytes) of this process while the engine runs a round.

  Compiles the round program(s) on abstract inputs first (`round_programs`), then adds up:
    resident:        this process's RSS now, after that compile: Python, the JAX runtime and compiled
                     code, the base weights, the clients' examples and validation batches already placed.
    state:           adapters, optimizer state and best adapters (`init_state`) when `state` is None (not
                     yet allocated; a throwaway state is built to size it); 0 when `state` is given.
    host_batches:    one round's stacked numpy batches `[C, S, A, B, ...]` (`round_batches`);
    device_batches:  their on-device copy, an argument of the round program;
    round_temp:      XLA's scratch for the round (activations, gradients, the loss head) x devices;
    round_outputs:   round outputs that do not reuse a donated buffer (statistics) x devices;
    anchor:          the copy of the adapters the round starts from, when something reads them after the
                     round (`Engine.needs_anchor`: the round updates the adapters in place);
    regroup:         with several distinct cuts, `local_training` slices and re-assembles the state.
  The validation program runs after the round's transients are freed, so it counts only when larger:
    heldout_extra:   max(0, held-out temp + outputs - round temp - round outputs - batches).
  Also returned (not summed): `group_size` (clients per device in one program, what `round_temp` scales
  with), `num_clients`, `devices`, `programs` (per-program XLA stats), `device_temp` (the largest round
  program's scratch on one device), and `total`.

  On accelerators the state, device batches and the programs' buffers live in device memory, not in this
  process's RSS: there `total` counts host memory only (those terms are 0) and `device_peak` (one device's
  arguments + temp + outputs - aliased, of the largest program) is checked against `device_limit`.
  """
  own_state = state is None
  if own_state:
    state = engine.init_state(jax.random.key(0))
  state_bytes = nbytes(state.lora) + nbytes(state.opt_state) + nbytes(state.best_lora)
  anchor_bytes, anchor_device = (nbytes(state.lora), _device_bytes(state.lora)) if engine.needs_anchor else (0, 0)
  programs = round_programs(engine, state)
  heldout = heldout_program(engine, state) if with_heldout else None
  if own_state:
    del state  # released before RSS is read: the run allocates its own
  devices = _devices_per_host(engine)
  round_batches = nbytes(_host_round_batches(engine))
  worst = max(programs, key=lambda p: p.transient_bytes)
  device_limit = host_memory.device_limit_bytes(engine.mesh.devices.flat[0])
  # the anchor sits beside the round program on its devices, not beside the held-out one
  device_peak = max([p.peak_bytes + anchor_device for p in programs] + ([heldout.peak_bytes] if heldout else []))
  terms = {
      "resident": host_memory.process_rss_bytes(),
      "state": state_bytes if own_state else 0,
      "host_batches": round_batches,
      "device_batches": round_batches,
      "round_temp": worst.temp_bytes * devices,
      "round_outputs": (worst.output_bytes - worst.alias_bytes) * devices,
      "anchor": anchor_bytes,
      "regroup": (3 * state_bytes // 4 + round_batches) if len(programs) > 1 else 0,  # lora + opt of one take/put
  }
  if engine.cfg.client_execution == "sequential":  # the loop stacks every client's new state, undonated
    terms["round_outputs"] = (worst.output_bytes - worst.alias_bytes) * engine.num_clients * devices
  round_transient = terms["round_temp"] + terms["round_outputs"] + 2 * round_batches
  terms["heldout_extra"] = 0 if heldout is None else max(0, heldout.transient_bytes * devices - round_transient)
  if device_limit is not None:  # these live in accelerator memory
    terms |= dict.fromkeys(("state", "device_batches", "round_temp", "round_outputs", "anchor", "regroup",
                            "heldout_extra"), 0)
  total = sum(terms.values())
  return terms | {"total": total, "device_peak": device_peak, "device_limit": device_limit,
                  "device_temp": worst.temp_bytes, "group_size": _group_size(engine, worst.num_clients),
                  "num_clients": engine.num_clients, "devices": devices,
                  "programs": [dataclasses.asdict(p) for p in programs]
                  + ([dataclasses.asdict(heldout) | {"k": "heldout"}] if heldout is not None else [])}


def suggest_group_size(estimate: dict[str, Any], budget: int) -> int:
  """The largest client group size whose estimate fits `budget` bytes, 0 when even one client does not.

  The round's scratch is almost all per-client activations, so it is taken to scale linearly with the
  group size (the tests check this); everything else is held fixed.
  """
  g = max(int(estimate["group_size"]), 1)
  per_client = estimate["round_temp"] / g
  fixed = estimate["total"] - estimate["round_temp"] - estimate["heldout_extra"]
  return max(0, min(g, int((budget - fixed) // max(per_client, 1))))


def _shrink_advice(engine, est: dict[str, Any], budget: int, scratch: int) -> str:
  """The flags that make a round smaller, with a suggested `--client_group_size`."""
  cfg, g, now = engine.cfg, suggest_group_size(est, budget), est["group_size"]
  if g < 1:
    group = (f"--client_group_size=1 alone is not enough (one client's scratch is about "
             f"{_gib(scratch / max(now, 1))})")
  elif g >= now:  # what does not fit is not the round's per-client scratch
    group = (f"--client_group_size does not help here (the held-out pass is the peak: lower "
             f"--eval_batch_size={cfg.eval_batch_size})" if est["heldout_extra"] else
             "--client_group_size does not help here (already one client per program)")
  else:
    group = (f"--client_group_size={g} (now {cfg.client_group_size or 'unset'}: {now} clients per program; "
             f"the round's {_gib(scratch)} scratch scales with it)")
  return (f"Lower: {group}; --batch_size={cfg.batch_size} (activations scale with it; raise --grad_accum to "
          f"keep the effective batch); --cutoff_len={cfg.cutoff_len} / --history_len={cfg.history_len} "
          f"(sequence length); --split_k (now {'unset' if engine.cuts[0] is None else engine.cuts[0]}: this "
          f"simulation runs both sides of the cut, and the split step holds the activations crossing it); "
          f"or --remat.")


def _gib(x: float) -> str:
  return f"{x / GIB:.1f} GiB"


def check_memory_fits(engine, state=None, *, available: int | None = None) -> dict[str, Any]:
  """Logs the estimated peak memory of a round and raises `ConfigError` when it will not fit.

  Call it before the first round: it compiles the round program on abstract inputs (the real round then
  reuses that executable). The process may grow by `available` bytes (default `available_memory_bytes()`)
  beyond what it holds now. The error names the flags that shrink the round, with a suggested
  `--client_group_size`. Returns the estimate.
  """
  est = estimate_round_peak(engine, state)
  available = host_memory.available_memory_bytes() if available is None else available
  budget = est["resident"] + available
  parts = ", ".join(f"{name} {_gib(est[name])}" for name in
                    ("resident", "state", "host_batches", "device_batches", "round_temp", "round_outputs",
                     "anchor", "regroup", "heldout_extra") if est[name])
  logging.info("estimated peak memory of a round: %s (%s; %d clients, %d per program); this process can use "
               "%s (%s resident + %s available)", _gib(est["total"]), parts, est["num_clients"],
               est["group_size"], _gib(budget), _gib(est["resident"]), _gib(available))
  if est["device_limit"] is not None:
    logging.info("estimated peak memory of one device: %s of its %s", _gib(est["device_peak"]),
                 _gib(est["device_limit"]))
    if est["device_peak"] > est["device_limit"]:
      scratch = est["device_temp"]
      device_est = {**est, "total": est["device_peak"], "round_temp": scratch, "heldout_extra": 0}
      raise ConfigError(f"a round needs about {_gib(est['device_peak'])} on one device, which has "
                        f"{_gib(est['device_limit'])}. " + _shrink_advice(engine, device_est, est["device_limit"],
                                                                           scratch))
  if est["total"] <= budget:
    return est
  raise ConfigError(f"a round needs about {_gib(est['total'])} but this process can use {_gib(budget)} "
                    f"({_gib(available)} available). " + _shrink_advice(engine, est, budget, est["round_temp"])
                    + f" Estimate: {parts}.")

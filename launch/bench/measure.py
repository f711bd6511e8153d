"""How the benchmark measures: median wall times of blocked results, matmul FLOPs counted from a
jaxpr, the memory it may still use, and a table that prints its rows as they come."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

from fellrec_jax import host_memory


def block(tree):
  import jax
  return jax.block_until_ready(tree)


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
  """Median wall time of `fn()` (results blocked on) over `repeats` calls after `warmup` calls."""
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def interleaved_seconds(fns: dict[str, Callable[[], Any]], repeats: int, settle: int = 0) -> dict[str, list[float]]:
  """Wall times of each `fn()` (results blocked on), the functions called in turn (A B A B ...) `repeats`
  times after one warm-up call each: load that drifts during the measurement hits every side alike.
  `settle` untimed calls precede each timed one, so a side is not timed on the first call after another
  side ran (see `launch.bench.pytorch_peer`)."""
  for fn in fns.values():
    block(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      for _ in range(settle):
        block(fn())
      start = time.perf_counter()
      block(fn())
      times[name].append(time.perf_counter() - start)
  return times


def free_memory_bytes() -> int:
  """What the benchmark may still allocate: an accelerator's free memory, else the host's available memory."""
  import jax
  free = host_memory.device_free_bytes(jax.devices()[0])
  return host_memory.available_memory_bytes() if free is None else free


class Table:
  """Prints a section's title and column header, then each row as it is measured (a long section's progress)."""

  def __init__(self, title: str, columns: list[str]):
    print(f"\n== {title}\n" + " | ".join(f"{c:>14}" for c in columns), flush=True)

  def add(self, *values):
    cells = [f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}" for v in values]
    print(" | ".join(cells), flush=True)


def jaxpr_flops(fn: Callable, *args, while_trips: int = 1) -> float:
  """Matmul FLOPs of `fn(*args)` counted from its jaxpr: `2 * batch * M * N * K` per `dot_general`,
  scan bodies multiplied by their length, while-loop bodies by `while_trips` (their trip count is a runtime
  value: a local round's step loop runs up to its S steps), nested jaxprs (jit, remat, custom_vjp, cond:
  max branch) recursed.

  Why not XLA's `cost_analysis()` alone: on CPU it counts a while-loop body once, and our round is a scan
  over steps, micro-batches and layers, so it undercounts by roughly their product. Elementwise work
  (norms, softmax, optimizer) is left out, as in the usual MFU definition. Dead code is removed first, as
  XLA removes it, at the top and inside every nested body: a custom VJP's cotangent for a frozen input
  (`losses.token_nll`'s head vectors) is traced into the jaxpr but never computed (a fifth of a SmolLM2
  round's matmul FLOPs).
  """
  import jax
  return _count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr, while_trips)


def _live(jaxpr):
  """`jaxpr` without the equations none of its outputs needs."""
  from jax._src.interpreters import partial_eval  # no public DCE; jax is pinned below 0.11 (requirements.txt)
  return partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0]


def _count_jaxpr(jaxpr, while_trips: int) -> float:
  from jax.extend import core
  kinds = (core.Jaxpr, core.ClosedJaxpr)
  total = 0.0
  for eqn in _live(jaxpr).eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      out = eqn.outvars[0].aval.shape
      k = math.prod(lhs[d] for d in lhs_contract)
      total += 2.0 * math.prod(out) * k
      continue
    subs = [v for v in eqn.params.values() if isinstance(v, kinds)]
    subs += [b for v in eqn.params.values() if isinstance(v, (tuple, list)) for b in v if isinstance(b, kinds)]
    inner = [_count_jaxpr(s.jaxpr if isinstance(s, core.ClosedJaxpr) else s, while_trips) for s in subs]
    if not inner:
      continue
    if name == "cond":
      total += max(inner)
    elif name == "scan":
      total += eqn.params["length"] * sum(inner)
    elif name == "while":
      total += while_trips * sum(inner)  # the body (and its condition, which has no matmul)
    else:  # pjit, remat, custom_jvp/vjp
      total += sum(inner)
  return total

"""What flexible storage costs and saves: client vs server parameters, memory, FLOPs and cut traffic at k.

Everything here works on shapes: parameters are `jax.ShapeDtypeStruct` pytrees from `jax.eval_shape`
(the loaders check real weights against `init_params`' layout, so the shapes are the same), and the
three split segments are lowered and compiled with abstract inputs. A LLaMA-7B config.json therefore
needs no weights and no memory.

Who holds what at cut k (L blocks; `models.split`):
  client: embeddings + blocks[:k] (head), block L-1 + final norm + LM head (tail); the tied embedding
          table is one array on the client, counted once. Adapters on blocks [:k] and [L-1], and their
          optimizer state.
  server: blocks[k:L-1] (body). With `server_lora="per_client"` the server also holds each client's
          adapters on those blocks and their optimizer state (it computes their gradients), so those
          count on the server, per client; with "frozen" there are none.

Compiled segments, each one fused forward + backward for a batch `[B, T]` (what one client step runs):
  client_head: (head, lora_head, ids, mask, g_up)           -> (act_up, lora grads)
  server_body: (body, lora_body, act_up, mask, g_down)      -> (act_down, lora grads, g_up)
  client_tail: (tail, lora_tail, act_down, batch)           -> (loss, lora grads, g_down)
Peak memory of a segment is XLA's `argument + output + temp - alias` bytes; its *working* memory is
that minus the parameter and adapter arguments (which are counted once, as held parameters).

FLOPs: XLA's cost analysis counts a `while` loop body once, whatever its trip count, and blocks run
under `lax.scan`. So each segment's FLOPs are measured with 0 and 1 blocks (a 1-trip loop is inlined
by XLA, so it is counted exactly) and extrapolated linearly: `flops(n) = flops(0) + n * (flops(1) - flops(0))`.

Client footprint at k (what `choose_split_k` budgets):
  client base params bytes + client adapter bytes + client optimizer-state bytes
  + working(client_head) + working(client_tail).
Adding the two working sets is a deliberate upper bound: the head's residuals stay alive while the
tail runs, which a per-segment analysis cannot see.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from absl import logging

import models
from fellrec_jax.config import ConfigError
from models.config import ModelConfig
from models.transformer import Params

PyTree = Any
MIB = 2 ** 20


# ----------------------------------------------------------------------------- shapes and counts

def abstract_params(config: ModelConfig) -> Params:
  """Base parameter shapes (ShapeDtypeStructs in `param_dtype`), no memory allocated."""
  return jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))


def abstract_lora(config: ModelConfig, base: Params) -> Params | None:
  """LoRA adapter shapes (fp32), or None when `config.lora` is None."""
  if config.lora is None:
    return None
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  return jax.eval_shape(lambda b: models.init_lora(config, b, jax.random.key(0)), shapes)


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def count(tree: PyTree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def nbytes(tree: PyTree) -> int:
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def split_shapes(config: ModelConfig, tree: PyTree, k: int) -> tuple[PyTree, PyTree, PyTree]:
  """`models.split` on shapes: (head, body, tail) ShapeDtypeStruct pytrees of real or abstract params/adapters."""
  return jax.eval_shape(lambda t: models.split(config, t, k), _abstract(tree))


def _client_base(config: ModelConfig, head: Params, tail: Params) -> tuple[int, int]:
  """(params, bytes) of head + tail with a tied embedding table counted once."""
  n, b = count(head) + count(tail), nbytes(head) + nbytes(tail)
  if config.tie_embeddings and "embed" in tail:
    n, b = n - count(tail["embed"]), b - nbytes(tail["embed"])
  return n, b


def _opt_bytes(tx: optax.GradientTransformation, lora: PyTree) -> int:
  if lora is None or not jax.tree.leaves(lora):
    return 0
  return nbytes(jax.eval_shape(tx.init, lora))


def param_split(config: ModelConfig, base: Params, k: int, *, lora: Params | None = None,
                tx: optax.GradientTransformation | None = None, server_lora: str = "per_client") -> dict[str, int]:
  """Parameters and bytes held by the client and by the server at cut k (see the module docstring).

  `base`/`lora` may be real arrays or ShapeDtypeStructs. `tx` is the clients' optimizer (default AdamW:
  two fp32 moments per adapter parameter plus a step count).
  """
  tx = optax.adamw(1e-3) if tx is None else tx
  head, body, tail = split_shapes(config, base, k)
  client_n, client_b = _client_base(config, head, tail)
  out = {"total_params": count(base),  # one leaf per array: a tied table is in `base` once
         "client_params": client_n, "server_params": count(body),
         "client_param_bytes": client_b, "server_param_bytes": nbytes(body)}
  if lora is not None:
    l_head, l_body, l_tail = split_shapes(config, lora, k)
    client_lora = {"head": l_head, "tail": l_tail}
    server_held = l_body if server_lora == "per_client" else None
    out |= {"client_lora_params": count(client_lora), "client_lora_bytes": nbytes(client_lora),
            "client_opt_bytes": _opt_bytes(tx, client_lora),
            "server_lora_params": count(server_held) if server_held is not None else 0,
            "server_lora_bytes": nbytes(server_held) if server_held is not None else 0,
            "server_opt_bytes": _opt_bytes(tx, server_held)}
  out["client_share_params"] = out["client_params"] / max(out["total_params"], 1)
  return out


# ----------------------------------------------------------------------------- compiled segments

def _with_blocks(tree: Params, n: int) -> Params:
  """`tree` with its block stack resized to n layers (shapes only)."""
  blocks = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), tree["blocks"])
  return dict(tree, blocks=blocks)


def segment_fns(config: ModelConfig, server_lora: str = "per_client") -> dict[str, Callable]:
  """The three fused forward+backward segment functions (module docstring), rng-free (no dropout mask):
  `federated.client.split_segments`, each joined to its incoming cotangent by `jax.vjp`."""
  from federated import client  # the engine's segments; imported late to keep this module light
  spec = client.LocalSpec(config, server_lora=server_lora)

  def head_step(head, lora_head, ids_bt, mask_bt, g_up_btd):
    head_fn, _, _ = client.split_segments(spec, (head, None, None), {"input_ids": ids_bt, "attention_mask": mask_bt})
    act, vjp = jax.vjp(head_fn, lora_head)
    return act, vjp(g_up_btd)[0]

  def body_step(body, lora_body, act_btd, mask_bt, g_down_btd):
    _, body_fn, _ = client.split_segments(spec, (None, body, None), {"attention_mask": mask_bt})
    if server_lora == "frozen":
      act, vjp = jax.vjp(lambda a: body_fn(None, a), act_btd)
      return act, vjp(g_down_btd)[0]
    act, vjp = jax.vjp(body_fn, lora_body, act_btd)
    return (act, *vjp(g_down_btd))

  def tail_step(tail, lora_tail, act_btd, batch):
    _, _, tail_fn = client.split_segments(spec, (None, None, tail), batch)
    (loss, _), vjp = jax.vjp(lambda lt, a: tail_fn(lt, a, None), lora_tail, act_btd)
    return (loss, *vjp((jnp.ones_like(loss), jnp.zeros(()))))

  return {"client_head": head_step, "server_body": body_step, "client_tail": tail_step}


def _segment_args(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int):
  act = jax.ShapeDtypeStruct((b, t, config.hidden_size), config.dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  if name == "client_head":
    return (params, lora, ids, ids, act)
  if name == "server_body":
    return (params, lora, act, ids, act)
  # Loss at every position, as the released code trained (train_on_inputs=True): the head's worst case.
  batch = {"input_ids": ids, "attention_mask": ids, "target_index": ids, "target_mask": ids,
           "example_mask": jax.ShapeDtypeStruct((b,), jnp.int32)}
  return (params, lora, act, batch)


@dataclasses.dataclass(frozen=True)
class SegmentCost:
  """XLA's view of one compiled segment (bytes; `flops` for the whole batch)."""

  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  param_bytes: int  # bytes of the parameter and adapter arguments (counted as held params elsewhere)
  flops: float

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def working_bytes(self) -> int:
    return self.peak_bytes - self.param_bytes


_ANALYSES: dict = {}  # memo: (config, segment, shapes, b, t, server_lora) -> (memory stats, param bytes, flops)


def _shape_key(tree: PyTree) -> tuple:
  return (str(jax.tree.structure(tree)), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)))


def _analyse(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int,
             server_lora: str) -> tuple[Any, int, float]:
  """Compiles one segment for `[b, t]` from shapes: (XLA memory stats, parameter-argument bytes, raw flops).

  Memoised: compiling a scanned fwd+bwd takes seconds, and every k shares the tail and many shapes.
  """
  if name == "server_body" and server_lora == "frozen":
    lora = None
  params, lora = _abstract(params), None if lora is None else _abstract(lora)
  key = (config, name, _shape_key(params), _shape_key(lora), b, t, server_lora)
  if key not in _ANALYSES:
    fn = segment_fns(config, server_lora)[name]
    compiled = jax.jit(fn).lower(*_segment_args(config, name, params, lora, b, t)).compile()
    _ANALYSES[key] = (compiled.memory_analysis(), nbytes(params) + (0 if lora is None else nbytes(lora)),
                      _flops(compiled))
  return _ANALYSES[key]


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _compiled_cost(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int,
                   server_lora: str) -> SegmentCost:
  """XLA's memory stats of the segment compiled with its real block count, and XLA's raw FLOP count."""
  mem, param_bytes, raw_flops = _analyse(config, name, params, lora, b, t, server_lora)
  return SegmentCost(int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
                     int(mem.alias_size_in_bytes), int(param_bytes), raw_flops)


def segment_cost(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int, *,
                 server_lora: str = "per_client") -> SegmentCost:
  """Memory (compiled with the segment's real block count) and FLOPs (extrapolated from 0 and 1 blocks;
  `_analyse` memoises those calibration compiles, which every k shares)."""
  cost = _compiled_cost(config, name, params, lora, b, t, server_lora)
  n = jax.tree.leaves(params["blocks"])[0].shape[0]
  if n <= 1:  # 0 or 1 loop trips: XLA removes/inlines the loop, so the count is exact
    return cost
  resize = lambda tree, m: None if tree is None else _with_blocks(tree, m)
  f0, f1 = (_analyse(config, name, resize(params, m), resize(lora, m), b, t, server_lora)[2] for m in (0, 1))
  return dataclasses.replace(cost, flops=f0 + n * (f1 - f0))


def _footprint(split: dict[str, Any], working_bytes: int) -> int:
  """Client base params + adapters + optimizer state (from `param_split`) + working memory."""
  return int(split["client_param_bytes"] + split.get("client_lora_bytes", 0) + split.get("client_opt_bytes", 0)
             + working_bytes)


# ----------------------------------------------------------------------------- the per-k report

def traffic_per_step(config: ModelConfig, b: int, t: int) -> dict[str, int]:
  """Bytes crossing the cut in one micro-batch (`federated.client.cut_traffic` of its activation shapes)."""
  from federated import client
  act = jax.ShapeDtypeStruct((b, t, config.hidden_size), config.dtype)
  return client.cut_traffic(act, act, act, act)


def report(config: ModelConfig, k: int, *, batch_size: int, seq_len: int, base: Params | None = None,
           lora: Params | None = None, tx: optax.GradientTransformation | None = None,
           server_lora: str = "per_client", micro_per_round: int | None = None) -> dict[str, Any]:
  """Everything about cut k for one client training on `[batch_size, seq_len]` micro-batches.

  `base`/`lora` default to abstract shapes of `config`. `micro_per_round` (micro-batches per local
  round) turns per-step traffic into per-round traffic, plus the adapter exchange for aggregation
  (the client uploads and downloads the adapters it holds; the server already holds the body's).
  """
  base = abstract_params(config) if base is None else base
  lora = abstract_lora(config, base) if lora is None and config.lora is not None else lora
  out = {"k": k, "batch_size": batch_size, "seq_len": seq_len} | param_split(
      config, base, k, lora=lora, tx=tx, server_lora=server_lora)
  segs = dict(zip(("client_head", "server_body", "client_tail"), split_shapes(config, base, k)))
  lsegs = dict(zip(segs, split_shapes(config, lora, k))) if lora is not None else dict.fromkeys(segs)
  costs = {}
  for name in segs:
    costs[name] = segment_cost(config, name, segs[name], lsegs[name], batch_size, seq_len, server_lora=server_lora)
  for name, c in costs.items():
    out[name] = dataclasses.asdict(c) | {"peak_bytes": c.peak_bytes, "working_bytes": c.working_bytes}
  client_flops = costs["client_head"].flops + costs["client_tail"].flops
  out |= {"client_flops_per_example": client_flops / batch_size,
          "server_flops_per_example": costs["server_body"].flops / batch_size}
  out["client_share_flops"] = client_flops / max(client_flops + costs["server_body"].flops, 1.0)
  out["client_peak_bytes"] = max(costs["client_head"].peak_bytes, costs["client_tail"].peak_bytes)
  out["server_peak_bytes"] = costs["server_body"].peak_bytes
  out["client_footprint_bytes"] = _footprint(out, costs["client_head"].working_bytes
                                             + costs["client_tail"].working_bytes)
  step = traffic_per_step(config, batch_size, seq_len)
  out |= {"bytes_up_per_step": step["up"], "bytes_down_per_step": step["down"]}
  if micro_per_round is not None:
    adapters = out.get("client_lora_bytes", 0)
    out |= {"micro_per_round": micro_per_round,
            "bytes_up_per_round": micro_per_round * step["up"] + adapters,
            "bytes_down_per_round": micro_per_round * step["down"] + adapters}
  return out


# ----------------------------------------------------------------------------- flexible storage

def client_footprint_bytes(config: ModelConfig, k: int, batch_size: int, seq_len: int, *,
                           tx: optax.GradientTransformation | None = None, server_lora: str = "per_client",
                           base: Params | None = None, lora: Params | None = None) -> int:
  """Client base params + adapters + optimizer state + working memory of its two compiled segments.
  `base`/`lora` default to abstract shapes of `config`."""
  base = abstract_params(config) if base is None else base
  lora = abstract_lora(config, base) if lora is None else lora
  split = param_split(config, base, k, lora=lora, tx=tx, server_lora=server_lora)
  head, _, tail = split_shapes(config, base, k)
  l_head, _, l_tail = split_shapes(config, lora, k) if lora is not None else (None, None, None)
  working = sum(_compiled_cost(config, name, p, l, batch_size, seq_len, server_lora).working_bytes
                for name, p, l in (("client_head", head, l_head), ("client_tail", tail, l_tail)))
  return _footprint(split, working)


def choose_split_k(config: ModelConfig, budget_mb: float, batch_size: int, seq_len: int, *,
                   tx: optax.GradientTransformation | None = None, server_lora: str = "per_client") -> int:
  """The largest k in [0, L-1] whose `client_footprint_bytes` fits `budget_mb` MiB.

  The footprint grows with k (more blocks, adapters, optimizer state and residuals on the client), so
  a binary search compiles O(log L) head segments. Raises ValueError when even k=0 does not fit.
  """
  budget = budget_mb * MIB
  base = abstract_params(config)
  lora = abstract_lora(config, base)
  footprint = lambda k: client_footprint_bytes(config, k, batch_size, seq_len, tx=tx, server_lora=server_lora,
                                               base=base, lora=lora)
  fits = lambda k: footprint(k) <= budget
  lo, hi = 0, config.num_layers - 1
  smallest = footprint(lo)
  if smallest > budget:
    raise ValueError(f"client memory budget {budget_mb} MiB is below the k=0 footprint ({smallest / MIB:.1f} MiB: "
                     f"embeddings, last block, head and their working memory for batch {batch_size}x{seq_len})")
  while lo < hi:  # invariant: fits(lo)
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
  return lo


def table(rows: list[dict[str, Any]]) -> str:
  """A fixed-width text table of per-k reports (MiB, GFLOP per example)."""
  cols = [("k", "k", lambda r: f"{r['k']}"),
          ("client params", "cp", lambda r: f"{r['client_params'] / 1e6:.1f}M"),
          ("server params", "sp", lambda r: f"{r['server_params'] / 1e6:.1f}M"),
          ("client %", "cs", lambda r: f"{100 * r['client_share_params']:.1f}"),
          ("client MiB", "cb", lambda r: f"{(r['client_param_bytes'] + r.get('client_lora_bytes', 0) + r.get('client_opt_bytes', 0)) / MIB:.1f}"),
          ("client peak MiB", "pk", lambda r: f"{r['client_peak_bytes'] / MIB:.1f}"),
          ("footprint MiB", "fp", lambda r: f"{r['client_footprint_bytes'] / MIB:.1f}"),
          ("server peak MiB", "sk", lambda r: f"{r['server_peak_bytes'] / MIB:.1f}"),
          ("client GFLOP/ex", "cf", lambda r: f"{r['client_flops_per_example'] / 1e9:.2f}"),
          ("server GFLOP/ex", "sf", lambda r: f"{r['server_flops_per_example'] / 1e9:.2f}"),
          ("client FLOP %", "cfs", lambda r: f"{100 * r['client_share_flops']:.1f}"),
          ("up MiB/step", "up", lambda r: f"{r['bytes_up_per_step'] / MIB:.2f}")]
  cells = [[c[0] for c in cols]] + [[c[2](r) for c in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


# ----------------------------------------------------------------------------- process memory of a round

GIB = 2 ** 30


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def process_rss_bytes() -> int:
  """Resident set size of this process now (Linux /proc/self/statm); elsewhere its peak so far, an
  upper bound (macOS has no cheap current RSS without psutil)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return peak_rss_bytes()


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_headroom() -> int | None:
  """Bytes left under this process's cgroup memory limit (v2, then v1), None when unlimited or unknown."""
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    # v1 writes a huge page-aligned number for "no limit"; above 2^60 is no limit in practice
    if limit is not None and usage is not None and limit < 2 ** 60:
      return max(limit - usage, 0)
  return None


def available_memory_bytes() -> int:
  """Bytes other allocations of this machine can still take: MemAvailable from /proc/meminfo, or the
  cgroup's headroom when that is lower (a container's limit is what the OOM killer enforces). Off
  Linux: psutil's `available` when installed, else free physical pages, else total physical memory."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if avail is None:
    try:
      import psutil  # optional; macOS has no /proc
      avail = int(psutil.virtual_memory().available)
    except ImportError:
      for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
          avail = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
          break
        except (ValueError, OSError):
          continue
  headroom = _cgroup_headroom()
  if avail is None:
    return headroom if headroom is not None else 0
  return avail if headroom is None else min(avail, headroom)


def _spec(x, sharding=None) -> jax.ShapeDtypeStruct:
  """An abstract stand-in of `x` with its sharding (or `sharding`), so the lowering matches the real
  call's and the later real compile is served from JAX's compilation cache."""
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None else getattr(x, "sharding", None))


def _host_round_batches(engine) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one round's `round_batches`, `[C, S, A, B, ...]`, from one real stacked batch `[C, B, ...]`."""
  from fellrec_jax.data import pipeline  # data code is only needed here; keeps `import resources` light
  cfg = engine.cfg
  one = pipeline.batch_at(engine.train_examples, batch_size=cfg.batch_size, seed=cfg.seed, epoch=0, step=0)
  steps = engine.micro_per_round // cfg.grad_accum
  return {key: jax.ShapeDtypeStruct((x.shape[0], steps, cfg.grad_accum, *x.shape[1:]), x.dtype)
          for key, x in one.items()}


def _take(tree: PyTree, n: int) -> PyTree:
  """Shapes of the first n clients of a stacked tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class RoundProgram:
  """XLA's memory stats (bytes per device) of one compiled local round of `num_clients` clients cut at k."""

  k: int | None
  num_clients: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int

  @property
  def transient_bytes(self) -> int:
    """What the round allocates beyond its (already resident) arguments: XLA's scratch plus every output
    that does not reuse a donated input buffer."""
    return self.temp_bytes + self.output_bytes - self.alias_bytes


def _memory_stats(compiled) -> tuple[int, int, int, int]:
  mem = compiled.memory_analysis()
  mem = mem[0] if isinstance(mem, (list, tuple)) else mem
  return (int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes), int(mem.temp_size_in_bytes),
          int(mem.alias_size_in_bytes))


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
    out.append(RoundProgram(k, n_compiled, *_memory_stats(compiled)))
  return out


def heldout_program(engine, state) -> RoundProgram:
  """Memory stats of the engine's jitted held-out loss (`Engine.validate`) on abstract inputs."""
  fn = engine._heldout
  args = (jax.tree.map(_spec, engine.base), jax.tree.map(_spec, state.lora), jax.tree.map(_spec, engine.valid_batches))
  return RoundProgram(None, engine.num_clients, *_memory_stats(fn.lower(*args).compile()))


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


def _device_limit(engine) -> int | None:
  """Bytes one accelerator of the mesh can allocate (None on CPU, where device memory is host memory)."""
  device = engine.mesh.devices.flat[0]
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  return stats.get("bytes_limit")


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
    round_outputs:   round outputs that do not reuse a donated buffer (new adapters, statistics) x devices;
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
  programs = round_programs(engine, state)
  heldout = heldout_program(engine, state) if with_heldout else None
  if own_state:
    del state  # released before RSS is read: the run allocates its own
  devices = _devices_per_host(engine)
  round_batches = nbytes(_host_round_batches(engine))
  worst = max(programs, key=lambda p: p.transient_bytes)
  device_limit = _device_limit(engine)
  device_peak = max(p.argument_bytes + p.transient_bytes for p in programs + ([heldout] if heldout else []))
  terms = {
      "resident": process_rss_bytes(),
      "state": state_bytes if own_state else 0,
      "host_batches": round_batches,
      "device_batches": round_batches,
      "round_temp": worst.temp_bytes * devices,
      "round_outputs": (worst.output_bytes - worst.alias_bytes) * devices,
      "regroup": (3 * state_bytes // 4 + round_batches) if len(programs) > 1 else 0,  # lora + opt of one take/put
  }
  if engine.cfg.client_execution == "sequential":  # the loop stacks every client's new state, undonated
    terms["round_outputs"] = (worst.output_bytes - worst.alias_bytes) * engine.num_clients * devices
  round_transient = terms["round_temp"] + terms["round_outputs"] + 2 * round_batches
  terms["heldout_extra"] = 0 if heldout is None else max(0, heldout.transient_bytes * devices - round_transient)
  if device_limit is not None:  # these live in accelerator memory
    terms |= dict.fromkeys(("state", "device_batches", "round_temp", "round_outputs", "regroup", "heldout_extra"), 0)
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
  available = available_memory_bytes() if available is None else available
  budget = est["resident"] + available
  parts = ", ".join(f"{name} {_gib(est[name])}" for name in
                    ("resident", "state", "host_batches", "device_batches", "round_temp", "round_outputs",
                     "regroup", "heldout_extra") if est[name])
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

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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import models
from fellrec_jax.host_memory import MIB
from fellrec_jax.xla_stats import ProgramMemory, xla_cost
from models.config import ModelConfig
from models.transformer import Params

PyTree = Any


# ----------------------------------------------------------------------------- shapes and counts

def abstract_params(config: ModelConfig) -> Params:
  """Base parameter shapes (ShapeDtypeStructs in `param_dtype`), no memory allocated."""
  return jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))


def abstract_lora(config: ModelConfig) -> Params | None:
  """LoRA adapter shapes (fp32), or None when `config.lora` is None."""
  if config.lora is None:
    return None
  return jax.eval_shape(lambda: models.init_lora(config, jax.random.key(0)))


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentCost(ProgramMemory):
  """XLA's view of one compiled segment (bytes; `flops` for the whole batch)."""

  param_bytes: int  # bytes of the parameter and adapter arguments (counted as held params elsewhere)
  flops: float

  @property
  def working_bytes(self) -> int:
    return self.peak_bytes - self.param_bytes


_ANALYSES: dict = {}  # memo: (config, segment, shapes, b, t, server_lora) -> (memory, param bytes, flops)


def _shape_key(tree: PyTree) -> tuple:
  return (str(jax.tree.structure(tree)), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(tree)))


def _analyse(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int,
             server_lora: str) -> tuple[ProgramMemory, int, float]:
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
    _ANALYSES[key] = (ProgramMemory.of(compiled), nbytes(params) + (0 if lora is None else nbytes(lora)),
                      xla_cost(compiled)["flops"])
  return _ANALYSES[key]


def _compiled_cost(config: ModelConfig, name: str, params: Params, lora: Params | None, b: int, t: int,
                   server_lora: str) -> SegmentCost:
  """XLA's memory stats of the segment compiled with its real block count, and XLA's raw FLOP count."""
  mem, param_bytes, raw_flops = _analyse(config, name, params, lora, b, t, server_lora)
  return SegmentCost(**dataclasses.asdict(mem), param_bytes=int(param_bytes), flops=raw_flops)


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
  lora = abstract_lora(config) if lora is None and config.lora is not None else lora
  out = {"k": k, "batch_size": batch_size, "seq_len": seq_len} | param_split(
      config, base, k, lora=lora, tx=tx, server_lora=server_lora)
  segs = dict(zip(("client_head", "server_body", "client_tail"), split_shapes(config, base, k)))
  lsegs = dict(zip(segs, split_shapes(config, lora, k))) if lora is not None else dict.fromkeys(segs)
  costs = {}
  for name in segs:
    costs[name] = segment_cost(config, name, segs[name], lsegs[name], batch_size, seq_len, server_lora=server_lora)
  for name, c in costs.items():
    out[name] = c.as_dict() | {"working_bytes": c.working_bytes}
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
  lora = abstract_lora(config) if lora is None else lora
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
  lora = abstract_lora(config)
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

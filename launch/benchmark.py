"""Performance benchmarks: `python -m launch.benchmark [--quick] [--gpu] [--out benchmark.json]`.

Sections (each prints a table row per measurement and lands in the JSON under its key):
  client_execution  round time and tokens/s of C clients, vmapped vs sequential, same data and model
  mfu               achieved FLOP/s of the vmapped training round / peak FLOP/s
  loss_positions    the round with the loss (and the head) on every token vs on a short response
  cpu_round         where a movielens_smollm2_cpu local step's time goes (cutoff, template, dropout, split, loss)
  aggregation       jitted `fellrec_aggregate` time vs a roofline (bandwidth and compute)
  scale             most simulated clients per round that fit this machine (SmolLM2-135M adapters + AdamW)
  original_design   the released code's pattern (clients one by one, base reloaded per client) vs ours

Everything uses synthetic token batches and randomly initialised weights of the real shapes (timings
do not depend on the values), except the original-design section, which reloads weights from disk as
the released code does. Timings are medians over `--repeats` calls after one warm-up (compile) call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any, Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes only (about a minute on 2 CPU cores).")
flags.DEFINE_bool("gpu", False, "GPU figures: bf16 SmolLM2 with C*B >= 64, published chip peak for MFU.")
flags.DEFINE_string("out", "benchmark.json", "Where the JSON results go.")
flags.DEFINE_list("sections", ["client_execution", "mfu", "loss_positions", "cpu_round", "aggregation", "scale",
                                "original_design"],
                  "Sections to run.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported), after one warm-up call.")
flags.DEFINE_integer("exec_clients", 16, "Clients per round for the client-execution section (tiny-llama).")
flags.DEFINE_integer("exec_batch_size", 2, "Per-client micro-batch size B of the client-execution section.")
flags.DEFINE_integer("exec_seq_len", 32, "Tokens per example T of the client-execution section.")
flags.DEFINE_integer("exec_local_steps", 2, "Local optimizer steps S per round of the client-execution section.")
flags.DEFINE_integer("scale_group_size", 16, "Clients per vmapped group (client_group_size) in the scale section.")
flags.DEFINE_bool("scale_run", None, "Also run one full round at the largest client count (slow on CPU); "
                  "default: on with --gpu, off otherwise.")
flags.DEFINE_float("memory_fraction", 0.9, "Share of the available memory the scale section may plan to use.")

PyTree = Any

# Published dense bf16 peaks (FLOP/s, no sparsity) by `device_kind` substring; first match wins.
GPU_PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12),
             ("A100", 312e12), ("L4", 121e12), ("A10", 125e12), ("V100", 125e12))
GIB = 1024 ** 3


# ============================================================================ small utilities

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


def available_memory_bytes() -> int:
  """Host memory the process may still use (MemAvailable); on an accelerator, its free memory."""
  import jax
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
    if line.startswith("MemAvailable:"):
      return int(line.split()[1]) * 1024
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_rss_bytes() -> int:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Table:
  """Prints rows as they come (progress) and keeps them for the summary."""

  def __init__(self, title: str, columns: list[str]):
    self.title, self.columns, self.rows = title, columns, []
    print(f"\n== {title}\n" + " | ".join(f"{c:>14}" for c in columns), flush=True)

  def add(self, *values):
    cells = [f"{v:>14.4g}" if isinstance(v, float) else f"{str(v):>14}" for v in values]
    self.rows.append(values)
    print(" | ".join(cells), flush=True)


# ============================================================================ FLOPs and machine peaks

def jaxpr_flops(fn: Callable, *args) -> float:
  """Matmul FLOPs of `fn(*args)` counted from its jaxpr: `2 * batch * M * N * K` per `dot_general`,
  scan bodies multiplied by their length, nested jaxprs (jit, remat, custom_vjp, cond: max branch) recursed.

  Why not XLA's `cost_analysis()` alone: on CPU it counts a while-loop body once, and our round is a scan
  over steps, micro-batches and layers, so it undercounts by roughly their product. Elementwise work
  (norms, softmax, optimizer) is left out, as in the usual MFU definition.
  """
  import jax
  return _count_jaxpr(jax.make_jaxpr(fn)(*args).jaxpr)


def _count_jaxpr(jaxpr) -> float:
  from jax.extend import core
  kinds = (core.Jaxpr, core.ClosedJaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
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
    inner = [_count_jaxpr(s.jaxpr if isinstance(s, core.ClosedJaxpr) else s) for s in subs]
    if not inner:
      continue
    if name == "cond":
      total += max(inner)
    elif name == "scan":
      total += eqn.params["length"] * sum(inner)
    else:  # while loops (trip count unknown: counted once), pjit, remat, custom_jvp/vjp
      total += sum(inner)
  return total


def xla_cost(compiled) -> dict:
  """XLA's own cost analysis of a compiled program (flops and bytes; loop bodies counted once on CPU)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def measure_matmul_peak(n: int, dtype: str, repeats: int) -> float:
  """FLOP/s of one large `n x n` matmul (median) -- the practical CPU peak MFU is measured against."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  matmul = jax.jit(jnp.matmul)
  seconds, _ = median_seconds(lambda: matmul(a, b), repeats)
  return 2.0 * n ** 3 / seconds


def measure_bandwidth(nbytes: int, repeats: int) -> dict:
  """Memory bandwidth from a large fp32 array: a sum (read once) and a scale (read + write)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  read, _ = median_seconds(lambda: total(x), repeats)
  # Donated so the output reuses the input's pages: a fresh output buffer each call would time the
  # kernel's first-touch page faults rather than the memory bus.
  scale = jax.jit(lambda v: v + 1.0, donate_argnums=0)
  state = [jnp.ones((nbytes // 4,), jnp.float32)]

  def scale_in_place():
    state[0] = scale(state[0])
    return state[0]
  copy, _ = median_seconds(scale_in_place, repeats)
  return {"read_bytes_per_s": nbytes / read, "copy_bytes_per_s": 2 * nbytes / copy,
          "bytes_per_s": max(nbytes / read, 2 * nbytes / copy), "array_bytes": nbytes}


def device_peak_flops(repeats: int) -> tuple[float, str]:
  """(peak FLOP/s, how it was obtained): a published bf16 dense peak on GPU, a measured matmul on CPU."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == "gpu":
    for key, peak in GPU_PEAKS:
      if key in dev.device_kind:
        return peak, f"published dense bf16 peak of {dev.device_kind}"
    logging.warning("unknown GPU %r: measuring a bf16 matmul instead of a published peak", dev.device_kind)
    return measure_matmul_peak(8192, "bfloat16", repeats), f"measured 8192^2 bf16 matmul on {dev.device_kind}"
  n = 4096
  return measure_matmul_peak(n, "float32", repeats), f"measured {n}^2 fp32 matmul (median of {repeats})"


# ============================================================================ models and data

def smollm2_config(dtype: str = "float32", lora=None):
  """SmolLM2-135M's shapes (random weights are enough for timing and memory)."""
  import models
  return models.ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                            num_kv_heads=3, head_dim=64, intermediate_size=1536, tie_embeddings=True,
                            rope_theta=100000.0, max_positions=8192, param_dtype=dtype, compute_dtype=dtype,
                            lora=lora or models.LoraConfig(rank=8, targets=("q", "v")))


def make_model(name: str, dtype: str = "float32"):
  """`(config, base params)`: tiny-llama (r=8 q,v adapters) or SmolLM2-135M shapes, random init."""
  import jax
  import models
  lora = models.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q", "v"))
  if name == "tiny-llama":
    config, base, _ = models.load("tiny-llama", dtype=dtype, lora=lora)
    return config, base
  if name == "smollm2-135m":
    config = smollm2_config(dtype, lora)
    return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))
  raise ValueError(f"unknown benchmark model {name!r}")


def synthetic_batches(num_clients: int, steps: int, accum: int, batch: int, seq_len: int, vocab: int,
                      pad_id: int = 0, seed: int = 0, response_tokens: int | None = None) -> dict:
  """Right-padded random token batches `[C, S, A, B, T]` with lengths in `[T/2, T]`. The targets are the
  last `response_tokens` real tokens of each row (a BIGRec response), or every real token after the
  first when None (train_on_inputs); `target_index` rows have R = T-1 or `response_tokens` entries."""
  import numpy as np
  from fellrec_jax.data import pipeline
  rng = np.random.default_rng(seed)
  shape = (num_clients, steps, accum, batch)
  lengths = rng.integers(max(2, seq_len // 2), seq_len + 1, shape)
  attention = (np.arange(seq_len) < lengths[..., None]).astype(np.int32)
  ids = np.where(attention > 0, rng.integers(1, vocab, (*shape, seq_len)), pad_id).astype(np.int32)
  loss_mask = np.zeros_like(attention)
  loss_mask[..., :-1] = attention[..., 1:]
  if response_tokens is not None:
    loss_mask *= np.arange(seq_len) >= (lengths - 1 - response_tokens)[..., None]
  target_index, target_mask = pipeline.targets_from_loss_mask(
      loss_mask, seq_len - 1 if response_tokens is None else response_tokens)
  return {"input_ids": ids, "attention_mask": attention, "target_index": target_index, "target_mask": target_mask,
          "example_mask": np.ones(shape, np.float32)}


@dataclasses.dataclass
class Round:
  """One benchmark round's inputs: the shared base and the stacked per-client state and data."""

  config: Any
  base: PyTree
  lora: PyTree
  opt_state: PyTree
  batches: dict
  keys: Any
  tx: Any

  @property
  def num_clients(self) -> int:
    import jax
    return jax.tree.leaves(self.lora)[0].shape[0]

  def args(self):
    return self.base, self.lora, self.opt_state, self.batches, self.keys

  def tokens(self) -> int:
    """Tokens the round pushes through the model (real, unpadded ones)."""
    return int(self.batches["attention_mask"].sum())

  def target_tokens(self) -> int:
    return int((self.batches["target_mask"] * self.batches["example_mask"][..., None]).sum())


def make_round(config, base, num_clients: int, steps: int, batch: int, seq_len: int, accum: int = 1,
               response_tokens: int | None = None) -> Round:
  import jax
  import jax.numpy as jnp
  import models
  from federated import engine
  tx = __import__("optax").adamw(1e-3)
  lora = engine.stack_clients(models.init_lora(config, base, jax.random.key(1)), num_clients)
  lora = jax.tree.map(jnp.array, lora)  # materialise the broadcast: every client owns its copy
  batches = {k: jnp.asarray(v) for k, v in synthetic_batches(
      num_clients, steps, accum, batch, seq_len, config.vocab_size, config.pad_id,
      response_tokens=response_tokens).items()}
  return Round(config, base, lora, jax.vmap(tx.init)(lora), batches,
               jax.random.split(jax.random.key(0), num_clients), tx)


def local_update(rnd: Round):
  from federated import client
  return client.make_local_update(client.LocalSpec(rnd.config), rnd.tx)


# ============================================================================ 1. client execution (+ 2. MFU)

def presliced_sequential(update):
  """Clients one after another with each client's state and data already held separately -- the
  per-client jit dispatch alone, without the slicing/stacking `over_clients(..., "sequential")` adds."""
  import jax
  one = jax.jit(update)

  def run(base, per_client):
    return [one(base, *args) for args in per_client]
  return run


def time_client_execution(name: str, rnd: Round, repeats: int, table: Table, peak_flops: float | None) -> dict:
  """vmap vs sequential round time on identical inputs; FLOPs from the jaxpr and XLA for MFU."""
  import jax
  from federated import client
  update = local_update(rnd)
  vmapped = jax.jit(client.over_clients(update, "vmap"))
  compiled = vmapped.lower(*rnd.args()).compile()
  flops = jaxpr_flops(client.over_clients(update, "vmap"), *rnd.args())
  sequential = client.over_clients(update, "sequential")
  per_client = [jax.tree.map(lambda x, c=c: x[c], rnd.args()[1:]) for c in range(rnd.num_clients)]
  presliced = presliced_sequential(update)

  t_vmap, all_vmap = median_seconds(lambda: compiled(*rnd.args()), repeats)
  t_seq, all_seq = median_seconds(lambda: sequential(*rnd.args()), repeats)
  t_pre, _ = median_seconds(lambda: presliced(rnd.base, per_client), repeats)
  tokens, shape = rnd.tokens(), dict(zip("CSABT", rnd.batches["input_ids"].shape))
  result = {"model": name, "shape": shape, "tokens_per_round": tokens, "target_tokens_per_round": rnd.target_tokens(),
            "vmap_seconds": t_vmap, "sequential_seconds": t_seq, "sequential_presliced_seconds": t_pre,
            "vmap_tokens_per_s": tokens / t_vmap, "sequential_tokens_per_s": tokens / t_seq,
            "speedup": t_seq / t_vmap, "speedup_vs_presliced": t_pre / t_vmap,
            "vmap_all_seconds": all_vmap, "sequential_all_seconds": all_seq,
            "flops_per_round_jaxpr": flops, "xla_cost_analysis": xla_cost(compiled),
            "achieved_flops_per_s": flops / t_vmap}
  if peak_flops:
    result["mfu"] = flops / t_vmap / peak_flops
  table.add(name, "x".join(str(v) for v in shape.values()), t_vmap, t_seq, t_pre, tokens / t_vmap, t_seq / t_vmap,
            result.get("mfu", float("nan")))
  return result


def client_execution_section(quick: bool, gpu: bool, repeats: int, peak_flops: float) -> dict:
  """Headline: tiny-llama at C=--clients. Full mode adds a per-client-size sweep and SmolLM2-135M."""
  table = Table("client execution: one local round, vmap vs sequential (median seconds)",
                ["model", "CxSxAxBxT", "vmap s", "sequential s", "seq presliced", "vmap tok/s", "speedup", "MFU"])
  runs = []
  if not gpu:
    config, base = make_model("tiny-llama")
    shapes = [(FLAGS.exec_batch_size, FLAGS.exec_seq_len)]
    if not quick:  # how the win depends on per-client work: vmap removes a per-client fixed cost
      shapes += [(1, 32), (4, 64), (8, 128)]
    for b, t in dict.fromkeys(shapes):
      rnd = make_round(config, base, FLAGS.exec_clients, FLAGS.exec_local_steps, b, t)
      runs.append(time_client_execution("tiny-llama", rnd, repeats, table, peak_flops))
  if gpu or not quick:
    dtype = "bfloat16" if gpu else "float32"
    config, base = make_model("smollm2-135m", dtype)
    c, b, t = (16, 4, 256) if gpu else (4, 2, 64)  # GPU: C*B = 64 sequences per step
    rnd = make_round(config, base, c, 2 if gpu else 1, b, t)
    runs.append(time_client_execution(f"smollm2-135m/{dtype}", rnd, repeats if gpu else min(repeats, 5), table,
                                      peak_flops))
  return {"speedup": runs[0]["speedup"], "headline": runs[0]["model"] + " " + str(runs[0]["shape"]), "runs": runs}


def mfu_summary(execution: dict, peak_flops: float, peak_source: str) -> dict:
  """MFU of every client-execution run; the headline is the largest model measured."""
  runs = [{k: r[k] for k in ("model", "shape", "flops_per_round_jaxpr", "vmap_seconds", "achieved_flops_per_s", "mfu")}
          for r in execution["runs"]]
  head = runs[-1]
  return {"value": head["mfu"], "headline": f"{head['model']} {head['shape']}", "peak_flops_per_s": peak_flops,
          "peak_source": peak_source, "runs": runs,
          "flops_method": "matmul FLOPs (2*M*N*K per dot_general) counted from the jaxpr of the vmapped round, "
                          "scan bodies x length; forward + backward through the frozen base (no base weight "
                          "grads) + LoRA grads; elementwise ops excluded. xla_cost_analysis in the runs is XLA's "
                          "own count, which on CPU counts loop bodies once."}


def loss_positions_section(quick: bool, gpu: bool, repeats: int, model: str = "smollm2-135m") -> dict:
  """A vmapped round with the loss on every token (train_on_inputs: the head and its fp32 logits at T-1
  positions) vs on a 16-token response (BIGRec's default: the head at 16 positions)."""
  import jax
  from federated import client
  dtype = "bfloat16" if gpu else "float32"
  config, base = make_model(model, dtype)
  c, b, t = (16, 4, 256) if gpu else ((2, 1, 64) if quick else (4, 2, 128))
  table = Table(f"loss positions: {model}/{dtype}, vmapped round, C={c} B={b} T={t}",
                ["targets", "seconds", "peak GB", "target tok/s"])
  runs = {}
  for name, response in (("every_token", None), ("response_16", 16)):
    rnd = make_round(config, base, c, 1, b, t, response_tokens=response)
    compiled = jax.jit(client.over_clients(local_update(rnd), "vmap")).lower(*rnd.args()).compile()
    seconds, _ = median_seconds(lambda: compiled(*rnd.args()), repeats)
    mem = compiled_memory(compiled)
    runs[name] = {"seconds": seconds, "peak_bytes": mem["peak_bytes"], "target_tokens": rnd.target_tokens(),
                  "head_positions": int(rnd.batches["target_index"].shape[-1])}
    table.add(name, seconds, mem["peak_bytes"] / 1e9, rnd.target_tokens() / seconds)
  return {"model": f"{model}/{dtype}", "shape": {"C": c, "B": b, "T": t}, "runs": runs,
          "speedup": runs["every_token"]["seconds"] / runs["response_16"]["seconds"],
          "memory_ratio": runs["every_token"]["peak_bytes"] / runs["response_16"]["peak_bytes"]}


def cpu_round_section(quick: bool, repeats: int, model: str = "smollm2-135m") -> dict:
  """Where a `movielens_smollm2_cpu.flags` local step's time goes: one client unbatched (as
  `--client_group_size=1`), B=8, LoRA r=8 on q/v with dropout 0.05, split at k=19, the loss on a 14-token
  response (a quoted title + eos, on average), T=200 (the preset's `--cutoff_len`), against one change at
  a time: no cutoff (T=248, the longest compact example), the Alpaca template (T=312, its longest), no
  dropout, no split, the loss on every token. `vs_preset`: seconds per step / the preset's."""
  import jax
  from federated import client
  config, base = make_model(model)
  b, t, k, response = (2, 32, 1, 4) if quick else (8, 200, 19, 14)
  longer = lambda n: n * t // 200
  variants = {"preset": {}, "no_cutoff": {"t": longer(248)}, "alpaca_prompt": {"t": longer(312)},
              "no_dropout": {"dropout": 0.0}, "unsplit": {"k": None}, "loss_every_token": {"response": None}}
  table = Table(f"cpu round: {model}, one client, B={b}, split k={k}", ["variant", "T", "s/step", "tok/s", "x preset"])
  runs = {}
  for name, change in variants.items():
    cfg = dataclasses.replace(config, lora=dataclasses.replace(config.lora, dropout=change.get("dropout", 0.05)))
    seq_len = change.get("t", t)
    rnd = make_round(cfg, base, 1, 1, b, seq_len, response_tokens=change.get("response", response))
    update = client.make_local_update(client.LocalSpec(cfg, split_k=change.get("k", k)), rnd.tx)
    one = jax.jit(lambda base, *per_client: update(base, *jax.tree.map(lambda x: x[0], per_client)))
    compiled = one.lower(*rnd.args()).compile()
    seconds, _ = median_seconds(lambda: compiled(*rnd.args()), repeats)
    runs[name] = {"T": seq_len, "seconds_per_step": seconds, "padded_tokens_per_s": b * seq_len / seconds,
                  "vs_preset": seconds / runs["preset"]["seconds_per_step"] if runs else 1.0}
    table.add(name, seq_len, seconds, b * seq_len / seconds, runs[name]["vs_preset"])
  return {"model": model, "shape": {"B": b, "T": t, "split_k": k, "response_tokens": response}, "runs": runs}


# ============================================================================ 3. aggregation

def adapter_shapes(name: str) -> dict:
  """Per-client LoRA leaf shapes (r=8 on q and v), stacked on layers like `models.init_lora`."""
  if name == "smollm2-135m":
    layers, d, q_out, v_out = 30, 576, 576, 192
  elif name == "llama-7b":
    layers, d, q_out, v_out = 32, 4096, 4096, 4096
  else:
    raise ValueError(name)
  r = 8
  return {"q": {"a_ir": (layers, d, r), "b_ro": (layers, r, q_out)},
          "v": {"a_ir": (layers, d, r), "b_ro": (layers, r, v_out)}}


def synthetic_stack(shapes: dict, num_clients: int):
  """A stacked fp32 adapter pytree with distinct, cheap-to-make values per client."""
  import jax
  import jax.numpy as jnp

  @jax.jit
  def make():
    def leaf(shape, salt):
      full = (num_clients, *shape)
      c = jax.lax.broadcasted_iota(jnp.float32, full, 0)
      i = jax.lax.broadcasted_iota(jnp.float32, full, len(full) - 1)
      return jnp.sin(0.37 * c + 0.011 * i + salt)
    return jax.tree.map(leaf, shapes, {k: {kk: float(n) for n, kk in enumerate(v)} for k, v in shapes.items()},
                        is_leaf=lambda x: isinstance(x, tuple))
  return make()


def aggregation_section(quick: bool, repeats: int, bandwidth: float, peak_flops: float,
                        sizes: list | None = None) -> list[dict]:
  """`fellrec_aggregate` (jitted, fp32) for C in {5, 64, 256, 1024} x {SmolLM2, LLaMA-7B} adapters.

  Roofline model: the stack is read twice (Gram matrix pass, mixing pass) and the result written once,
  `3 * stack bytes / bandwidth`; the dense algorithm also needs `2 * 2 * C^2 * P` FLOPs (Gram + mix),
  so the roofline is `max(bytes / bandwidth, flops / peak)`. Both bounds are reported.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from federated import strategies
  table = Table("aggregation: fellrec_aggregate, fp32 adapters r=8 on q,v; FedAvg's weighted mean beside it, "
                "and FedAvg as the C x C mix it used to be",
                ["model", "C", "seconds", "stack GB", "bw roof s", "flop roof s", "roof fraction", "fedavg s",
                 "fedavg as CxC mix s"])
  agg = jax.jit(lambda stacked, losses, r: strategies.fellrec_aggregate(stacked, losses, r, alpha=0.7, beta=1.0))
  fedavg = jax.jit(strategies.fedavg_aggregate)
  fedavg_dense = jax.jit(lambda stacked, w: strategies.mix(stacked, jnp.broadcast_to(w, (w.shape[0], w.shape[0]))))
  budget = available_memory_bytes()
  results = []
  sizes = sizes or [("smollm2-135m", (5, 64, 256) if quick else (5, 64, 256, 1024)),
                    ("llama-7b", (5,) if quick else (5, 64, 256, 1024))]
  for model, counts in sizes:
    shapes = adapter_shapes(model)
    per_client = 4 * sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    for c in counts:
      stack_bytes = c * per_client
      entry = {"C": c, "model": model, "bytes": 3 * stack_bytes, "stack_bytes": stack_bytes,
               "params_per_client": per_client // 4}
      if 3.2 * stack_bytes > 0.9 * budget:  # input + output + a stack-sized temporary, with headroom
        entry |= {"seconds": None, "skipped": f"needs ~{3.2 * stack_bytes / GIB:.1f} GiB, "
                                              f"{budget / GIB:.1f} GiB available"}
        table.add(model, c, "skipped", stack_bytes / 1e9, "", "", entry["skipped"])
        results.append(entry)
        continue
      stacked = synthetic_stack(shapes, c)
      losses = jnp.asarray(np.random.default_rng(c).uniform(0.5, 2.0, c), jnp.float32)
      reps = repeats if stack_bytes < GIB else 3
      seconds, _ = median_seconds(lambda: agg(stacked, losses, 3), reps)
      fedavg_seconds, _ = median_seconds(lambda: fedavg(stacked, losses), reps)
      dense_seconds, _ = median_seconds(lambda: fedavg_dense(stacked, losses), reps)
      flops = 2 * 2.0 * c * c * (per_client // 4)
      t_bw, t_flop = 3 * stack_bytes / bandwidth, flops / peak_flops
      roof = max(t_bw, t_flop)
      entry |= {"seconds": seconds, "roofline_seconds": roof, "roofline_fraction": roof / seconds,
                "bandwidth_roofline_seconds": t_bw, "bandwidth_roofline_fraction": t_bw / seconds,
                "compute_roofline_seconds": t_flop, "flops": flops, "bound": "compute" if t_flop > t_bw else "memory",
                "fedavg_seconds": fedavg_seconds, "fedavg_dense_mix_seconds": dense_seconds}
      table.add(model, c, seconds, stack_bytes / 1e9, t_bw, t_flop, roof / seconds, fedavg_seconds, dense_seconds)
      results.append(entry)
      del stacked
  return results


# ============================================================================ 4. scale

def abstract_round(config, base, num_clients: int, steps: int, batch: int, seq_len: int, tx):
  """ShapeDtypeStructs of a round's arguments: compile for any C without allocating the state."""
  import jax
  import jax.numpy as jnp
  import models
  lora_one = jax.eval_shape(lambda: models.init_lora(config, base, jax.random.key(0)))
  stack = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct((num_clients, *x.shape), x.dtype), tree)
  lora = stack(lora_one)
  opt = stack(jax.eval_shape(tx.init, lora_one))
  shape = (num_clients, steps, 1, batch)
  batches = {"input_ids": jax.ShapeDtypeStruct((*shape, seq_len), jnp.int32),
             "attention_mask": jax.ShapeDtypeStruct((*shape, seq_len), jnp.int32),
             "target_index": jax.ShapeDtypeStruct((*shape, seq_len - 1), jnp.int32),  # as make_round: R = T-1
             "target_mask": jax.ShapeDtypeStruct((*shape, seq_len - 1), jnp.int32),
             "example_mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), num_clients))
  base_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
  return base_abs, lora, opt, batches, keys


def compiled_memory(compiled) -> dict:
  """Peak bytes of a compiled program from XLA's memory analysis: arguments + outputs + temporaries,
  less the output bytes aliased onto (donated) arguments."""
  m = compiled.memory_analysis()
  out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
         "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
  return out


def scale_section(quick: bool, gpu: bool, run_round: bool, model: str = "smollm2-135m", confirm: bool = True,
                  check_run: bool = True) -> dict:
  """Largest clients-per-round with SmolLM2-135M adapters (r=8 q,v) + AdamW, clients run g at a time.

  Memory is linear in C (per-client state, data and outputs) plus a fixed part (base weights, one
  group's activations): fit it from XLA's memory analysis at two sizes, solve for the budget, then
  confirm by compiling at that C (`confirm`). `run_round` runs one round at that C; otherwise `check_run`
  runs one group-sized round to show the program executes. The headline round donates the adapter and
  optimizer buffers, so the grouped loop updates the state in place; "engine" donates the optimizer
  state only (the engine keeps each round's starting adapters as the anchor), "undonated" nothing.
  """
  import jax
  import optax
  from federated import client, resources
  g = FLAGS.scale_group_size
  steps, batch, seq_len = 1, 1, 16
  config, base = make_model(model, "bfloat16" if gpu else "float32")
  tx = optax.adamw(1e-3)
  update = client.over_clients(client.make_local_update(client.LocalSpec(config), tx), "vmap", group_size=g)
  budget = int(available_memory_bytes() * FLAGS.memory_fraction)
  table = Table(f"scale: {model}, r=8 q,v + AdamW, groups of {g}, S={steps} B={batch} T={seq_len}",
                ["C", "donation", "peak GB", "budget GB", "fits", "compile s"])
  donations = {"donated": (1, 2), "engine": (2,), "undonated": ()}

  def memory(c: int, donate: str) -> dict:
    start = time.perf_counter()
    jitted = jax.jit(update, donate_argnums=donations[donate])
    mem = compiled_memory(jitted.lower(*abstract_round(config, base, c, steps, batch, seq_len, tx)).compile())
    table.add(c, donate, mem["peak_bytes"] / 1e9, budget / 1e9, mem["peak_bytes"] <= budget,
              time.perf_counter() - start)
    return mem

  one = abstract_round(config, base, 1, steps, batch, seq_len, tx)
  state_per_client = resources.nbytes(one[1]) + resources.nbytes(one[2])
  data_per_client = resources.nbytes(one[3])
  result = {"model": model, "group_size": g, "shape": {"S": steps, "A": 1, "B": batch, "T": seq_len}, "budget_bytes": budget,
            "base_bytes": resources.nbytes(base), "adapter_bytes_per_client": resources.nbytes(one[1]),
            "optimizer_bytes_per_client": resources.nbytes(one[2]), "state_bytes_per_client": state_per_client,
            "data_bytes_per_client": data_per_client}
  for donate in ("donated",) if (quick or gpu) else tuple(donations):
    lo, hi = 4 * g, 16 * g
    m_lo, m_hi = memory(lo, donate), memory(hi, donate)
    per_client = (m_hi["peak_bytes"] - m_lo["peak_bytes"]) / (hi - lo)
    fixed = m_lo["peak_bytes"] - per_client * lo
    best = int((budget - fixed) // per_client) // g * g
    confirmed = memory(best, donate) if confirm else None
    while confirm and confirmed["peak_bytes"] > budget and best > g:  # the linear fit was optimistic: step down
      best -= g
      confirmed = memory(best, donate)
    result[donate] = {"max_clients": best, "measured_bytes_per_client": per_client, "fixed_bytes": fixed,
                   "at_max": confirmed}
  result["max_clients"] = result["donated"]["max_clients"]
  # What the whole machine would hold (the budget above is what is free now, with other processes running).
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if jax.default_backend() == "cpu" else budget
  fit = result["donated"]
  result["max_clients_if_machine_free"] = int((total * FLAGS.memory_fraction - fit["fixed_bytes"])
                                              // fit["measured_bytes_per_client"]) // g * g
  result["machine_memory_bytes"] = total
  result["bytes_per_client"] = result["donated"]["measured_bytes_per_client"]
  result["measured"] = ("XLA memory_analysis of the compiled grouped round (peak = arguments + outputs + "
                        "temporaries - aliased) at several C; the round is " +
                        ("also run once at max_clients" if run_round else "not run at max_clients (too slow "
                         "here); one group-sized round is run to check the program executes"))
  if run_round or check_run:
    result["round"] = run_scale_round(config, base, update, result["max_clients"] if run_round else g, steps,
                                      batch, seq_len, tx)
  return result


def run_scale_round(config, base, update, num_clients: int, steps: int, batch: int, seq_len: int, tx) -> dict:
  """Runs one grouped round at `num_clients` (donated state) and reports time and peak RSS."""
  import jax
  logging.info("scale: running one round with %d clients", num_clients)
  rnd = make_round(config, base, num_clients, steps, batch, seq_len)
  rnd.tx = tx
  run = jax.jit(update, donate_argnums=(1, 2))
  start = time.perf_counter()
  out = block(run(*rnd.args()))
  seconds = time.perf_counter() - start
  finite = bool(jax.numpy.all(jax.numpy.isfinite(out[2]["loss"])))
  return {"clients": num_clients, "seconds_including_compile": seconds, "loss_finite": finite,
          "process_peak_rss_bytes": peak_rss_bytes()}


# ============================================================================ 5. against the original design

def save_base(base, path: pathlib.Path) -> None:
  """The base weights as one safetensors file, as a checkpoint on disk would hold them."""
  import numpy as np
  from safetensors.numpy import save_file
  import jax
  flat = {"/".join(str(getattr(k, "key", k)) for k in path_keys): np.asarray(x)
          for path_keys, x in jax.tree_util.tree_flatten_with_path(base)[0]}
  save_file(flat, str(path))


def reload_base(path: pathlib.Path, like):
  """Reads the base back from disk into a fresh device pytree (the released code's per-client reload)."""
  import jax
  import jax.numpy as jnp
  from safetensors.numpy import load_file
  flat = load_file(str(path))
  leaves = [jnp.asarray(flat["/".join(str(getattr(k, "key", k)) for k in keys)])
            for keys, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def original_design_section(quick: bool, repeats: int) -> list[dict]:
  """Our vmapped round vs clients trained one by one with the base reloaded from disk for each client."""
  import jax
  import models
  from federated import client
  table = Table("original design: sequential + base reload per client vs our vmapped round",
                ["model", "C", "reload from", "original s", "ours s", "ratio"])
  cases = [("tiny-llama", FLAGS.exec_clients, FLAGS.exec_batch_size, FLAGS.exec_seq_len, "safetensors")]
  if not quick:
    cases.append(("smollm2-135m", 4, 2, 64, "gguf"))
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, c, b, t, source in cases:
      if source == "gguf":
        config, base, _ = models.load("smollm2-135m", lora=models.LoraConfig(rank=8, targets=("q", "v")))
        reload = lambda: models.load("smollm2-135m")[1]  # re-reads and dequantizes the GGUF
      else:
        config, base = make_model(name)
        path = pathlib.Path(tmp) / f"{name}.safetensors"
        save_base(base, path)
        reload = lambda: reload_base(path, base)
      rnd = make_round(config, base, c, FLAGS.exec_local_steps, b, t)
      update = local_update(rnd)
      ours = jax.jit(client.over_clients(update, "vmap"))
      one = jax.jit(update)
      per_client = [jax.tree.map(lambda x, i=i: x[i], rnd.args()[1:]) for i in range(c)]

      def original():
        return [one(reload(), *args) for args in per_client]  # a fresh base per client, as released

      n = repeats if source != "gguf" else 2
      t_ours, _ = median_seconds(lambda: ours(*rnd.args()), n)
      t_orig, _ = median_seconds(original, n)
      results.append({"model": name, "C": c, "shape": dict(zip("CSABT", rnd.batches["input_ids"].shape)),
                      "reload_from": source, "original_seconds": t_orig, "ours_seconds": t_ours,
                      "ratio": t_orig / t_ours})
      table.add(name, c, source, t_orig, t_ours, t_orig / t_ours)
  return results


# ============================================================================ main

def environment() -> dict:
  import jax
  dev = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "devices": jax.device_count(),
          "jax": jax.__version__, "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "available_memory_bytes": available_memory_bytes()}


def run(quick: bool, gpu: bool, sections: list[str], repeats: int) -> dict:
  import jax
  if gpu and jax.default_backend() != "gpu":
    raise app.UsageError(f"--gpu given but JAX's backend is {jax.default_backend()!r}")
  out: dict = {"quick": quick, "gpu": gpu, "environment": environment()}
  start = time.perf_counter()
  logging.info("measuring peak FLOP/s and memory bandwidth")
  peak, peak_source = device_peak_flops(min(repeats, 3) if quick else repeats)
  bw = measure_bandwidth((GIB // 4) if quick else GIB, repeats)
  out["machine"] = {"peak_flops_per_s": peak, "peak_source": peak_source, "bandwidth": bw}
  print(f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s "
        f"(read {bw['read_bytes_per_s'] / 1e9:.1f}, copy {bw['copy_bytes_per_s'] / 1e9:.1f})", flush=True)
  if "client_execution" in sections or "mfu" in sections:
    out["client_execution"] = client_execution_section(quick, gpu, repeats, peak)
    out["mfu"] = mfu_summary(out["client_execution"], peak, peak_source)
  if "loss_positions" in sections:
    out["loss_positions"] = loss_positions_section(quick, gpu, repeats)
  if "cpu_round" in sections:
    out["cpu_round"] = cpu_round_section(quick, repeats)
  if "aggregation" in sections:
    out["aggregation"] = aggregation_section(quick, repeats, bw["bytes_per_s"], peak)
  if "scale" in sections:
    run_round = gpu if FLAGS.scale_run is None else FLAGS.scale_run
    out["scale"] = scale_section(quick, gpu, run_round, check_run=not quick)  # quick: compile-only
  if "original_design" in sections:
    out["original_design"] = original_design_section(quick, repeats)
  out["seconds"] = time.perf_counter() - start
  return out


def summary(out: dict) -> None:
  """The headline figures against the issue's targets."""
  print("\n== summary")
  if "client_execution" in out:
    print(f"vmap / sequential round throughput: {out['client_execution']['speedup']:.2f}x "
          f"({out['client_execution']['headline']}; target >= 2x)")
    print(f"MFU: {out['mfu']['value']:.1%} ({out['mfu']['headline']}; peak: {out['mfu']['peak_source']})")
  if "loss_positions" in out:
    lp = out["loss_positions"]
    print(f"loss on a 16-token response vs every token ({lp['model']} {lp['shape']}): {lp['speedup']:.2f}x faster, "
          f"{lp['memory_ratio']:.2f}x less peak memory")
  if "cpu_round" in out:
    print("cpu round, seconds per step vs the movielens_smollm2_cpu preset: " + ", ".join(
        f"{name} {r['vs_preset']:.2f}x" for name, r in out["cpu_round"]["runs"].items()))
  for entry in out.get("aggregation", []):
    if entry["C"] == 256 and entry.get("seconds"):
      print(f"aggregation C=256 {entry['model']}: {entry['roofline_fraction']:.0%} of roofline "
            f"({entry['bound']}-bound), {entry['bandwidth_roofline_fraction']:.1%} of the bandwidth-only bound")
  if "scale" in out:
    print(f"max clients per round: {out['scale']['max_clients']} (target >= 1000), "
          f"{out['scale']['bytes_per_client'] / 1e6:.1f} MB per client")
  for entry in out.get("original_design", []):
    print(f"original design / ours ({entry['model']}, C={entry['C']}): {entry['ratio']:.1f}x")
  print(f"total {out['seconds']:.0f} s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging as logging_lib
  logging_lib.getLogger("absl").setLevel(logging_lib.INFO)
  out = run(FLAGS.quick, FLAGS.gpu, FLAGS.sections, FLAGS.repeats)
  summary(out)
  pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=1, default=float))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)

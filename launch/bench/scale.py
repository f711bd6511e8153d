"""Section scale: the most clients per round that fit this machine and a 24 GiB device (SmolLM2-135M
adapters + AdamW with fp32 or bf16 moments, run g at a time), fitted from XLA's memory analysis of the
compiled grouped round."""

from __future__ import annotations

import os
import time

from absl import flags, logging

from fellrec_jax import host_memory
from fellrec_jax.host_memory import GIB
from fellrec_jax.xla_stats import ProgramMemory
from launch.bench.fixtures import make_model, make_round
from launch.bench.measure import Table, block, free_memory_bytes

FLAGS = flags.FLAGS  # read at call time: `launch.benchmark` defines the flags


def abstract_round(config, base, num_clients: int, steps: int, batch: int, seq_len: int, tx):
  """ShapeDtypeStructs of a round's arguments: compile for any C without allocating the state."""
  import jax
  import jax.numpy as jnp
  import models
  lora_one = jax.eval_shape(lambda: models.init_lora(config, jax.random.key(0)))
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


def clients_within(budget: int, fixed: float, per_client: float, group_size: int) -> int:
  """Whole groups of clients whose memory, `fixed + C * per_client` bytes, fits `budget`."""
  return int((budget - fixed) // per_client) // group_size * group_size


def scale_section(quick: bool, gpu: bool, run_round: bool, model: str = "smollm2-135m", confirm: bool = True,
                  check_run: bool = True) -> dict:
  """Largest clients-per-round with SmolLM2-135M adapters (r=8 q,v) + AdamW, clients run g at a time, with
  the AdamW moments stored in fp32 and in bf16 (`--moments_dtype`): `result["moments"][dtype]`.

  Memory is linear in C (per-client state, data and outputs) plus a fixed part (base weights, one
  group's activations): fit it from XLA's memory analysis at two sizes, solve for the budget, then
  confirm by compiling at that C (`confirm`). `run_round` runs one fp32 round at that C; otherwise
  `check_run` runs one group-sized round to show the program executes. The round donates the adapter
  and optimizer buffers, as the engine does, so the grouped loop updates the state in place; the full
  (not quick) CPU run also fits an "undonated" fp32 round. Besides the round's arguments the engine
  holds one more adapter copy per client, its best adapters (`engine_bytes_per_client`), none with
  `--keep_best=false` (`lean_engine_bytes_per_client`: the round's own bytes), and one more where the
  round's starting adapters are read after it (DP, `--server_lr`, `--fellrec_similarity=update`). Each fit
  is also solved for a 24 GiB device (`budget_24gib_bytes`, the same `--memory_fraction` of it).
  """
  import jax
  from federated import client, optimizer, resources
  g = FLAGS.scale_group_size
  steps, batch, seq_len = 1, 1, 16
  config, base = make_model(model, "bfloat16" if gpu else "float32")
  budget = int(free_memory_bytes() * FLAGS.memory_fraction)
  budget_24 = int(24 * GIB * FLAGS.memory_fraction)
  table = Table(f"scale: {model}, r=8 q,v + AdamW, groups of {g}, S={steps} B={batch} T={seq_len}",
                ["C", "moments", "donation", "peak GB", "budget GB", "fits", "compile s"])
  donations = {"donated": (1, 2), "undonated": ()}

  def fit(moments: str, donate: str) -> dict:
    """Bytes per client and the most clients within the budgets, of the round with `moments`-dtype AdamW."""
    tx = optimizer.adamw(1e-3, 1e-4, moments)
    update = client.over_clients(client.make_local_update(client.LocalSpec(config), tx), "vmap", group_size=g)

    def memory(c: int) -> dict:
      start = time.perf_counter()
      jitted = jax.jit(update, donate_argnums=donations[donate])
      mem = ProgramMemory.of(jitted.lower(*abstract_round(config, base, c, steps, batch, seq_len, tx)).compile())
      table.add(c, moments, donate, mem.peak_bytes / 1e9, budget / 1e9, mem.peak_bytes <= budget,
                time.perf_counter() - start)
      return mem.as_dict()

    lo, hi = 4 * g, 16 * g
    m_lo, m_hi = memory(lo), memory(hi)
    per_client = (m_hi["peak_bytes"] - m_lo["peak_bytes"]) / (hi - lo)
    fixed = m_lo["peak_bytes"] - per_client * lo
    best = clients_within(budget, fixed, per_client, g)
    confirmed = memory(best) if confirm else None
    while confirm and confirmed["peak_bytes"] > budget and best > g:  # the linear fit was optimistic: step down
      best -= g
      confirmed = memory(best)
    one = abstract_round(config, base, 1, steps, batch, seq_len, tx)
    adapters, opt = resources.nbytes(one[1]), resources.nbytes(one[2])
    engine_per_client = per_client + adapters  # + the best adapters
    return {"max_clients": best, "bytes_per_client": per_client, "fixed_bytes": fixed, "at_max": confirmed,
            "optimizer_bytes_per_client": opt, "state_bytes_per_client": adapters + opt,
            "max_clients_24gib": clients_within(budget_24, fixed, per_client, g),
            "engine_bytes_per_client": engine_per_client,
            "engine_max_clients_24gib": clients_within(budget_24, fixed, engine_per_client, g),
            "lean_engine_bytes_per_client": per_client,
            "lean_engine_max_clients_24gib": clients_within(budget_24, fixed, per_client, g)}

  one = abstract_round(config, base, 1, steps, batch, seq_len, optimizer.adamw(1e-3, 1e-4))
  result = {"model": model, "group_size": g, "shape": {"S": steps, "A": 1, "B": batch, "T": seq_len},
            "budget_bytes": budget, "budget_24gib_bytes": budget_24, "base_bytes": resources.nbytes(base),
            "adapter_bytes_per_client": resources.nbytes(one[1]), "data_bytes_per_client": resources.nbytes(one[3]),
            "moments": {moments: fit(moments, "donated") for moments in optimizer.MOMENTS_DTYPES}}
  if not (quick or gpu):
    result["undonated"] = fit("float32", "undonated")
  fp32 = result["moments"]["float32"]
  result["max_clients"], result["bytes_per_client"] = fp32["max_clients"], fp32["bytes_per_client"]
  # What the whole machine would hold (the budget above is what is free now, with other processes running).
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if jax.default_backend() == "cpu" else budget
  result["max_clients_if_machine_free"] = clients_within(int(total * FLAGS.memory_fraction), fp32["fixed_bytes"],
                                                         fp32["bytes_per_client"], g)
  result["machine_memory_bytes"] = total
  result["measured"] = ("XLA memory_analysis of the compiled grouped round (peak = arguments + outputs + "
                        "temporaries - aliased) at several C; the round is " +
                        ("also run once at max_clients" if run_round else "not run at max_clients (too slow "
                         "here); one group-sized round is run to check the program executes"))
  if run_round or check_run:
    tx = optimizer.adamw(1e-3, 1e-4)
    update = client.over_clients(client.make_local_update(client.LocalSpec(config), tx), "vmap", group_size=g)
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
          "process_peak_rss_bytes": host_memory.peak_rss_bytes()}

"""Section aggregation: jitted `fellrec_aggregate` (and FedAvg beside it) on synthetic adapter stacks
of SmolLM2 and LLaMA-7B shapes, against a bandwidth and compute roofline."""

from __future__ import annotations

import functools
import math

from launch.bench.fixtures import adapter_shapes, synthetic_stack
from fellrec_jax.host_memory import GIB
from launch.bench.measure import Table, free_memory_bytes, median_seconds


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
  budget = free_memory_bytes()
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
        table.add(model, c, "skipped", stack_bytes / 1e9, "", "", entry["skipped"], "", "")
        results.append(entry)
        continue
      stacked = synthetic_stack(shapes, c)
      losses = jnp.asarray(np.random.default_rng(c).uniform(0.5, 2.0, c), jnp.float32)
      reps = repeats if stack_bytes < GIB else 3
      seconds, fedavg_seconds, dense_seconds = (median_seconds(functools.partial(fn, stacked, *args), reps)[0]
                                                for fn, args in ((agg, (losses, 3)), (fedavg, (losses,)),
                                                                 (fedavg_dense, (losses,))))
      flops = 2 * 2.0 * c * c * (per_client // 4)
      t_bw, t_flop = 3 * stack_bytes / bandwidth, flops / peak_flops
      roof = max(t_bw, t_flop)
      entry |= {"seconds": seconds, "roofline_seconds": roof, "roofline_fraction": roof / seconds,
                "bandwidth_roofline_seconds": t_bw, "bandwidth_roofline_fraction": t_bw / seconds,
                "compute_roofline_seconds": t_flop, "flops": flops, "bound": "compute" if t_flop > t_bw else "memory",
                "fedavg_seconds": fedavg_seconds, "fedavg_dense_mix_seconds": dense_seconds}
      table.add(model, c, seconds, stack_bytes / 1e9, t_bw, t_flop, roof / seconds, fedavg_seconds, dense_seconds)
      results.append(entry)
      del stacked  # before the next, larger stack is made
  return results

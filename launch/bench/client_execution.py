"""Sections client_execution and mfu: one local round of C clients, vmapped vs sequential on the same
inputs, and the achieved FLOP/s of the vmapped round over the machine's peak."""

from __future__ import annotations

from absl import flags

from fellrec_jax.xla_stats import xla_cost
from launch.bench.fixtures import Round, local_update, make_model, make_round
from launch.bench.measure import Table, jaxpr_flops, median_seconds

FLAGS = flags.FLAGS  # read at call time: `launch.benchmark` defines the flags


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
  flops = jaxpr_flops(client.over_clients(update, "vmap"), *rnd.args(), while_trips=rnd.steps)
  sequential = client.over_clients(update, "sequential")
  per_client = rnd.per_client_args()
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

"""Section loss_positions: a vmapped round with the loss (and the LM head) on every token vs on a
16-token response: time and peak memory."""

from __future__ import annotations

from fellrec_jax.xla_stats import ProgramMemory
from launch.bench.fixtures import local_update, make_model, make_round
from launch.bench.measure import Table, median_seconds


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
    peak = ProgramMemory.of(compiled).peak_bytes
    runs[name] = {"seconds": seconds, "peak_bytes": peak, "target_tokens": rnd.target_tokens(),
                  "head_positions": int(rnd.batches["target_index"].shape[-1])}
    table.add(name, seconds, peak / 1e9, rnd.target_tokens() / seconds)
  return {"model": f"{model}/{dtype}", "shape": {"C": c, "B": b, "T": t}, "runs": runs,
          "speedup": runs["every_token"]["seconds"] / runs["response_16"]["seconds"],
          "memory_ratio": runs["every_token"]["peak_bytes"] / runs["response_16"]["peak_bytes"]}

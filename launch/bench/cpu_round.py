"""Section cpu_round: where a movielens_smollm2_cpu local step's time goes, one preset setting changed
at a time (cutoff, prompt template, dropout, split, loss positions)."""

from __future__ import annotations

import dataclasses

from launch.bench.fixtures import make_model, make_round
from launch.bench.measure import Table, median_seconds


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

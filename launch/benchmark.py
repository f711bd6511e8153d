"""Performance benchmarks: `python -m launch.benchmark [--quick] [--gpu] [--out benchmark.json]`.

Sections (each prints a table row per measurement and lands in the JSON under its key):
  client_execution  round time and tokens/s of C clients, vmapped vs sequential, same data and model
  mfu               achieved FLOP/s of the vmapped training round / peak FLOP/s
  loss_positions    the round with the loss (and the head) on every token vs on a short response
  cpu_round         where a movielens_smollm2_cpu local step's time goes (cutoff, template, dropout, split, loss)
  aggregation       jitted `fellrec_aggregate` time vs a roofline (bandwidth and compute)
  scale             most simulated clients per round that fit this machine (SmolLM2-135M adapters + AdamW)
  original_design   the released code's pattern (clients one by one, base reloaded per client) vs ours
  pytorch_peer      one federated round (local AdamW steps + FELLRec aggregation) vs plain PyTorch + PEFT
  padding           a real round's padding (ml-latest-small), lockstep vs size-ordered client groups (not
                    in the default list: about 15 minutes on 2 cores, 5 with --quick)

Everything uses synthetic token batches and randomly initialised weights of the real shapes (timings
do not depend on the values), except the original-design section, which reloads weights from disk as
the released code does, and the padding section, which tokenizes real data. Timings are medians over
`--repeats` calls after one warm-up (compile) call; the pytorch_peer section alternates its two sides' calls. It needs torch and peft, and is skipped without them.
The sections and their helpers live in `launch.bench`; this module parses the flags, runs them and writes the JSON.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags, logging

from launch.bench import (aggregation, client_execution, cpu_round, loss_positions, machine, original_design,
                          padding, pytorch_peer, scale, summary)
from fellrec_jax import host_memory
from fellrec_jax.host_memory import GIB

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Small sizes only (about a minute on 2 CPU cores).")
flags.DEFINE_bool("gpu", False, "GPU figures: bf16 SmolLM2 with C*B >= 64, published chip peak for MFU.")
flags.DEFINE_string("out", "benchmark.json", "Where the JSON results go.")
flags.DEFINE_list("sections", ["client_execution", "mfu", "loss_positions", "cpu_round", "aggregation", "scale",
                                "original_design", "pytorch_peer"],
                  "Sections to run.")
flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median reported), after one warm-up call.")
flags.DEFINE_integer("exec_clients", 16, "Clients per round for the client-execution section (tiny-llama).")
flags.DEFINE_integer("exec_batch_size", 2, "Per-client micro-batch size B of the client-execution section.")
flags.DEFINE_integer("exec_seq_len", 32, "Tokens per example T of the client-execution section.")
flags.DEFINE_integer("exec_local_steps", 2, "Local optimizer steps S per round of the client-execution section.")
flags.DEFINE_integer("scale_group_size", 16, "Clients per vmapped group (client_group_size) in the scale section.")
flags.DEFINE_bool("scale_run", None, "Also run one full round at the largest client count (slow on CPU); "
                  "default: on with --gpu, off otherwise.")
flags.DEFINE_string("padding_data_dir", str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
                                            "ml-latest-small"),
                    "MovieLens directory of the padding section (the built-in synthetic data when it is absent).")
flags.DEFINE_float("memory_fraction", 0.9, "Share of the available memory the scale section may plan to use.")


def run(quick: bool, gpu: bool, sections: list[str], repeats: int) -> dict:
  import jax
  if gpu and jax.default_backend() != "gpu":
    raise app.UsageError(f"--gpu given but JAX's backend is {jax.default_backend()!r}")
  out: dict = {"quick": quick, "gpu": gpu, "environment": machine.environment()}
  start = time.perf_counter()
  logging.info("measuring peak FLOP/s and memory bandwidth")
  peak, peak_source = machine.device_peak_flops(min(repeats, 3) if quick else repeats)
  bw = machine.measure_bandwidth((GIB // 4) if quick else GIB, repeats)
  out["machine"] = {"peak_flops_per_s": peak, "peak_source": peak_source, "bandwidth": bw}
  print(f"peak {peak / 1e9:.1f} GFLOP/s ({peak_source}); bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s "
        f"(read {bw['read_bytes_per_s'] / 1e9:.1f}, copy {bw['copy_bytes_per_s'] / 1e9:.1f})", flush=True)
  if "client_execution" in sections or "mfu" in sections:
    out["client_execution"] = client_execution.client_execution_section(quick, gpu, repeats, peak)
    out["mfu"] = client_execution.mfu_summary(out["client_execution"], peak, peak_source)
  if "loss_positions" in sections:
    out["loss_positions"] = loss_positions.loss_positions_section(quick, gpu, repeats)
  if "cpu_round" in sections:
    out["cpu_round"] = cpu_round.cpu_round_section(quick, repeats)
  if "aggregation" in sections:
    out["aggregation"] = aggregation.aggregation_section(quick, repeats, bw["bytes_per_s"], peak)
  if "scale" in sections:
    run_round = gpu if FLAGS.scale_run is None else FLAGS.scale_run
    out["scale"] = scale.scale_section(quick, gpu, run_round, check_run=not quick)  # quick: compile-only
  if "original_design" in sections:
    out["original_design"] = original_design.original_design_section(quick, repeats)
  if "pytorch_peer" in sections:
    out["pytorch_peer"] = pytorch_peer.pytorch_peer_section(quick, repeats, peak_flops=peak)
  if "padding" in sections:
    out["padding"] = padding.padding_section(quick, min(repeats, 3), FLAGS.padding_data_dir)
  out["seconds"] = time.perf_counter() - start
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging as logging_lib
  logging_lib.getLogger("absl").setLevel(logging_lib.INFO)
  out = run(FLAGS.quick, FLAGS.gpu, FLAGS.sections, FLAGS.repeats)
  summary.summary(out)
  pathlib.Path(FLAGS.out).write_text(json.dumps(out, indent=1, default=float))
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  host_memory.restart_with_huge_pages()
  app.run(main)

"""The benchmark's headline figures, printed against the issue's targets."""

from __future__ import annotations


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
    gib24 = out["scale"]["budget_24gib_bytes"] / 2 ** 30
    for moments, fit in out["scale"]["moments"].items():
      print(f"max clients per round, {moments} moments: {fit['max_clients']} here (target >= 1000), "
            f"{fit['max_clients_24gib']} in {gib24:.1f} GiB of a 24 GiB device with the engine's "
            f"--keep_best=false ({fit['engine_max_clients_24gib']} with its best adapters; goal 5,000), "
            f"{fit['bytes_per_client'] / 1e6:.2f} MB per client")
  for entry in out.get("original_design", []):
    print(f"original design / ours ({entry['model']}, C={entry['C']}): {entry['ratio']:.1f}x")
  peer = out.get("pytorch_peer")
  if peer:
    targets = {"tiny": 3.0, "smollm2": 1.2}
    print("ours vs PyTorch+PEFT: " + (f"skipped ({peer['skipped']})" if "skipped" in peer else ", ".join(
        f"{r['workload']} {r['ratio']:.2f}x (target >= {targets[r['workload']]:g}x)"
        + (f", MFU ours {r['ours_mfu']:.1%} / peer {r['peer_mfu']:.1%}" if "ours_mfu" in r else "")
        for r in peer["runs"])))
  print(f"total {out['seconds']:.0f} s")

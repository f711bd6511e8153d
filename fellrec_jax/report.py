"""What users read: per-client tables, TensorBoard scalars, and the strategy comparison (markdown + plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

TABLE_METRICS = ("recall@10", "ndcg@10", "hr@10")


class ScalarWriter:
  """TensorBoard scalars (tensorboardX: no TensorFlow needed) for every round's logs."""

  def __init__(self, logdir: str | Path):
    from tensorboardX import SummaryWriter
    self._writer = SummaryWriter(str(logdir))

  def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._writer.add_scalar(f"{prefix}/{name}", value, step)

  def round(self, log: Mapping[str, Any]) -> None:
    step = log["round"]
    for c, loss in enumerate(log["train_loss"]):
      self._writer.add_scalar(f"train_loss/client_{c}", loss, step)
    for c, loss in enumerate(log.get("valid", {}).get("loss", [])):
      self._writer.add_scalar(f"valid_loss/client_{c}", loss, step)
    for c, w in enumerate(log.get("warm_weights", [])):
      self._writer.add_scalar(f"warm_weight/client_{c}", w, step)
    self.scalars("round", {k: log[k] for k in ("seconds", "bytes_up", "bytes_down")}, step)

  def close(self) -> None:
    self._writer.close()


def _metrics(result: Mapping[str, Any]) -> list[str]:
  return [m for m in TABLE_METRICS if m in result["overall"]] or sorted(
      k for k in result["overall"] if "@" in k)[:3]


def client_table(result: Mapping[str, Any]) -> str:
  """A markdown table of one strategy's per-client metrics and the overall row."""
  names = _metrics(result)
  lines = ["| client | users | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
  for c, row in enumerate(result["clients"]):
    lines.append(f"| {c} | {row['test_users']} | " + " | ".join(f"{row[m]:.4f}" for m in names) + " |")
  overall = result["overall"]
  lines.append(f"| all | {overall['test_users']} | " + " | ".join(f"{overall[m]:.4f}" for m in names) + " |")
  return "\n".join(lines)


REFERENCE_NAMES = {"most_popular": "most-popular", "item_knn": "item-kNN", "sasrec": "SASRec"}


def comparison_table(results: Mapping[str, Mapping[str, Any]], references: Mapping[str, Mapping[str, Any]]) -> str:
  """Overall metrics and client balance (std, min, cv of the primary metric) per strategy, then the
  conventional reference rows (most-popular, item-kNN, SASRec) on the same split, users and masking."""
  rows = {}
  for name, r in results.items():  # a generative run's other decodings of the same adapters follow its row
    rows[name] = r["test"]
    rows |= {f"{name}, --decoding={d}": t for d, t in list(r.get("test_by_decoding", {}).items())[1:]}
  rows |= {f"{REFERENCE_NAMES.get(n, n)} (reference)": ref for n, ref in references.items()}
  floor = references["most_popular"]
  names = _metrics(floor)
  primary = floor["balance"]["metric"]
  header = ["strategy", *names, f"{primary} std", f"{primary} min", f"{primary} cv"]
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for name, test in rows.items():
    b = test["balance"]
    cells = [f"{test['overall'][m]:.4f}" for m in names] + [f"{b['std']:.4f}", f"{b['min']:.4f}", f"{b['cv']:.3f}"]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_comparison(workdir: Path, results: Mapping[str, Mapping[str, Any]],
                     references: Mapping[str, Mapping[str, Any]]) -> None:
  """`comparison.md` (tables) and `comparison.png` (per-client bars and validation curves)."""
  text = ["# Strategy comparison", "", comparison_table(results, references), ""]
  for name, r in results.items():
    text += [f"## {name}", "", client_table(r["test"]), ""]
  (workdir / "comparison.md").write_text("\n".join(text))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  primary = references["most_popular"]["balance"]["metric"]
  fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
  bar_rows = {**{name: r["test"] for name, r in results.items()},
              **{REFERENCE_NAMES.get(n, n): ref for n, ref in references.items()}}
  num_clients = len(references["most_popular"]["clients"])
  width = 0.8 / len(bar_rows)
  for i, (name, test) in enumerate(bar_rows.items()):
    bars.bar(np.arange(num_clients) + i * width, [c.get(primary, 0.0) for c in test["clients"]], width, label=name)
  bars.set(xlabel="client", ylabel=f"test {primary}", title="per-client test metric")
  bars.set_xticks(np.arange(num_clients) + width * (len(bar_rows) - 1) / 2, [str(c) for c in range(num_clients)])
  bars.legend(fontsize=8)
  for name, r in results.items():
    points = [(log["round"], log["valid"]["mean_loss"]) for log in r["rounds"] if "valid" in log]
    curves.plot(*zip(*points), marker="o", label=name)
  curves.set(xlabel="round", ylabel="mean validation loss", title="validation curves")
  curves.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(workdir / "comparison.png", dpi=120)
  plt.close(fig)

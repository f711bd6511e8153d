"""Runs the bad-input probes of a hostile-but-fair new user against `launch.main` and classifies each answer.

    python -m launch.probes [--out probes.json] [--only NAME_SUBSTRING]

Every probe is one `python -m launch.main` subprocess on the built-in synthetic data with a tiny model
(files it needs are written to a temporary directory). Its answer is
  CLEAR    non-zero exit, no traceback, and the last lines name what the probe expects (flag, file, line);
           or, for a probe whose answer is a warning, that warning;
  UNCLEAR  non-zero exit, but a traceback or a message that does not name it;
  SILENT   exit 0 (the bad input was accepted);
  CRASH    killed by a signal.
The counts and each probe's last line are printed and written to `--out`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--dataset=synthetic", "--model=tiny-llama", "--num_clients=2", "--rounds=1", "--max_train_samples=64",
        "--batch_size=8", "--split_k=1", "--strategies=fedavg", "--max_eval_users=4", "--warm_start_steps=0",
        "--max_new_tokens=8", "--num_beams=2", "--metric_ks=1,2", "--baselines="]
RATINGS = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},4.0,{100 * u + i}\n" for u in range(1, 9)
                                                         for i in range(1, 9))
MOVIES = "movieId,title,genres\n" + "".join(f"{i},Film {i} (199{i}),Drama\n" for i in range(1, 9))


@dataclasses.dataclass(frozen=True)
class Probe:
  name: str
  args: list[str]                      # flags after FAST; {d} is the probe's directory
  expect: str                          # text the one-line answer must contain ({d} filled in)
  files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)  # written under {d} first
  warns: bool = False                  # the answer is a warning and the run may finish (exit 0)


def _movielens(ratings: str = RATINGS, movies: str = MOVIES) -> dict[str, str]:
  return {"ml/ratings.csv": ratings, "ml/movies.csv": movies}


def _bigrec(output) -> dict[str, str]:
  rec = {"instruction": "i", "input": 'before: "A", "B"', "output": output, "user": "1"}
  return {"bigrec/train.json": json.dumps([rec, rec])}


ML = ["--dataset=movielens", "--data_dir={d}/ml", "--num_clients=2", "--partition=random"]
PROBES = [
    # flags
    Probe("unknown enum value", ["--task=ranking"], "--task"),
    Probe("rounds zero", ["--rounds=0"], "--rounds"),
    Probe("dtype int8", ["--dtype=int8"], "--dtype"),
    Probe("dtype unknown", ["--dtype=foo"], "--dtype"),
    Probe("max_train_samples zero", ["--max_train_samples=0"], "--max_train_samples"),
    Probe("split_k beyond the model", ["--split_k=40"], "--split_k"),
    Probe("split_k list of wrong length", ["--split_k=1,1,1"], "--split_k"),
    Probe("unknown strategy", ["--strategies=fedsgd"], "--strategies"),
    Probe("unknown prompt", ["--prompt=short"], "--prompt"),
    Probe("constrained with too few beams", ["--decoding=constrained", "--metric_ks=5"], "--num_beams"),
    Probe("negative learning rate", ["--learning_rate=-1"], "--learning_rate"),
    Probe("unknown flag", ["--lerning_rate=1e-3"], "lerning_rate"),
    Probe("generative task on an encoder", ["--model=tiny-bert", "--task=generative"], "--task"),
    # data
    Probe("missing data directory", ["--dataset=movielens", "--data_dir={d}/none"], "{d}/none"),
    Probe("ratings with a short line", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,1\n")),
    Probe("ratings with a word for a timestamp", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,1,4.0,soon\n")),
    Probe("ratings with an inf timestamp", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,1,4.0,inf\n")),
    Probe("ratings with a 1e30 timestamp", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,1,4.0,1e30\n")),
    Probe("ratings with a nan rating", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,1,nan,5\n")),
    Probe("ratings of an unknown movie", ML, "ratings.csv, line 66", _movielens(RATINGS + "9,99,4.0,5\n")),
    Probe("ratings not utf-8", ML, "ratings.csv, line 66", _movielens(RATINGS.encode() + b"9,1,4.0,\xff\n")),
    Probe("ratings with wrong columns", ML, "ratings.csv, line 1", _movielens("user,item\n1,2\n")),
    Probe("amazon null rating", ["--dataset=amazon", "--data_dir={d}/amz"], "X.json, line 2",
          {"amz/meta_X.json": json.dumps({"asin": "A", "title": "T"}) + "\n",
           "amz/X.json": "\n".join(json.dumps({"reviewerID": u, "asin": "A", "unixReviewTime": 1, "overall": r})
                                   for u, r in (("u", 5.0), ("v", None))) + "\n"}),
    Probe("bigrec output a list", ["--dataset=bigrec_json", "--data_dir={d}/bigrec"], "train.json, record 0",
          _bigrec(['"C"'])),
    Probe("bigrec malformed json", ["--dataset=bigrec_json", "--data_dir={d}/bigrec"], "train.json, line 1",
          {"bigrec/train.json": "[{"}),
    # model files
    Probe("model path missing", ["--model={d}/none.gguf"], "unknown model '{d}/none.gguf'"),
    Probe("truncated gguf", ["--model={d}/m.gguf"], "{d}/m.gguf: not a readable GGUF file", {"m.gguf": b"GGUF\x03\x00"}),
    Probe("garbage safetensors", ["--model={d}/hf"], "model.safetensors: not a readable safetensors file",
          {"hf/config.json": (ROOT / "tests/fixtures/llama-7b/config.json").read_text(),
           "hf/model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00garbage"}),
    Probe("config.json not json", ["--model={d}/hf"], "config.json: not a readable JSON file",
          {"hf/config.json": '{"model_type": "llama",', "hf/model.safetensors": b""}),
    # numerics, permissions
    Probe("learning rate 1e30", ["--learning_rate=1e30", "--warm_start_steps=100"], "--learning_rate", warns=True),
    Probe("learning rate 1e4 (collapse)", ["--learning_rate=1e4", "--warm_start_steps=100"], "--learning_rate",
          warns=True),
    Probe("export without a checkpoint", ["--mode=export", "--workdir={d}/none"],
          "--workdir={d}/none holds no checkpoint"),
    Probe("workdir under a file", ["--workdir={d}/file/w"], "--workdir={d}/file/w cannot be created",
          {"file": "not a directory"}),
]


def _last_lines(text: str, n: int = 3) -> str:
  return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


def run_probe(probe: Probe, timeout: float = 600) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp)
    for rel, content in probe.files.items():
      path = d / rel
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(content.encode() if isinstance(content, str) else content)
    fill = lambda s: s.replace("{d}", str(d))
    args = FAST + [f"--workdir={d}/w"] + [fill(a) for a in probe.args]  # a later flag wins
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "launch.main", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=os.environ | {"PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
  tail = _last_lines(out.stderr)
  if probe.warns:  # the warning, wherever it is
    tail = next((line.strip() for line in out.stderr.splitlines() if fill(probe.expect) in line), tail)
  if out.returncode < 0:
    verdict = "CRASH"
  elif out.returncode == 0:
    verdict = "CLEAR" if probe.warns and fill(probe.expect) in out.stderr else "SILENT"
  elif "Traceback" not in out.stderr and fill(probe.expect) in tail:
    verdict = "CLEAR"
  else:
    verdict = "UNCLEAR"
  return {"name": probe.name, "verdict": verdict, "exit": out.returncode, "seconds": round(seconds, 1),
          "answer": tail.replace(str(d), "{d}")}


def main(argv):
  del argv
  results = []
  for probe in PROBES:
    if flags.FLAGS.only and flags.FLAGS.only not in probe.name:
      continue
    result = run_probe(probe)
    results.append(result)
    print(f"{result['verdict']:8s} {probe.name} ({result['seconds']}s): {result['answer'][:240]}", flush=True)
  counts = {v: sum(r["verdict"] == v for r in results) for v in ("CLEAR", "UNCLEAR", "SILENT", "CRASH")}
  print(counts)
  if flags.FLAGS.out:
    pathlib.Path(flags.FLAGS.out).write_text(json.dumps({"counts": counts, "probes": results}, indent=1))


if __name__ == "__main__":  # flags defined here only, so importing the probes (tests) defines none
  flags.DEFINE_string("out", None, "Write the results as JSON here.")
  flags.DEFINE_string("only", None, "Run only the probes whose name contains this text.")
  app.run(main)

"""The run configuration: one frozen dataclass whose field names are the command-line flag names.

Validation lives here so that a bad value fails with a message naming its flag, whether the config
comes from `launch.main` or from Python.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from typing import Literal

# The option values, each written once: `RunConfig`'s fields are typed with these, the flags' enums and the
# checks in `RunConfig.__post_init__` are derived from the types (`options`).
Strategy = Literal["fellrec", "fedavg", "fedprox", "local", "centralized"]
Baseline = Literal["item_knn", "sasrec"]  # conventional reference rows; most-popular is always computed
Mode = Literal["train", "prepare", "resources", "attack", "export"]
Dtype = Literal["float32", "bfloat16", "float16"]  # parameter and compute dtypes
Decoding = Literal["l2", "constrained"]  # generative: BIGRec's L2 grounding, or beams in the catalogue trie
MomentsDtype = Literal["float32", "bfloat16"]  # AdamW's mu and nu as stored (math in fp32)
STRATEGIES, BASELINES, MODES, DTYPES, DECODINGS, MOMENTS_DTYPES = (
    typing.get_args(x) for x in (Strategy, Baseline, Mode, Dtype, Decoding, MomentsDtype))


def options(annotation) -> tuple[str, ...] | None:
  """The values a `Literal[...]` annotation allows, also inside `X | None` and `tuple[X, ...]`; else None."""
  if typing.get_origin(annotation) is Literal:
    return typing.get_args(annotation)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple):
    for arg in typing.get_args(annotation):  # None and the `...` of tuple[X, ...] have no options
      if allowed := options(arg):
        return allowed
  return None


@functools.cache
def option_fields() -> dict[str, tuple[str, ...]]:
  """`{field: allowed values}` for every `RunConfig` field typed with a `Literal`."""
  hints = typing.get_type_hints(RunConfig)
  return {f.name: allowed for f in dataclasses.fields(RunConfig) if (allowed := options(hints[f.name]))}


# The defenses `--attack_sweep` varies (a bool flag is on for a value != 0).
SWEEPABLE = ("cut_noise", "cut_clip", "cut_nopeek", "private_response", "loss_upload_noise", "loss_upload_step")


def _is_number(text: str) -> bool:
  try:
    return math.isfinite(float(text))
  except ValueError:
    return False


class ConfigError(ValueError):
  """An unknown, out-of-range or inconsistent setting; the message names the flag."""


class Diverged(RuntimeError):
  """Every participating client's round went non-finite: the run cannot go on (`launch.main` exits 3)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  # what to run
  mode: Mode = "train"
  workdir: str = "workdir"
  seed: int = 0
  strategies: tuple[Strategy, ...] = ("fellrec",)
  # data
  dataset: Literal["synthetic", "movielens", "amazon", "bigrec_json"] = "synthetic"
  data_dir: str | None = None
  split: Literal["temporal", "loo"] | None = None
  num_clients: int = 5
  partition: Literal["kmeans", "random", "dirichlet", "mapping"] = "kmeans"
  mapping_file: str | None = None
  dirichlet_alpha: float = 0.5
  history_len: int = 10
  k_core: int = 5
  min_rating: float | None = None
  max_train_samples: int | None = None
  max_eval_users: int | None = None
  cutoff_len: int = 512
  train_on_inputs: bool = False
  skip_bad_lines: bool = False
  bpr_steps: int = 2000
  # model and task
  model: str = "tiny-llama"
  task: Literal["generative", "discriminative"] = "generative"
  disc_temperature: float = 0.05
  disc_input: Literal["text", "items"] = "text"  # "text": the BIGRec prompt's tokens; "items": item-as-token sequences
  item_side: Literal["frozen", "table", "encoder"] = "frozen"  # discriminative item vectors; "table" is trained
  item_table_rank: int = 0  # item_side=table: 0 trains the whole table, r > 0 a rank-r correction of it
  item_ids: bool = False  # item inputs: trainable item-ID embeddings added where the client tail starts
  item_aggregation: Literal["rows", "clients"] = "rows"  # trainable item rows: "rows" by the clients' counts of each
  disc_score: Literal["cosine", "dot"] = "cosine"  # "cosine" (RecFormer) or "dot"
  cache_head: bool = False  # item inputs: the client head has no adapters; its activations computed once
  dtype: Dtype = "float32"
  remat: bool = False
  scan_layers: bool = True
  warm_start_steps: int = 300
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: tuple[str, ...] = ("q", "v")
  # local training
  rounds: int = 5
  local_epochs: float = 1.0
  batch_size: int = 8
  grad_accum: int = 1
  learning_rate: float = 1e-3
  warmup_steps: int = 0
  weight_decay: float = 0.0
  moments_dtype: MomentsDtype = "float32"
  client_execution: Literal["vmap", "sequential"] = "vmap"
  client_group_size: int | None = None
  clients_per_round: int | None = None
  # split learning
  split_k: tuple[int, ...] | tuple[str] | None = None  # ("auto",): chosen from client_memory_budget_mb
  server_lora: Literal["per_client", "frozen"] = "per_client"
  client_memory_budget_mb: tuple[float, ...] | None = None
  # defenses at the cut (federated.cut_defense) and of the uploaded losses
  cut_noise: float = 0.0  # noise-to-signal ratio of the Gaussian noise on the activations sent up
  cut_clip: float | None = None  # per-token L2 clip of those activations before the noise
  cut_nopeek: float = 0.0  # weight of the NoPeek distance-correlation term on the client head's output
  private_response: bool = False  # the server never receives activations at or after a row's first label
  loss_upload_noise: float = 0.0  # std of the Gaussian noise on each uploaded training loss
  loss_upload_step: float | None = None  # uploaded training losses rounded to multiples of this
  attack_sweep: tuple[str, ...] = ()  # --mode=attack: defense settings "flag=value" to train and attack
  # differential privacy of the uploads
  dp_clip: float | None = None
  dp_noise_multiplier: float = 0.0
  dp_delta: float | None = None
  dp_accountant: Literal["rdp", "pld"] = "rdp"
  # strategies
  fellrec_alpha: float = 0.7
  fellrec_beta: float = 1.0
  fellrec_temperature: float = 0.05
  fellrec_variant: Literal["code", "paper"] = "code"
  fellrec_similarity: Literal["params", "update"] = "params"
  fellrec_private_tail: bool = False
  fedprox_mu: float = 0.01
  server_lr: float = 1.0  # FedOpt server step: anchor + server_lr * (aggregate - anchor)
  # evaluation and the loop
  eval_every: int = 1
  select_by: str | None = None  # "loss" or a metric such as "ndcg@10"; None: ndcg@10 for discriminative
  keep_best: bool = True  # a copy of each client's best adapter; off: the last adapters are evaluated
  checkpoint_every: int = 1
  patience: int | None = None
  eval_batch_size: int = 32
  metric_ks: tuple[int, ...] = (5, 10, 20)
  baselines: tuple[Baseline, ...] = BASELINES
  decoding: tuple[Decoding, ...] = ("l2",)  # the first ranks test and valid; the others are also reported on test
  num_beams: int = 4
  prompt: Literal["alpaca", "compact", "sequence"] = "alpaca"  # examples.PROMPTS
  max_new_tokens: int = 32
  profile_rounds: tuple[int, ...] = ()  # 0-based rounds traced with jax.profiler into <workdir>/profile
  export_merged: bool = False  # --mode=export: also each client's base with its adapter folded in
  # scale-out
  mesh_clients: int | None = None
  mesh_model: int = 1

  def __post_init__(self):
    def need(ok: bool, flag: str, msg: str):
      if not ok:
        value = getattr(self, flag)
        raise ConfigError(f"--{flag}={','.join(map(str, value)) if isinstance(value, tuple) else repr(value)}: {msg}")

    for flag, allowed in option_fields().items():  # every Literal-typed field: a value it names
      value = getattr(self, flag)
      for v in value if isinstance(value, tuple) else (value,):
        need(v is None or v in allowed, flag, f"unknown value {v!r}; expected " +
             (f"a subset of {allowed}" if isinstance(value, tuple) else f"one of {allowed}"))

    need(len(self.strategies) > 0, "strategies", "name at least one strategy")
    need(self.num_clients >= 1, "num_clients", "must be >= 1")
    need(self.rounds >= 1, "rounds", "must be >= 1")
    need(self.local_epochs > 0, "local_epochs", "must be > 0")
    need(self.batch_size >= 1, "batch_size", "must be >= 1")
    need(self.grad_accum >= 1, "grad_accum", "must be >= 1")
    need(self.learning_rate > 0, "learning_rate", "must be > 0")
    need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    need(self.client_execution in ("vmap", "sequential"), "client_execution", "expected 'vmap' or 'sequential'")
    need(self.client_group_size is None or self.client_group_size >= 1, "client_group_size", "must be >= 1")
    need(self.client_group_size is None or self.client_execution == "vmap", "client_group_size",
         "client groups apply to --client_execution=vmap only")
    need(self.clients_per_round is None or 1 <= self.clients_per_round <= self.num_clients, "clients_per_round",
         f"must be in [1, --num_clients={self.num_clients}]")
    need(self.split_k is None or len(self.split_k) in (1, self.num_clients) or self.mode in ("resources", "attack"),
         "split_k",
         f"give one k or one per client (--num_clients={self.num_clients})")
    auto = self.auto_split
    need(self.split_k is None or auto or all(isinstance(k, int) and k >= 0 for k in self.split_k), "split_k",
         "give integers k >= 0, or 'auto'")
    need(not auto or self.client_memory_budget_mb is not None, "split_k",
         "'auto' needs --client_memory_budget_mb")
    need(self.client_memory_budget_mb is None or (len(self.client_memory_budget_mb) in (1, self.num_clients)
                                                  and min(self.client_memory_budget_mb) > 0),
         "client_memory_budget_mb", f"give one budget > 0 or one per client (--num_clients={self.num_clients})")
    need(self.dp_clip is None or self.dp_clip > 0, "dp_clip", "must be > 0")
    need(self.dp_noise_multiplier >= 0, "dp_noise_multiplier", "must be >= 0")
    need(self.dp_noise_multiplier == 0 or self.dp_clip is not None, "dp_noise_multiplier", "needs --dp_clip")
    cut = self.split_k is not None or self.mode == "attack"
    for flag, value in (("cut_noise", self.cut_noise), ("cut_nopeek", self.cut_nopeek)):
      need(math.isfinite(value) and value >= 0, flag, "must be finite and >= 0")
      need(value == 0 or cut, flag, "defends the split cut: needs --split_k")
    need(self.cut_clip is None or self.cut_clip > 0, "cut_clip", "must be > 0")
    need(self.cut_clip is None or cut, "cut_clip", "defends the split cut: needs --split_k")
    need(self.cut_nopeek == 0 or 0 not in self.explicit_cuts, "cut_nopeek",
         "trains the client head's adapters; --split_k=0 leaves the client no head blocks")
    need(self.cut_nopeek == 0 or not self.cache_head, "cut_nopeek",
         "trains the client head's adapters, which --cache_head removes")
    need(not self.private_response or cut, "private_response", "defends the split cut: needs --split_k")
    need(not self.private_response or (self.task == "generative" and not self.train_on_inputs), "private_response",
         "hides the response tokens of --task=generative without --train_on_inputs (there, every token is a label)")
    need(math.isfinite(self.loss_upload_noise) and self.loss_upload_noise >= 0, "loss_upload_noise",
         "must be finite and >= 0")
    need(self.loss_upload_step is None or self.loss_upload_step > 0, "loss_upload_step", "must be > 0")
    for setting in self.attack_sweep:
      name, _, value = setting.partition("=")
      need(name in SWEEPABLE, "attack_sweep", f"{setting!r}: expected flag=value with flag one of {SWEEPABLE}")
      need(_is_number(value), "attack_sweep", f"{setting!r}: the value must be a number")
    need(not self.attack_sweep or self.mode == "attack", "attack_sweep", "applies to --mode=attack")
    need(self.dp_delta is None or 0 < self.dp_delta < 1, "dp_delta", "must be in (0, 1)")
    need(self.dp_accountant in ("rdp", "pld"), "dp_accountant", "expected 'rdp' or 'pld'")
    need(self.server_lora in ("per_client", "frozen"), "server_lora", "expected 'per_client' or 'frozen'")
    need(self.fellrec_variant in ("code", "paper"), "fellrec_variant", "expected 'code' or 'paper'")
    need(self.fellrec_similarity in ("params", "update"), "fellrec_similarity", "expected 'params' or 'update'")
    need(self.fellrec_beta > 0, "fellrec_beta", "must be > 0")
    need(self.fellrec_temperature > 0, "fellrec_temperature", "must be > 0")
    need(self.fedprox_mu >= 0, "fedprox_mu", "must be >= 0")
    need(self.server_lr > 0, "server_lr", "must be > 0")
    need(self.eval_every >= 1, "eval_every", "must be >= 1")
    need(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    need(self.patience is None or self.patience >= 1, "patience", "must be >= 1")
    need(self.lora_rank >= 1, "lora_rank", "must be >= 1")
    need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(self.mesh_model >= 1, "mesh_model", "must be >= 1")
    need(self.disc_temperature > 0, "disc_temperature", "must be > 0")
    need(self.item_table_rank >= 0, "item_table_rank", "must be >= 0")
    need(self.item_table_rank == 0 or self.item_side == "table", "item_table_rank", "needs --item_side=table")
    need(not self.item_ids or self.disc_input == "items", "item_ids", "needs --disc_input=items")
    need(not self.cache_head or (self.disc_input == "items" and self.task == "discriminative"), "cache_head",
         "needs --task=discriminative --disc_input=items (frozen item inputs make the head's output constant)")
    need(not self.cache_head or bool(self.explicit_cuts), "cache_head",
         "needs integer --split_k: the cached part is the client head, blocks [0, k)")
    need(self.disc_input == "text" or self.task == "discriminative", "disc_input",
         "item-as-token inputs are for --task=discriminative")
    need(self.disc_input == "text" or self.max_train_samples is None, "disc_input",
         "'items' trains on every position of every training sequence; unset --max_train_samples")
    name, _, k = (self.select_by or "loss@").partition("@")
    need(self.select_by in (None, "loss") or (name in ("recall", "ndcg", "hr") and k.isdigit() and int(k) >= 1),
         "select_by", "expected 'loss' or recall@K / ndcg@K / hr@K")
    need(self.selection_metric == "loss" or self.task == "discriminative", "select_by",
         "ranking-metric selection needs --task=discriminative (generative validation would generate every round)")
    need(len(self.metric_ks) > 0 and min(self.metric_ks) >= 1, "metric_ks", "give cut-offs >= 1")
    need(all(0 <= r < self.rounds for r in self.profile_rounds), "profile_rounds",
         f"give 0-based rounds in [0, --rounds={self.rounds})")
    need(self.num_beams >= 1, "num_beams", "must be >= 1")
    need(len(self.decoding) > 0 and len(set(self.decoding)) == len(self.decoding), "decoding",
         f"give distinct values of {DECODINGS}")
    need("constrained" not in self.decoding or self.num_beams >= max(self.metric_ks), "num_beams",
         f"--decoding=constrained ranks the {self.num_beams} finished beams: give --num_beams >= max(--metric_ks)"
         f" = {max(self.metric_ks)}, or lower --metric_ks")
    need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
    need(not self.export_merged or self.mode == "export", "export_merged", "applies to --mode=export only")
    need(self.warm_start_steps >= 0, "warm_start_steps", "must be >= 0")
    need(self.cutoff_len >= 8, "cutoff_len", "must be >= 8")
    need(self.max_train_samples is None or self.max_train_samples >= 1, "max_train_samples",
         "must be >= 1 (unset it to train on every example)")

  def sweep_settings(self) -> list[tuple[str, float]]:
    """`--attack_sweep` as `(flag, value)` pairs, in order."""
    return [(name, float(value)) for name, _, value in (s.partition("=") for s in self.attack_sweep)]

  @property
  def selection_metric(self) -> str:
    """What picks each client's best adapter: "loss", or a validation metric (default ndcg@10 when
    discriminative, as the released RecFormer selects on a dev ranking metric)."""
    if self.select_by is not None:
      return self.select_by
    return "ndcg@10" if self.task == "discriminative" else "loss"

  @property
  def auto_split(self) -> bool:
    """`--split_k=auto`: cuts to be chosen from `client_memory_budget_mb` once the model is known."""
    return self.split_k == ("auto",)

  @property
  def explicit_cuts(self) -> tuple[int, ...]:
    """The `--split_k` values given as integers (empty when unset or auto)."""
    return () if self.split_k is None or self.auto_split else self.split_k

  def split_for_client(self, c: int) -> int | None:
    """The cut of client c (None: unsplit); `split_k="auto"` must have been resolved first."""
    if self.split_k is None:
      return None
    if self.auto_split:
      raise ConfigError("--split_k=auto is resolved from --client_memory_budget_mb once the model is loaded")
    return self.split_k[0] if len(self.split_k) == 1 else self.split_k[c]


# What a resumed run may change: these settings do not alter what is trained (evaluation after training,
# logging, file locations, memory layout).
RESUME_FREE = ("workdir", "data_dir", "mode", "strategies", "baselines", "eval_batch_size", "metric_ks", "decoding",
               "num_beams", "max_new_tokens", "checkpoint_every", "profile_rounds", "export_merged",
               "client_group_size", "mesh_clients", "mesh_model", "attack_sweep")


def as_json(cfg: RunConfig) -> dict:
  """The configuration as stored in results and checkpoints (tuples as lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def resume_changes(saved: dict, cfg: RunConfig) -> tuple[list[str], list[str]]:
  """`(blocking, free)`: `--flag=old -> new` for each setting that differs from a checkpoint's `saved`
  configuration; `free` ones are in `RESUME_FREE`. A setting the checkpoint predates had its default."""
  now, defaults = as_json(cfg), as_json(RunConfig())
  show = lambda v: ",".join(map(str, v)) if isinstance(v, list) else str(v)
  changes = {k: f"--{k}={show(saved.get(k, defaults[k]))} -> {show(now[k])}" for k in now
             if saved.get(k, defaults[k]) != now[k]}
  return ([c for k, c in changes.items() if k not in RESUME_FREE], [c for k, c in changes.items() if k in RESUME_FREE])


"""Command-line flags: one per `RunConfig` field, same name, with help text and enum checks."""

from __future__ import annotations

import dataclasses
import types
import typing

from absl import flags

from fellrec_jax.config import STRATEGIES, ConfigError, RunConfig, option_fields

HELP = {
    "mode": "train: run the strategies; prepare: only load/split/partition the data and write data_stats.json; "
            "resources: client/server parameters, memory, FLOPs and traffic across --split_k (resources.json); "
            "attack: invert the activations the server sees at each --split_k, prompt tokens for decoders, history "
            "items for --disc_input=items (attack.json, attack.png); "
            "export: each client's evaluated adapter of the run in --workdir as a PEFT adapter directory "
            "(<workdir>/export/client_<i>), the base in transformers' layout where it was not one already "
            "(export/base), settings read from the run's checkpoint.",
    "workdir": "Output directory (results.json, metrics.jsonl, checkpoints); a run resumes from its checkpoints.",
    "seed": "Seed for data generation, partition, adapter init, sampling and dropout.",
    "strategies": f"Comma list of strategies to run on the same data and budget: {','.join(STRATEGIES)}.",
    "dataset": "synthetic (built-in, no files), movielens, amazon or bigrec_json.",
    "data_dir": "Directory with the dataset's raw files (not needed for synthetic).",
    "split": "temporal (global 80/10/10) or loo (leave-one-out); default: the dataset's own default.",
    "num_clients": "Number of clients the users are partitioned into.",
    "partition": "User->client partition: kmeans (BPR-MF embeddings, as FELLRec), random, dirichlet, mapping.",
    "mapping_file": "CSV of user,client for --partition=mapping.",
    "dirichlet_alpha": "Concentration of the Dirichlet non-IID partition (smaller: more skewed).",
    "history_len": "Number of most recent items shown as the user's history.",
    "k_core": "k-core filtering of users and items (0 disables).",
    "min_rating": "Keep only interactions rated at least this (implicit feedback); default keeps all.",
    "max_train_samples": "Seeded cap on training examples over all clients: windows (BIGRec used 1024), or "
                         "with --prompt=sequence chunks of up to --history_len targets.",
    "max_eval_users": "Cap on validation/test users per client (for quick runs); default: all.",
    "cutoff_len": "Maximum tokens per training example.",
    "train_on_inputs": "Also train on the prompt tokens (BIGRec's released default was true).",
    "skip_bad_lines": "Skip (and count) malformed input lines instead of failing.",
    "bpr_steps": "Training steps of the BPR model whose user embeddings KMeans partitions.",
    "model": "Backbone: tiny-llama, tiny-bert, smollm2-135m, minilm-l6, an HF directory or a .gguf file.",
    "dtype": "Parameter and compute dtype of the base model (float32, bfloat16).",
    "remat": "Rematerialise each block in the backward pass (saves activation memory).",
    "scan_layers": "Run the blocks under one lax.scan (compile time independent of depth). --noscan_layers "
                   "unrolls them in Python: longer compiles, but no per-layer stacking of the saved "
                   "activations: faster for small models on CPU (the benchmark's 4-block d=128 round "
                   "0.71 -> 0.55 s), slower for SmolLM2's 30 blocks.",
    "task": "generative: BIGRec (generate a title, ground it to items); discriminative: score every item "
            "(the default for encoders).",
    "disc_temperature": "Softmax temperature of discriminative training (user . item / T).",
    "disc_input": "Discriminative inputs: text (the BIGRec prompt's tokens) or items (item-as-token: each "
                  "history item one position carrying its item vector; the encoder runs causally and every "
                  "position of every training sequence predicts its next item).",
    "item_side": "Discriminative item vectors: frozen (base-model title embeddings), table (a per-client "
                 "trainable table initialised from them, trained and aggregated like the adapters, so it is "
                 "uploaded each round) or encoder (titles re-encoded under the client's adapters each round, "
                 "as RecFormer).",
    "item_ids": "--disc_input=items: a trainable [items, d] item-ID embedding (zero at start) added to the "
                "residual stream where the client tail (last block) starts, so the model knows which items a "
                "user saw, not only their titles; client-side, aggregated like the item table.",
    "item_aggregation": "Trainable item rows (--item_side=table, --item_ids): how the strategies mix them. rows: each item's row with "
                        "every client's weight times its training count of that item (a row follows the "
                        "clients whose users interacted with it); clients: like the adapters.",
    "item_table_rank": "--item_side=table: 0 trains the whole [items, d] table; r > 0 trains a rank-r "
                       "correction u @ v of the frozen title embeddings (far fewer parameters per rare item).",
    "disc_score": "Discriminative score of a user state and an item vector: cosine (RecFormer) or dot (SASRec; "
                  "vector norms can carry popularity); divided by --disc_temperature in the loss.",
    "cache_head": "With --disc_input=items and --split_k: the client head (blocks [0, k)) gets no adapters, so "
                  "on the frozen item inputs its activations are computed once per run and reused every epoch; "
                  "training runs only blocks [k, L).",
    "select_by": "Each client's best adapter (and --patience): loss, or a validation metric such as ndcg@10; "
                 "default ndcg@10 for --task=discriminative, loss for generative.",
    "keep_best": "Keep a copy of each client's best adapter by --select_by and evaluate it; off: the last "
                 "round's adapters are evaluated and the copy (one adapter per client) is not held, for the "
                 "most clients per host.",
    "baselines": "Comma list of conventional reference rows trained centrally on the same split and evaluated "
                 "on the same users and masking, in results.json['baselines'] and comparison.md: item_knn, sasrec "
                 "(most-popular is always there); empty for none.",
    "metric_ks": "Comma list of cut-offs K for recall@K, ndcg@K, hr@K.",
    "decoding": "Comma list of generative evaluations; the first selects and fills the test table, the others "
                "are reported beside it on the same adapters (results.json test_by_decoding). l2: BIGRec, the best "
                "beam's text grounded to the nearest title embedding; constrained: beam search inside the trie "
                "of the catalogue's titles minus the user's excluded items, the --num_beams finished beams (by "
                "sequence logprob) being the ranking.",
    "prompt": "Prompt format: alpaca (BIGRec's Alpaca instruction template), compact (only the input and the "
              "response marker: ~60 fewer tokens per example, for CPU budgets) or sequence (one quoted title per "
              "line, the next item the next line; training chunks of a user's sequence carry --history_len "
              "targets each instead of one, ~5x fewer tokens per target).",
    "num_beams": "Beams for generative evaluation (BIGRec used 4); with --decoding=constrained, the ranking's "
                 "length.",
    "max_new_tokens": "Maximum generated tokens per response in generative evaluation.",
    "warm_start_steps": "tiny-llama/tiny-bert only: steps fitting the random base to the public item titles "
                        "(never to user data) so it can spell titles; 0 keeps it random.",
    "lora_rank": "LoRA rank r.",
    "lora_alpha": "LoRA alpha (the update is scaled by alpha / r).",
    "lora_dropout": "Dropout on the LoRA path during training.",
    "lora_targets": "Comma list of projections that get adapters: q,k,v,o,gate,up,down.",
    "rounds": "Communication rounds.",
    "local_epochs": "Local epochs per round over each client's own data (fractions allowed).",
    "batch_size": "Micro-batch size per client.",
    "grad_accum": "Micro-batches accumulated per optimizer step.",
    "learning_rate": "Peak AdamW learning rate.",
    "warmup_steps": "Linear warmup steps (then linear decay to zero over the run).",
    "weight_decay": "AdamW decoupled weight decay.",
    "moments_dtype": "How each client's AdamW moments (mu, nu) are stored: float32, or bfloat16 (half the "
                     "optimizer state, so more clients per host; the step's arithmetic stays fp32 and the "
                     "moments are rounded stochastically, unbiased).",
    "client_execution": "vmap: all clients in one jitted program; sequential: one client at a time.",
    "client_group_size": "With vmap, run clients g at a time per device of the clients axis (a loop over "
                         "groups, state updated in place) to bound memory.",
    "clients_per_round": "Clients sampled per round (default: all).",
    "split_k": "U-shaped split: one k for all clients, a comma list with one k per client, or 'auto' (the "
               "largest k whose client footprint fits --client_memory_budget_mb); unset trains the whole model "
               "on the client. With --mode=resources/attack: the cuts to tabulate.",
    "client_memory_budget_mb": "Client memory budget(s) in MiB for --split_k=auto: one for all or one per client.",
    "cut_noise": "Defense at the split cut: Gaussian noise on the activations sent to the server, its expected norm "
                 "this ratio times --cut_clip (or each token's own norm without it). Not an (epsilon, delta) "
                 "guarantee: see federated/cut_defense.py.",
    "cut_clip": "Defense at the split cut: each token's activation sent up is clipped to this L2 norm first.",
    "cut_nopeek": "Defense at the split cut: weight of NoPeek's distance correlation between the token embeddings "
                  "and the client head's output, added to the client's objective (needs head adapters, k >= 1).",
    "private_response": "Defense at the split cut: the server never receives activations at or after a row's first "
                        "label token; the client runs those through its own adapter-free copy of the body blocks.",
    "loss_upload_noise": "Std of Gaussian noise added to each client's uploaded training loss (FELLRec's warm-weight "
                         "input); not accounted as differential privacy.",
    "loss_upload_step": "Uploaded training losses are rounded to multiples of this (after --loss_upload_noise).",
    "attack_sweep": "--mode=attack: comma list of defense settings flag=value (cut_noise, cut_clip, cut_nopeek, "
                    "private_response, loss_upload_noise, loss_upload_step), each trained (the first of "
                    "--strategies) and attacked at each --split_k beside an undefended run; attack.json['curve'].",
    "dp_clip": "Differential privacy: L2 bound on each client's per-round adapter update; unset disables DP.",
    "dp_noise_multiplier": "Gaussian noise std / --dp_clip added to each clipped update before aggregation.",
    "dp_delta": "delta of the reported epsilon (default min(1e-5, 1/(10 num_clients))).",
    "dp_accountant": "Privacy accountant (dp-accounting): rdp or pld.",
    "server_lora": "per_client: the server keeps one adapter set per client on its blocks; frozen: none.",
    "fellrec_alpha": "FELLRec warm-weight alpha.",
    "fellrec_beta": "FELLRec warm-weight beta (curriculum heating speed).",
    "fellrec_temperature": "Temperature of the softmax over client losses.",
    "fellrec_variant": "code: exponent t + 1/beta and the released beta != 1 gate; paper: (t+1)/beta, always on.",
    "fellrec_similarity": "params: cosine of the adapters themselves (as released; with a shared adapter init "
                          "clients look near-identical); update: cosine of what each client learned this round.",
    "fellrec_private_tail": "Keep the client-tail block's adapters out of aggregation.",
    "fedprox_mu": "FedProx proximal coefficient mu.",
    "server_lr": "Server learning rate of the aggregating strategies (FedOpt, Reddi et al. 2021): each client's "
                 "new parameters are anchor + server_lr * (aggregate - anchor), anchor being what it started "
                 "the round from. 1 is plain aggregation; local and centralized have no server step.",
    "eval_every": "Validate every this many rounds.",
    "checkpoint_every": "Checkpoint every this many rounds (and after the last round or an early stop); a "
                        "resumed run redoes the rounds after its last checkpoint, identically.",
    "patience": "Stop after this many validations without improvement of the mean --select_by criterion.",
    "eval_batch_size": "Batch size for validation and test.",
    "profile_rounds": "Comma list of 0-based rounds to trace with jax.profiler into the run's profile/ folder "
                      "(<workdir>/profile, or <workdir>/<strategy>/profile with several strategies; view "
                      "with xprof or TensorBoard's profile plugin).",
    "export_merged": "--mode=export: also write each client's base with its adapter folded in, a transformers "
                     "model directory of its own (export/client_<i>_merged).",
    "mesh_clients": "Devices on the mesh's clients axis (default: all devices / mesh_model).",
    "mesh_model": "Devices on the mesh's model axis (the shared base weights are split over it).",
}

def _base_type(annotation):
  """`X` of `X | None`, else the annotation itself."""
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    return next(a for a in typing.get_args(annotation) if a is not type(None))
  return annotation


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per RunConfig field in `flag_values`."""
  hints = typing.get_type_hints(RunConfig)
  for field in dataclasses.fields(RunConfig):
    name, default, help_text = field.name, field.default, HELP[field.name]
    kind = _base_type(hints[name])
    if name in option_fields() and typing.get_origin(kind) is not tuple:
      flags.DEFINE_enum(name, default, option_fields()[name], help_text, flag_values=flag_values)
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE_list(name, None if default is None else [str(x) for x in default], help_text, flag_values=flag_values)
    elif kind is bool:
      flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif kind is int:
      flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind is float:
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
      flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def config_from_flags(values: flags.FlagValues) -> RunConfig:
  """The RunConfig of the parsed flags; a list flag with a bad element fails naming the flag."""
  hints = typing.get_type_hints(RunConfig)
  kwargs = {}
  for field in dataclasses.fields(RunConfig):
    value = values[field.name].value
    kind = _base_type(hints[field.name])
    if field.name == "split_k" and value == ["auto"]:
      value = ("auto",)
    elif typing.get_origin(kind) is tuple and value is not None:
      element = typing.get_args(kind)[0]
      element = str if typing.get_origin(element) is typing.Literal else element  # checked by RunConfig
      try:
        value = tuple(element(v) for v in value)
      except ValueError as e:
        raise ConfigError(f"--{field.name}={','.join(value)}: expected a comma list of {element.__name__}") from e
    kwargs[field.name] = value
  return RunConfig(**kwargs)

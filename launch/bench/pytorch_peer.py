"""Section pytorch_peer: one federated round of this framework against the loop a user would write with
plain PyTorch + PEFT instead.

The peer: transformers' `LlamaForCausalLM` built from our ModelConfig and holding our base weights
(`models.hf_checkpoint.decoder_state_dict`), SDPA attention and no KV cache, wrapped once by
`peft.get_peft_model` (LoRA r=8, alpha 16, dropout 0.05 on q_proj and v_proj) and loaded once. Each client
owns its adapter tensors and its own `torch.optim.AdamW` (the fused kernel, torch's fastest on CPU) over the
adapter parameters only, with optax.adamw's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay
1e-4). A round copies a client's adapters into the model, runs its local steps in train mode (LoRA dropout
on) on exactly our token batches, with transformers' own `labels` loss (token-mean cross entropy on every
real next token, as ours), copies the adapters back, and after the last client mixes every client's
adapters with FELLRec's aggregation transcribed into torch (`torch_fellrec_aggregate`). Ours: the vmapped local round (`over_clients(..., "vmap")`, jitted) followed
by the jitted `fellrec_aggregate` on the round's adapters and per-client mean losses.

Why the comparison is fair: both sides run the same shapes on the same tokens from the same base weights
and initial adapters, with the same optimizer and aggregation, in fp32 on every core (torch's intra-op
threads set to the cores XLA's CPU pool uses). The peer is lean: the base is never reloaded or copied,
only the trainable tensors move between clients, and each client keeps its optimizer state in place
rather than serialising it. It runs eager, as PEFT training loops do by default. The two sides' calls
alternate (ours, peer, ours, peer, ...) after one warm-up each (compilation, lazy optimizer state), so
load that drifts during the measurement hits both; the medians are reported. Each timed call follows an
untimed call of the same side: in one process, our first SmolLM2 round after a peer round took 23-30 s
against 12-15 s for the next (with or without huge pages or passive OpenMP waits, even after a 5 s
pause; not understood), a cost no user running one framework pays. Before timing, client 0's
first-step loss is computed both ways with dropout off and non-zero adapters: if the two disagree, the
sides are not running the same workload and the section raises.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

from absl import logging

from launch.bench.fixtures import Round, local_update, make_round, smollm2_config
from launch.bench.measure import Table, interleaved_seconds, jaxpr_flops
from models.peft_export import PEFT_MODULES, peft_state_dict

# clients, samples per client, tokens per sample, micro-batch (local steps = samples / micro-batch)
WORKLOADS = {"tiny": dict(clients=16, samples=8, seq_len=64, micro_batch=4),
             "smollm2": dict(clients=4, samples=4, seq_len=128, micro_batch=4)}
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)  # optax.adamw(1e-3)'s defaults
LOSS_RTOL = 1e-4
METHOD = ("interleaved ours/peer calls (A B A B ...) after one warm-up each, each timed call after an untimed "
          "call of the same side, medians; each call is one "
          "federated round of C clients' local AdamW steps plus FELLRec aggregation: ours the jitted vmapped "
          "round + jitted fellrec_aggregate, the peer transformers' LlamaForCausalLM + PEFT LoRA (base loaded "
          "once, per-client adapters and AdamW state swapped in place, eager) + the same aggregation in torch")


def workload_model(name: str):
  """`(config, base params)` of a workload, random fp32 weights. tiny: a Llama of d=128, 4 blocks (unrolled,
  `scan_layers=False`), 4 heads / 2 KV heads of 32, MLP 256, vocab 1,024, tied embeddings; smollm2:
  SmolLM2-135M's shapes with an untied head. Both carry LoRA r=8, alpha 16, dropout 0.05 on q and v."""
  import jax
  import models
  lora = models.LoraConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q", "v"))
  if name == "tiny":
    # unrolled blocks: 0.54-0.55 s against 0.71 s scanned per round in this section (SmolLM2 is slower
    # unrolled, 18.6 s against 17.2 s, with compiles of 65 s against 30 s, so it keeps the scan)
    config = models.tiny_llama(vocab_size=1024, hidden_size=128, head_dim=32, intermediate_size=256, lora=lora,
                               scan_layers=False)
  elif name == "smollm2":
    config = dataclasses.replace(smollm2_config(lora=lora), tie_embeddings=False)
  else:
    raise ValueError(f"unknown pytorch_peer workload {name!r}; expected one of {sorted(WORKLOADS)}")
  return config, jax.jit(models.init_params, static_argnums=0)(config, jax.random.key(0))


def model_shape(config) -> dict:
  """The model fields the JSON records beside a workload's C, samples, T and micro-batch."""
  lora = config.lora
  return {"d": config.hidden_size, "layers": config.num_layers, "heads": config.num_heads,
          "kv_heads": config.num_kv_heads, "head_dim": config.head_dim, "intermediate": config.intermediate_size,
          "vocab": config.vocab_size, "tied_embeddings": config.tie_embeddings, "dtype": config.compute_dtype,
          "scan_layers": config.scan_layers,
          "lora": f"r={lora.rank} alpha={lora.alpha:g} dropout={lora.dropout:g} on {','.join(lora.targets)}"}


# ----------------------------------------------------------------------------- the peer

def peer_model(config, base):
  """transformers' `LlamaForCausalLM` with `config`'s shapes holding our `base` weights (a strict load of
  every tensor), then wrapped by PEFT with `config.lora`'s adapters."""
  import numpy as np
  import peft
  import torch
  import transformers
  from models.hf_checkpoint import decoder_hf_config, decoder_state_dict
  if config.arch != "llama" or config.rope_scaling is not None or config.qkv_bias or config.compute_dtype != "float32":
    raise ValueError("the PyTorch peer mirrors plain fp32 Llama decoders only")
  hf_config = transformers.LlamaConfig.from_dict(decoder_hf_config(config), use_cache=False,
                                                 attn_implementation="sdpa")
  model = transformers.LlamaForCausalLM(hf_config)
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in decoder_state_dict(config, base).items()}
  model.load_state_dict(state, strict=True)
  lora = config.lora
  return peft.get_peft_model(model, peft.LoraConfig(
      r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
      target_modules=[PEFT_MODULES[t] for t in lora.targets]))


def peer_batches(batches: dict) -> list[list[dict]]:
  """Our batches `[C, S, 1, B, T]` as torch tensors per client and step: input_ids (int64), attention_mask,
  labels (the ids, -100 on padding: transformers' loss then covers every real next token, as ours) and the
  step's target-token count."""
  import numpy as np
  import torch
  ids, mask = np.asarray(batches["input_ids"]), np.asarray(batches["attention_mask"])
  if ids.shape[2] != 1:
    raise ValueError("the PyTorch peer steps once per micro-batch: gradient accumulation is not mirrored")
  per_client = []
  for c in range(ids.shape[0]):
    steps = []
    for s in range(ids.shape[1]):
      x, m = torch.from_numpy(ids[c, s, 0].astype(np.int64)), torch.from_numpy(mask[c, s, 0].astype(np.int64))
      steps.append({"input_ids": x, "attention_mask": m, "labels": x.masked_fill(m == 0, -100),
                    "targets": int(m[:, 1:].sum())})
    per_client.append(steps)
  return per_client


@dataclasses.dataclass
class Peer:
  """The PyTorch round's state: the model (base loaded once), its trainable parameters and their names,
  every client's copies of them stacked on clients (`[C, *param shape]`), one AdamW per client, and the
  batches."""

  model: Any
  names: list
  params: list
  adapters: list
  optimizers: list
  batches: list


def make_peer(rnd: Round) -> Peer:
  """The peer of `rnd`: same config, base weights, initial adapters and token batches."""
  import torch
  model = peer_model(rnd.config, rnd.base)
  trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
  stacks = peft_state_dict(rnd.lora, "default")
  if set(trainable) != set(stacks):
    raise ValueError(f"PEFT's adapters {sorted(trainable)[:2]}... do not match ours {sorted(stacks)[:2]}...")
  names, params = list(trainable), list(trainable.values())
  adapters = [torch.from_numpy(stacks[name]) for name in names]
  optimizers = [torch.optim.AdamW(params, **ADAMW, fused=True) for _ in range(rnd.num_clients)]
  model.train()
  return Peer(model, names, params, adapters, optimizers, peer_batches(rnd.batches))


def set_adapters(peer: Peer, tensors) -> None:
  """Copies one client's adapter tensors (in `peer.params` order) into the model."""
  import torch
  with torch.no_grad():
    for p, x in zip(peer.params, tensors):
      p.copy_(x)


def peer_loss(model, batch: dict):
  """The token-mean next-token cross entropy of one micro-batch (transformers' `labels` loss)."""
  return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def peer_client(peer: Peer, c: int):
  """Client c's local round: its adapters into the model, one AdamW step per micro-batch, the adapters
  back to its copy. Returns its token-weighted mean loss (a scalar tensor)."""
  import torch
  set_adapters(peer, [a[c] for a in peer.adapters])
  optimizer = peer.optimizers[c]
  loss_sum, targets = torch.zeros(()), 0
  for batch in peer.batches[c]:
    optimizer.zero_grad(set_to_none=True)
    loss = peer_loss(peer.model, batch)
    loss.backward()
    optimizer.step()
    loss_sum += loss.detach() * batch["targets"]
    targets += batch["targets"]
  with torch.no_grad():
    for a, p in zip(peer.adapters, peer.params):
      a[c].copy_(p)
  return loss_sum / max(targets, 1)


def peer_round(peer: Peer, alpha: float, beta: float):
  """One federated round: every client's local steps, then FELLRec's mix of their adapters (round 0).
  Returns the clients' mean losses `[C]`."""
  import torch
  losses = torch.stack([peer_client(peer, c) for c in range(len(peer.optimizers))])
  with torch.no_grad():
    peer.adapters = torch_fellrec_aggregate(peer.adapters, losses, 0, alpha=alpha, beta=beta)
  return losses


def torch_fellrec_aggregate(stacked: list, losses_c, round_index: int, *, alpha: float, beta: float,
                            temperature: float = 0.05) -> list:
  """`federated.strategies.fellrec_aggregate` in torch, for the defaults the runs use (variant "code",
  every client participating, similarity on the parameters themselves, no item table).

  stacked: tensors `[C, ...]`; losses_c: `[C]` mean local losses. Returns the mixed tensors: client i gets
  `sum_j a_ij theta_j / sum_j a_ij` with `a_ii = 1`, `a_ij = w_i s_ij`, `s_ij = (cos(theta_i, theta_j) + 1) / 2`
  over all parameters, and the warm weight `w_i = tanh(alpha / softmax(losses / T)_i ** (t + 1/beta))` (the
  released code applies it only when beta != 1).
  """
  import torch
  flat = [x.reshape(x.shape[0], -1).float() for x in stacked]
  gram = sum(f @ f.T for f in flat)
  norms = gram.diagonal().sqrt()
  s = (gram / torch.clamp(norms[:, None] * norms[None, :], min=1e-12) + 1.0) / 2.0
  share = torch.softmax(losses_c.float() / temperature, dim=0)
  w = torch.tanh(alpha / share ** (round_index + 1.0 / beta))
  applied = w if beta != 1 else torch.ones_like(w)
  a = torch.where(torch.eye(s.shape[0], dtype=torch.bool), torch.ones_like(s), applied[:, None] * s)
  a = a / a.sum(dim=1, keepdim=True)
  return [(a @ f).reshape(x.shape).to(x.dtype) for f, x in zip(flat, stacked)]


# ----------------------------------------------------------------------------- ours, the check, the timing

def fellrec_defaults() -> tuple[float, float]:
  """FELLRec's alpha and beta as a run gets them by default (`RunConfig`)."""
  from fellrec_jax.config import RunConfig
  return RunConfig.fellrec_alpha, RunConfig.fellrec_beta


def ours_round(rnd: Round, alpha: float, beta: float):
  """`() -> (adapters, opt_state)`: the jitted vmapped local round, then the jitted FELLRec aggregation of
  its adapters with its per-client mean losses (round 0)."""
  import jax
  from federated import client, strategies
  train = jax.jit(client.over_clients(local_update(rnd), "vmap"))
  aggregate = jax.jit(lambda stacked, losses: strategies.fellrec_aggregate(stacked, losses, 0, alpha=alpha, beta=beta))

  def run():
    lora, opt_state, stats = train(*rnd.args())
    return aggregate(lora, stats["loss"]), opt_state
  return run


def probe_adapters(rnd: Round):
  """Client 0's adapters with B made non-zero (fresh adapters have B = 0, which would hide a wrong
  conversion of either factor or of the scale)."""
  import jax
  import numpy as np
  lora = jax.tree.map(lambda x: np.asarray(x[0]), rnd.lora)
  rng = np.random.default_rng(0)
  for ab in lora["blocks"].values():
    ab["b_ro"] = (0.2 * rng.standard_normal(ab["b_ro"].shape)).astype(np.float32)
  return lora


def first_losses(rnd: Round, peer: Peer) -> tuple[float, float]:
  """Client 0's loss on its first micro-batch, ours (`federated.client.forward_loss`, what the local step
  differentiates) and the peer's (`peer_loss`), dropout off in both, with the same non-zero adapters."""
  import jax
  import torch
  from federated import client
  lora = probe_adapters(rnd)
  batch = jax.tree.map(lambda x: x[0, 0, 0], rnd.batches)
  spec = client.LocalSpec(rnd.config)
  loss_sum, count = jax.jit(lambda base, lp, b: client.forward_loss(spec, base, lp, b))(rnd.base, lora, batch)
  stacks = peft_state_dict(lora, "default")
  set_adapters(peer, [torch.from_numpy(stacks[name]) for name in peer.names])
  peer.model.eval()  # no LoRA dropout
  with torch.no_grad():
    theirs = float(peer_loss(peer.model, peer.batches[0][0]))
  peer.model.train()
  return float(loss_sum / count), theirs


def check_first_losses(rnd: Round, peer: Peer) -> tuple[float, float]:
  """`first_losses`, raising when they differ by more than LOSS_RTOL relative."""
  ours, theirs = first_losses(rnd, peer)
  if not abs(ours - theirs) <= LOSS_RTOL * abs(ours):
    raise RuntimeError(f"first-step loss of client 0: ours {ours:.6f}, PyTorch + PEFT {theirs:.6f}: the two "
                       "sides are not running the same workload")
  return ours, theirs


def time_workload(name: str, repeats: int, table: Table, threads: dict, peak_flops: float | None = None) -> dict:
  """One workload's check and interleaved timing, as a JSON run; with `peak_flops`, both sides' MFU: the
  local round's matmul FLOPs (`jaxpr_flops`, the same work on both sides) per second over the peak."""
  from federated import client
  w = WORKLOADS[name]
  config, base = workload_model(name)
  steps = w["samples"] // w["micro_batch"]
  rnd = make_round(config, base, w["clients"], steps, w["micro_batch"], w["seq_len"])
  peer = make_peer(rnd)
  first_ours, first_peer = check_first_losses(rnd, peer)
  alpha, beta = fellrec_defaults()
  times = interleaved_seconds({"ours": ours_round(rnd, alpha, beta), "peer": lambda: peer_round(peer, alpha, beta)},
                              repeats, settle=1)
  ours, theirs = statistics.median(times["ours"]), statistics.median(times["peer"])
  shape = {"C": w["clients"], "samples_per_client": w["samples"], "T": w["seq_len"], "micro_batch": w["micro_batch"],
           "steps_per_client": steps} | model_shape(config)
  table.add(name, f"{w['clients']}x{steps}x{w['micro_batch']}x{w['seq_len']}", ours, theirs, theirs / ours,
            first_ours, first_peer)
  run = {"workload": name, "ours_seconds": ours, "peer_seconds": theirs, "ratio": theirs / ours,
         "threads": threads, "ours_all_seconds": times["ours"], "peer_all_seconds": times["peer"], "shape": shape,
         "first_loss_ours": first_ours, "first_loss_peer": first_peer}
  if peak_flops:
    flops = jaxpr_flops(client.over_clients(local_update(rnd), "vmap"), *rnd.args(), while_trips=rnd.steps)
    run |= {"round_flops": flops, "ours_mfu": flops / ours / peak_flops, "peer_mfu": flops / theirs / peak_flops}
  return run


def pytorch_peer_section(quick: bool, repeats: int, workloads: list[str] | None = None,
                         peak_flops: float | None = None) -> dict:
  """Ours vs PyTorch + PEFT on one federated round: "tiny" (and "smollm2" unless `quick`); MFU of both
  against `peak_flops` when given. Without torch or peft installed: a warning and `{"skipped": reason}`."""
  try:
    import peft  # noqa: F401
    import torch
  except ImportError as e:
    logging.warning("pytorch_peer section skipped: %s", e)
    return {"skipped": f"torch or peft is not importable ({e})"}
  names = workloads or (["tiny"] if quick else ["tiny", "smollm2"])
  cores = os.cpu_count()
  table = Table("ours vs PyTorch + PEFT: one FELLRec round (median seconds)",
                ["workload", "CxSxBxT", "ours s", "peer s", "peer / ours", "loss ours", "loss peer"])
  previous = torch.get_num_threads()
  torch.set_num_threads(cores)  # every core, as XLA's CPU thread pool uses
  try:
    runs = [time_workload(name, repeats, table, {"torch": torch.get_num_threads(), "xla": cores}, peak_flops)
            for name in names]
  finally:
    torch.set_num_threads(previous)
  return {"runs": runs, "method": METHOD}

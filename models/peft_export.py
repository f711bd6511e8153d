"""Our LoRA adapters in PEFT's saved format, so `peft.PeftModel.from_pretrained` puts a client's adapter on
transformers' model of the same base.

Our layout `{"blocks": {t: {"a_ir": [L, in, r], "b_ro": [L, r, out]}}}` computes `x @ A @ B * alpha / r`;
PEFT's `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` compute `B(A(x)) * alpha / r` with torch's
`[out, in]` linear weights, so each factor is one block's slice, transposed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from models.config import LoraConfig

# Our projection names -> transformers' Llama-family module names.
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}
ADAPTER_CONFIG = "adapter_config.json"  # peft.utils.CONFIG_NAME
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME
ITEM_WEIGHTS = "items.safetensors"  # trainable item rows, which PEFT has no place for


def peft_name(target: str, layer: int, factor: str, adapter: str | None = None) -> str:
  """PEFT's name of one block's LoRA factor ("A" or "B") on `target` ("q", "v", ...): as `save_pretrained`
  writes it (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), or with `adapter` (e.g.
  "default") as a loaded `PeftModel` names its parameter (`...lora_A.default.weight`)."""
  group = "self_attn" if target in ("q", "k", "v", "o") else "mlp"
  factor = f"lora_{factor}" if adapter is None else f"lora_{factor}.{adapter}"
  return f"base_model.model.model.layers.{layer}.{group}.{PEFT_MODULES[target]}.{factor}.weight"


def peft_state_dict(lora, adapter: str | None = None) -> dict[str, np.ndarray]:
  """Our adapters `{"blocks": {t: {"a_ir": [..., L, in, r], "b_ro": [..., L, r, out]}}}` (any leading axes,
  e.g. clients) as PEFT's fp32 numpy tensors named by `peft_name(..., adapter)`: lora_A `[..., r, in]` =
  a_ir[..., l, :, :].T, lora_B `[..., out, r]` = b_ro[..., l, :, :].T."""
  out = {}
  for target, ab in lora["blocks"].items():
    a, b = np.asarray(ab["a_ir"], np.float32), np.asarray(ab["b_ro"], np.float32)
    for layer in range(a.shape[-3]):
      out[peft_name(target, layer, "A", adapter)] = np.ascontiguousarray(np.swapaxes(a[..., layer, :, :], -1, -2))
      out[peft_name(target, layer, "B", adapter)] = np.ascontiguousarray(np.swapaxes(b[..., layer, :, :], -1, -2))
  return out


def adapter_config(lora: LoraConfig, base_model: str | None) -> dict:
  """PEFT's `adapter_config.json` of our adapters: plain LoRA (no DoRA, rsLoRA or biases) on every block's
  `lora.targets`, scaled by alpha / r. Dropout is kept for further training; inference ignores it."""
  return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
          "target_modules": [PEFT_MODULES[t] for t in lora.targets], "bias": "none", "fan_in_fan_out": False,
          "use_rslora": False, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
          "inference_mode": True}


def save_adapter(path: str | pathlib.Path, lora_config: LoraConfig, lora, base_model: str | None) -> pathlib.Path:
  """Writes one client's adapter `{"blocks": {t: {"a_ir": [L, in, r], "b_ro": [L, r, out]}}[, "items": ...]}`
  as a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`). Trainable item rows
  (`lora["items"]`: table, low-rank correction, ID embeddings) go to `items.safetensors` under our names and
  shapes. Returns the directory."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  save_file(peft_state_dict(lora), str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
  (path / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora_config, base_model), indent=1))
  if lora.get("items"):
    save_file({k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in lora["items"].items()},
              str(path / ITEM_WEIGHTS))
  return path

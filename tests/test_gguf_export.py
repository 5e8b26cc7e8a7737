"""Tests for the GGUF export (fcp_jax.models.gguf_export, experiments/export_gguf.py).

Tiny ternary models (hidden 256, MLP 512, so every K is a multiple of 256) are exported,
read back with ``gguf.GGUFReader`` and ``gguf.quants.dequantize``, and compared with the
ternary weights the model trains with, with the project's GGUF importer (llama, qwen2)
and with a numpy forward pass of llama.cpp's bitnet graph written here.

The opt-in llama.cpp test needs ``llama-cpp-python`` (it builds llama.cpp from source):

    .venv/bin/pip install llama-cpp-python
    FCP_LLAMA_CPP=1 .venv/bin/python -m pytest -q tests/test_gguf_export.py -k llama_cpp

It trains a tiny character model for a few seconds, exports it (llama and bitnet
architectures) and checks that llama.cpp's greedy tokens equal the JAX packed model's.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from fcp_jax import testing
from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import gguf_export
from fcp_jax.models import gguf_loader
from fcp_jax.models import packing
from fcp_jax.models import transformer as transformer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIMS = dict(vocab_size=320, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64,
            mlp_dim=512, weight_quant="absmean")
KINDS = {"attn_q": ("attn", "q_proj"), "attn_k": ("attn", "k_proj"),
         "attn_v": ("attn", "v_proj"), "attn_output": ("attn", "o_proj"),
         "ffn_gate": ("mlp", "gate_proj"), "ffn_up": ("mlp", "up_proj"),
         "ffn_down": ("mlp", "down_proj")}
IDS = np.random.RandomState(0).randint(0, 100, (2, 12))


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def _model(**overrides):
  """(cfg, params) of a tiny ternary model; every norm gain perturbed away from 1."""
  cfg, _, params = testing.tiny_model(**{**DIMS, **overrides})
  rng = np.random.RandomState(1)

  def perturb(path, x):
    noise = rng.randn(*x.shape).astype(np.float32)
    return {"scale": 1.0 + 0.3 * noise, "norm_scale": 1.0 + 0.3 * noise,
            "bias": 0.1 * noise}.get(path[-1].key, np.asarray(x))

  return cfg, jax.tree_util.tree_map_with_path(perturb, params)


def _read(path):
  """{name: (float32 array in GGUF row order [out, in] or 1-D, quantization type)}."""
  out = {}
  for t in gguf.GGUFReader(path).tensors:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    value = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
    out[t.name] = (np.asarray(value, np.float32), t.tensor_type)
  return out


def _field(path, key):
  return smollm2.gguf_field(gguf.GGUFReader(path), key)


def _kinds(tensors):
  """Tensor names as gguf's MODEL_TENSORS spells them (``blk.{bid}.attn_q``)."""
  return {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n).rsplit(".", 1)[0] for n in tensors}


def _arch_kinds(arch):
  return {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}


def _trained_weight(cfg, params, layer, kind):
  """The weight the model computes with at λ = 1 (its fake quantization), [K, N]."""
  path = (f"layers_{layer}",) + kind
  wq = packing.layer_quantizer(packing.ternary_layers(cfg)[path])
  p = params[path[0]][kind[0]][kind[1]]
  qparams = {n: p[n] for n in wq.param_shapes(p["kernel"].shape)}
  w_hat, _ = wq.fake_quant(jnp.asarray(p["kernel"]), qparams, jnp.float32(1.0))
  return np.asarray(w_hat)


def llama_cpp_permute(weights, n_head):
  """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py (rows of one head)."""
  return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
          .swapaxes(1, 2).reshape(weights.shape))


def _assert_ternary_equal(got, w_hat):
  """``got`` = fp16(s)·T: same codes as ``w_hat`` = s·T, scales within fp16 rounding."""
  np.testing.assert_array_equal(np.sign(got), np.sign(w_hat))
  np.testing.assert_allclose(got, w_hat, rtol=2.0 ** -11, atol=0)


def _logits(cfg, params, ids=IDS):
  logits, _ = jax.jit(transformer_lib.Transformer(cfg).apply)({"params": params},
                                                              jnp.asarray(ids))
  return np.asarray(logits)


def _bpe_tokenizer():
  """A tiny byte-level BPE (SmolLM2's pre-tokenizer) wrapped as our HFTokenizer."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  merges = [("h", "e"), ("Ġ", "t"), ("Ġt", "he"), ("l", "l"), ("ll", "o")]
  vocab = {t: i for i, t in enumerate(alphabet + ["he", "Ġt", "Ġthe", "ll", "llo"])}
  raw = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  raw.pre_tokenizer = smollm2.GGUF_PRE_TOKENIZERS.lookup("smollm")()
  raw.decoder = decoders.ByteLevel()
  raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
  raw.add_tokens([AddedToken("<think>", special=False, normalized=False)])
  return tokenizer_lib.HFTokenizer(raw)


# ---------------------------------------------------------------- ternary kernels
@pytest.mark.parametrize("ternary_type, bits", [("tq2_0", 2.0625), ("tq1_0", 1.6875)])
def test_kernels_read_back_as_the_trained_ternary_weights(tmp_path, ternary_type, bits):
  cfg, params = _model()
  path = str(tmp_path / "m.gguf")
  info = gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer(),
                                 ternary_type=ternary_type)
  assert info.arch == "llama" and info.bits_per_weight == bits
  assert info.ternary_tensors == 14 and info.ternary_weights == 2 * 589_824
  assert info.file_bytes == os.path.getsize(path)
  tensors = _read(path)
  qtype = gguf_export.TERNARY_TYPES[ternary_type]
  for layer in range(cfg.num_layers):
    for gguf_kind, kind in KINDS.items():
      got, got_type = tensors[f"blk.{layer}.{gguf_kind}.weight"]
      assert got_type == qtype
      w_hat = _trained_weight(cfg, params, layer, kind).T  # [N, K]
      heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(gguf_kind)
      if heads:  # llama.cpp's NORM RoPE layout, as its converter writes it.
        w_hat = llama_cpp_permute(w_hat, heads)
      _assert_ternary_equal(got, w_hat)
  # Absmean by its formula: one scale γ = mean|W| per tensor, codes round(W/γ).
  kernel = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  gamma = max(np.mean(np.abs(kernel)), 1e-5)
  _assert_ternary_equal(tensors["blk.1.ffn_down.weight"][0],
                        gamma * np.clip(np.round(kernel / gamma), -1, 1).T)


def test_metadata(tmp_path):
  cfg, params = _model()
  cfg = cfg.replace(rope_base=5_000.0, norm_eps=1e-5)
  path = str(tmp_path / "m.gguf")
  gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer(),
                          context_length=512, name="tiny")
  want = {"general.architecture": "llama", "general.name": "tiny",
          "general.file_type": int(gguf.LlamaFileType.MOSTLY_TQ2_0),
          "general.quantization_version": gguf.GGML_QUANT_VERSION,
          "llama.context_length": 512, "llama.embedding_length": 256,
          "llama.block_count": 2, "llama.feed_forward_length": 512,
          "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
          "llama.attention.key_length": 64, "llama.rope.dimension_count": 64,
          "llama.vocab_size": 320, "llama.rope.freq_base": 5_000.0}
  for key, value in want.items():
    assert _field(path, key) == value, key
  assert abs(_field(path, "llama.attention.layer_norm_rms_epsilon") - 1e-5) < 1e-10
  tensors = _read(path)
  assert tensors["token_embd.weight"][1] == gguf.GGMLQuantizationType.F16
  assert tensors["blk.0.attn_norm.weight"][1] == gguf.GGMLQuantizationType.F32
  np.testing.assert_array_equal(tensors["output_norm.weight"][0],
                                params["final_norm"]["scale"])
  np.testing.assert_allclose(tensors["token_embd.weight"][0],
                             params["embed"]["embedding"], rtol=1e-3, atol=1e-6)
  assert "output.weight" not in tensors and len(tensors) == 2 + 2 * 9
  assert _kinds(tensors) <= _arch_kinds(gguf.MODEL_ARCH.LLAMA)


def test_scanned_layers_export_the_same_file(tmp_path):
  cfg, params = _model()
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs), params["layers_0"],
                                   params["layers_1"])
  a, b = str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")
  gguf_export.export_gguf(a, cfg, params, testing.char_tokenizer(), name="m")
  gguf_export.export_gguf(b, cfg.replace(scan_layers=True), stacked,
                          testing.char_tokenizer(), name="m")
  with open(a, "rb") as fa, open(b, "rb") as fb:
    assert fa.read() == fb.read()


@pytest.mark.parametrize("overrides, arch", [
    ({}, "llama"),
    ({"tie_embeddings": False,
      "quant_layers": ("q", "k", "v", "o", "gate", "up", "down", "head")}, "llama"),
    ({"qkv_bias": True, "quant_layers": ("q", "k", "v", "o", "up")}, "qwen2"),
], ids=["tied", "untied-ternary-head", "qwen2-bias-float-gate-down"])
def test_export_then_import_gives_the_same_logits(tmp_path, overrides, arch):
  cfg, params = _model(**overrides)
  path = str(tmp_path / "m.gguf")
  info = gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer(),
                                 float_type="f32")
  assert info.arch == arch
  types = {n: t for n, (_, t) in _read(path).items()}
  for name, kind in (("output", "head"), ("blk.0.ffn_gate", "gate"),
                     ("blk.0.attn_q", "q")):
    if f"{name}.weight" in types:
      want = gguf.GGMLQuantizationType.TQ2_0 if cfg.quantizes(kind) else (
          gguf.GGMLQuantizationType.F32)
      assert types[f"{name}.weight"] == want, name
  cfg_g, params_g = gguf_loader.load_gguf(path)  # Float weights fp16(s)·T.
  assert (cfg_g.tie_embeddings, cfg_g.qkv_bias) == (cfg.tie_embeddings, cfg.qkv_bias)
  want = _logits(cfg, params)
  np.testing.assert_allclose(_logits(cfg_g, params_g), want, atol=2e-3 * np.abs(want).max())


def test_interleaved_rope_kernels_are_written_as_they_are(tmp_path):
  cfg, params = _model()
  cfg = cfg.replace(rope_style="interleaved")  # Same params, llama.cpp's own layout.
  path = str(tmp_path / "m.gguf")
  gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer(), float_type="f32")
  _assert_ternary_equal(_read(path)["blk.0.attn_k.weight"][0],
                        _trained_weight(cfg, params, 0, ("attn", "k_proj")).T)
  cfg_g, params_g = gguf_loader.load_gguf(path)  # Back to the half layout.
  want = _logits(cfg, params)
  np.testing.assert_allclose(_logits(cfg_g, params_g), want, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("spec", ["absmean(granularity='channel')",
                                  "seq(granularity='group', group_size=256)"])
def test_scales_constant_within_blocks_export(tmp_path, spec):
  cfg, params = _model(weight_quant=spec)
  path = str(tmp_path / "m.gguf")
  gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer())
  got = _read(path)["blk.0.ffn_down.weight"][0]  # K = 512: two groups of 256.
  w_hat = _trained_weight(cfg, params, 0, ("mlp", "down_proj")).T
  _assert_ternary_equal(got, w_hat)
  assert len(np.unique(np.abs(w_hat[w_hat != 0]))) > 2  # Several scales per tensor.


def test_llama3_rope_scaling_as_rope_freqs(tmp_path):
  cfg, params = _model()
  factor, low, high, orig = 8.0, 1.0, 4.0, 64
  cfg = cfg.replace(rope_scaling=("llama3", factor, low, high, orig), rope_base=500.0)
  path = str(tmp_path / "m.gguf")
  gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer())
  want = []  # llama.cpp's convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors.
  for freq in 1.0 / 500.0 ** (np.arange(0, 64, 2, dtype=np.float32) / 64):
    wavelen = 2 * np.pi / freq
    if wavelen < orig / high:
      want.append(1.0)
    elif wavelen > orig / low:
      want.append(factor)
    else:
      smooth = (orig / wavelen - low) / (high - low)
      want.append(1 / ((1 - smooth) / factor + smooth))
  np.testing.assert_allclose(_read(path)["rope_freqs.weight"][0], want, rtol=1e-5)


# --------------------------------------------------------------------------- bitnet
def _rms(x, g, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _bitnet_reference_logits(path, ids, eps):
  """llama.cpp's bitnet graph (src/models/bitnet.cpp) in numpy, from the GGUF alone."""
  t = {n: v for n, (v, _) in _read(path).items()}
  heads = _field(path, "bitnet.attention.head_count")
  kv = _field(path, "bitnet.attention.head_count_kv")
  base = _field(path, "bitnet.rope.freq_base")
  x = t["token_embd.weight"][ids]  # [B, T, D]
  b, s, d = x.shape
  h = d // heads
  angles = np.arange(s)[:, None] * base ** (-np.arange(0, h, 2) / h)  # [T, H/2]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

  def rope_neox(y):  # [B, T, N, H]: pairs offset by H/2.
    y1, y2 = y[..., :h // 2], y[..., h // 2:]
    return np.concatenate([y1 * cos - y2 * sin, y2 * cos + y1 * sin], -1)

  for i in range(_field(path, "bitnet.block_count")):
    w = lambda k, i=i: t[f"blk.{i}.{k}.weight"]
    a = _rms(x, w("attn_norm"), eps)
    q = rope_neox((a @ w("attn_q").T).reshape(b, s, heads, h))
    k = rope_neox((a @ w("attn_k").T).reshape(b, s, kv, h))
    v = (a @ w("attn_v").T).reshape(b, s, kv, h)
    k, v = np.repeat(k, heads // kv, 2), np.repeat(v, heads // kv, 2)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
    scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bnqk,bknh->bqnh", probs, v).reshape(b, s, d)
    x = x + _rms(o, w("attn_sub_norm"), eps) @ w("attn_output").T
    f = _rms(x, w("ffn_norm"), eps)
    gate, up = f @ w("ffn_gate").T, f @ w("ffn_up").T
    m = gate / (1 + np.exp(-gate)) * up
    x = x + _rms(m, w("ffn_sub_norm"), eps) @ w("ffn_down").T
  return _rms(x, t["output_norm.weight"], eps) @ t["token_embd.weight"].T


def test_bitnet_subln_maps_onto_llama_cpps_bitnet_graph(tmp_path):
  cfg, params = _model(subln=True)
  path = str(tmp_path / "bitnet.gguf")
  info = gguf_export.export_gguf(path, cfg, params, testing.char_tokenizer(),
                                 float_type="f32", ternary_type="tq1_0")
  assert info.arch == "bitnet" and _field(path, "general.architecture") == "bitnet"
  tensors = _read(path)
  for i in range(cfg.num_layers):  # SubLN gains: the ternary o/down input norms.
    for kind, layer in (("attn_sub_norm", ("attn", "o_proj")),
                        ("ffn_sub_norm", ("mlp", "down_proj"))):
      np.testing.assert_array_equal(
          tensors[f"blk.{i}.{kind}.weight"][0],
          params[f"layers_{i}"][layer[0]][layer[1]]["norm_scale"])
  # NEOX RoPE: Q rows stay in the half-rotation order.
  _assert_ternary_equal(tensors["blk.0.attn_q.weight"][0],
                        _trained_weight(cfg, params, 0, ("attn", "q_proj")).T)
  assert _kinds(tensors) == _arch_kinds(gguf.MODEL_ARCH.BITNET)  # All, no more.
  want = _logits(cfg, params)
  got = _bitnet_reference_logits(path, IDS, cfg.norm_eps)
  np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())
  # BitNet b1.58's per-token int8 activations are accepted (llama.cpp: 8-bit Q8_K).
  gguf_export.runtime_arch(cfg.replace(act_quant="absmax_int8"))
  with pytest.raises(KeyError, match="Unknown gguf architecture 'bitnet'"):
    gguf_loader.load_gguf(path)  # The project's importer reads llama / qwen2 only.


# ------------------------------------------------------------------------ tokenizer
def test_bpe_tokenizer_round_trips_through_the_importer(tmp_path):
  cfg, params = _model()
  tok = _bpe_tokenizer()
  path = str(tmp_path / "bpe.gguf")
  gguf_export.export_gguf(path, cfg, params, tok)
  assert _field(path, "tokenizer.ggml.model") == "gpt2"
  assert _field(path, "tokenizer.ggml.pre") == "smollm"
  tokens = _field(path, "tokenizer.ggml.tokens")
  types = _field(path, "tokenizer.ggml.token_type")
  assert len(tokens) == cfg.vocab_size and tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
  assert types[tok.token_to_id("<|im_end|>")] == gguf.TokenType.CONTROL
  assert types[tok.token_to_id("<think>")] == gguf.TokenType.USER_DEFINED
  assert types[tok.vocab_size] == gguf.TokenType.UNUSED
  assert _field(path, "tokenizer.ggml.eos_token_id") == tok.im_end_id
  assert _field(path, "tokenizer.ggml.add_bos_token") is False
  back = smollm2.tokenizer_from_gguf(path)
  assert tokens[:tok.vocab_size] == [tok.hf_tokenizer.id_to_token(i)
                                      for i in range(tok.vocab_size)]
  assert back.added_tokens == () and back.pad_id == tok.pad_id
  for text in ["hello the 42", "<|im_start|>user<think>\ncafé ☕<EF>x</EF><|im_end|>"]:
    assert back.encode(text) == tok.encode(text), text
    assert back.decode(back.encode(text)) == text


def test_char_tokenizer_as_a_sentencepiece_vocabulary(tmp_path):
  cfg, params = _model()
  tok = testing.char_tokenizer()
  path = str(tmp_path / "char.gguf")
  gguf_export.export_gguf(path, cfg, params, tok)
  assert _field(path, "tokenizer.ggml.model") == "llama"
  assert _field(path, "tokenizer.ggml.add_space_prefix") is False  # No "▁" prepended.
  tokens = _field(path, "tokenizer.ggml.tokens")
  types = _field(path, "tokenizer.ggml.token_type")
  assert _field(path, "tokenizer.ggml.unknown_token_id") == tok.unk_id
  specials = set(tokenizer_lib.SPECIAL_TOKENS)

  def spm_encode(text):  # llama.cpp: control tokens whole, "▁" for spaces, 1 char each.
    ids, i = [], 0
    lookup = {t: n for n, t in enumerate(tokens)}
    while i < len(text):
      special = next((s for s in specials if text.startswith(s, i)), None)
      piece = special or text[i].replace(" ", "\u2581")
      ids.append(lookup[piece])
      i += len(special or text[i])
    return ids

  for i in range(tok.vocab_size):
    piece = tokens[i].replace("\u2581", " ")
    assert piece == tok.decode([i])
    assert types[i] == (gguf.TokenType.CONTROL if piece in specials else
                        gguf.TokenType.UNKNOWN if i == tok.unk_id else
                        gguf.TokenType.NORMAL)
  text = "<|im_start|>user\n12 + 3 = ?\tok<|im_end|>"
  assert spm_encode(text) == tok.encode(text)


# ------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("overrides, message", [
    ({"extra_rmsnorm": True}, "extra_rmsnorm=True: an RMSNorm at the input"),
    ({"mlp_activation": "relu2"}, "mlp_activation='relu2': .*ReLU²"),
    ({"weight_quant": "dlt(granularity='channel')"}, "DLT's learned shift"),
    ({"weight_quant": "tequila"}, "Tequila's dead-zone bias"),
    ({"weight_quant": "absmean(granularity='group', group_size=128)"},
     "changes its scale every 128 inputs; TQ1_0/TQ2_0 hold one fp16 scale per block"),
    ({"act_quant": "elastic"}, "act_quant='elastic': a learned LSQ step"),
    ({"act_quant": "absmax_int8(bits=4)"}, "bits=4: the model was trained on 4-bit"),
    ({"subln": True, "tie_embeddings": False}, "tie_embeddings=False: .*bitnet"),
    ({"subln": True, "quant_layers": ("q", "k", "v", "gate", "up", "down")},
     "quant_layers=.*SubLN lives in the ternary o_proj"),
    ({"qkv_bias": True, "rope_scaling": ("llama3", 8.0, 1.0, 4.0, 64)},
     "rope_scaling=.*only the llama architecture"),
    ({"embed_dim": 128, "num_heads": 2}, "input dim K=128: .*K % 256 == 0"),
])
def test_refusals_say_why(overrides, message):
  cfg = transformer_lib.get_variant("tiny", **{**DIMS, **overrides})
  with pytest.raises(ValueError, match=message):
    gguf_export.runtime_arch(cfg)


def test_refused_export_writes_nothing(tmp_path):
  cfg, params = _model()
  path = tmp_path / "m.gguf"
  with pytest.raises(ValueError, match="extra_rmsnorm"):
    gguf_export.export_gguf(str(path), cfg.replace(extra_rmsnorm=True), params,
                            testing.char_tokenizer())
  with pytest.raises(ValueError, match="Unknown ternary_type 'q4_0'"):
    gguf_export.export_gguf(str(path), cfg, params, testing.char_tokenizer(),
                            ternary_type="q4_0")
  with pytest.raises(ValueError, match="layers_2/.* missing vs"):  # 2 layers of 3.
    gguf_export.export_gguf(str(path), cfg.replace(num_layers=3), params,
                            testing.char_tokenizer())
  with pytest.raises(ValueError, match="4 embedding rows"):
    gguf_export.tokenizer_vocab(testing.char_tokenizer(), 4)
  assert not path.exists()


def test_every_config_field_is_classified():
  fields = {f.name for f in dataclasses.fields(transformer_lib.TransformerConfig)}
  assert fields <= set(gguf_export.CONFIG_FIELDS), fields - set(gguf_export.CONFIG_FIELDS)


def test_qk_layouts_agree_with_the_importer():
  for name in ("llama", "qwen2"):
    assert (gguf_export.ARCHITECTURES[name].permuted_qk
            == gguf_loader.GGUF_ARCHITECTURES.lookup(name).permuted_qk)


# --------------------------------------------------------------------- the command
def test_export_command(tmp_path, capsys):
  cfg, params = _model()
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {"model": {"variant": "tiny", **DIMS}, "tokenizer": "char"}))
  packing.save_params(params, str(workdir / "params.safetensors"))
  info = testing.load_driver(os.path.join(REPO, "experiments", "export_gguf.py")).main(["--workdir", str(workdir), "--type", "tq1_0"])
  printed = capsys.readouterr().out
  assert "bits/weight" in printed and "1.6875" in printed and "file size" in printed
  assert info.path == str(workdir / "gguf" / "model.tq1_0.gguf")
  _assert_ternary_equal(_read(info.path)["blk.0.ffn_up.weight"][0],
                        _trained_weight(cfg, params, 0, ("mlp", "up_proj")).T)


# ------------------------------------------------------------- llama.cpp (opt-in)
def _train_char_model(overrides, steps=150):
  """(cfg, params) after a few Adam steps on "0123456789" cycles, so that greedy
  decoding is decisive."""
  import optax  # pylint: disable=g-import-not-at-top
  cfg, model, params = testing.tiny_model(**{**DIMS, **overrides})
  tok = testing.char_tokenizer()
  text = "0123456789" * 8
  ids = np.asarray([tok.encode(text[i:i + 33]) for i in range(8)])
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    def loss(p):
      logits, _ = model.apply({"params": p}, ids[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return cfg, params


@pytest.mark.skipif(os.environ.get("FCP_LLAMA_CPP") != "1"
                    or importlib.util.find_spec("llama_cpp") is None,
                    reason="opt-in: FCP_LLAMA_CPP=1 and llama-cpp-python installed")
@pytest.mark.parametrize("overrides", [{}, {"subln": True, "act_quant": "absmax_int8"}],
                         ids=["llama", "bitnet"])
def test_llama_cpp_greedy_tokens_match_jax(tmp_path, overrides):
  import llama_cpp  # pylint: disable=g-import-not-at-top
  cfg, params = _train_char_model(overrides)
  tok = testing.char_tokenizer()
  path = str(tmp_path / "m.gguf")
  gguf_export.export_gguf(path, cfg, params, tok, float_type="f32")
  packed = packing.pack_params(params, cfg)
  llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_threads=2, verbose=False,
                        logits_all=True)  # scores[i]: the logits after token i.
  for prompt in ["012", "4567", "90123"]:
    ids = tok.encode(prompt)
    ours = list(ids)
    for _ in range(8):  # JAX packed model, greedy.
      ours.append(int(np.argmax(_logits(cfg, packed, np.asarray([ours]))[0, -1])))
    llm.reset()
    llm.eval(ids)
    theirs = []
    for _ in range(8):
      theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
      llm.eval([theirs[-1]])
    assert theirs == ours[len(ids):], (prompt, tok.decode(theirs), tok.decode(ours))

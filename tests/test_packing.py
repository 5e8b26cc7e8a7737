"""Tests for fcp_jax.models.packing: TQ2 codes, export = fake quant, packed inference,
the prepared inference form and its CPU kernel, files, the export command and the
bitnet.cpp / Hugging Face adapters."""

import functools
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import packing
from fcp_jax.models import ternary
from fcp_jax.models import ternary_kernel
from fcp_jax.models import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_codes(shape, seed=0, p_zero=0.4):
  rng = np.random.default_rng(seed)
  return rng.choice([-1, 0, 1], size=shape, p=[(1 - p_zero) / 2, p_zero, (1 - p_zero) / 2])


def _decode_tq2(packed, k):
  """Independent decoder written from the spec: byte[r, j] bits 2i..2i+1 = T[r+iR, j]+1."""
  packed = np.asarray(packed)
  rows, n = packed.shape
  out = np.zeros((4 * rows, n), np.int64)
  for r in range(rows):
    for j in range(n):
      for i in range(4):
        out[r + i * rows, j] = ((int(packed[r, j]) >> (2 * i)) & 3) - 1
  return out[:k]


# --------------------------------------------------------------------------- codes


@pytest.mark.parametrize("shape", [(1, 3), (5, 2), (7, 4), (130, 3), (257, 2), (8, 8)])
def test_pack_unpack_round_trip(shape):
  codes = _random_codes(shape)
  packed = packing.pack_codes(codes)
  assert packed.dtype == np.uint8 and packed.shape == (-(-shape[0] // 4), shape[1])
  np.testing.assert_array_equal(np.asarray(packing.unpack_codes(packed, shape[0])), codes)
  np.testing.assert_array_equal(_decode_tq2(packed, shape[0]), codes)
  packing.check_codes(packed, shape[0])


def test_all_zero_and_stacked_codes():
  zeros = np.zeros((3, 10, 5), np.int8)  # Leading axis as under scan_layers.
  packed = packing.pack_codes(zeros)
  assert packed.shape == (3, 3, 5) and (packed == 0b01010101).all()
  np.testing.assert_array_equal(np.asarray(packing.unpack_codes(packed, 10)), zeros)
  stacked = _random_codes((2, 9, 4))
  np.testing.assert_array_equal(
      np.asarray(packing.unpack_codes(packing.pack_codes(stacked), 9)), stacked)


def test_bad_codes_raise():
  with pytest.raises(ValueError, match="codes must be in"):
    packing.pack_codes(np.array([[2, 0], [0, 1]]))
  with pytest.raises(ValueError, match="invalid code 3"):
    packing.check_codes(np.full((1, 2), 0xFF, np.uint8), 4)
  with pytest.raises(ValueError, match="padding"):
    packing.check_codes(packing.pack_codes(np.ones((4, 2), np.int8)), 3)


# --------------------------------------------------------------- export = fake quant

SPECS = [
    "absmean",
    "absmean(granularity='channel', stat='median')",
    "absmean(granularity='group', group_size=8)",
    "absmean(granularity='shard', shards=3)",
    "twn",
    "tbt(granularity='group', group_size=8)",
    "seq",
    "seq(grad='paretoq', granularity='tensor')",
    "dlt",
    "dlt(granularity='group', group_size=8)",
    "tequila(group_size=8)",
]
K, N = 24, 12


def _layer_params(spec, seed=0, lead=()):
  info = packing.LayerInfo(spec, "none", ("embed", "mlp"), K, N)
  wq = ternary.weight_quantizer(spec)
  kernel = jax.random.normal(jax.random.key(seed), (*lead, K, N)) * 0.1
  init = wq.init_params
  for _ in lead:
    init = jax.vmap(init)
  params = {"kernel": kernel, **jax.jit(init)(kernel)}
  if "w_shift" in params:  # Give DLT a non-zero shift.
    params["w_shift"] = params["w_shift"] + 0.01
  return info, wq, params


@pytest.mark.parametrize("spec", SPECS)
def test_dequantized_export_equals_fake_quant_at_lambda_one(spec):
  info, wq, params = _layer_params(spec)
  packed = packing.export_layer(params, info)
  qparams = {k: v for k, v in params.items() if k != "kernel"}
  w_hat, bias = jax.jit(wq.fake_quant)(params["kernel"], qparams, jnp.float32(1.0))
  np.testing.assert_array_equal(packing.dequantize_layer(packed, K), np.asarray(w_hat))
  if bias is not None:
    np.testing.assert_array_equal(packed["deadzone_bias"], np.asarray(bias))
  a, b = wq.blocks((K, N))  # [] per tensor, [N] with one row of stats, else [a, N].
  scale_ndim = 0 if a == b == 1 else 1 if a == 1 else 2
  assert packed["scale"].ndim == scale_ndim and packed["scale"].dtype == np.float32


def test_stacked_export_equals_per_layer_export():
  info, _, params = _layer_params("dlt", lead=(3,))
  packed = packing.export_layer(params, info)
  assert packed["codes"].shape == (3, K // 4, N) and packed["scale"].shape == (3, N)
  one = packing.export_layer({k: v[1] for k, v in params.items()}, info)
  for name in ("codes", "scale", "shift"):
    np.testing.assert_array_equal(packed[name][1], one[name])


def test_export_needs_the_method_params():
  info, _, params = _layer_params("seq")
  del params["w_alpha"]
  with pytest.raises(KeyError, match="fill_quant_params"):
    packing.export_layer(params, info)


# ------------------------------------------------------------------ packed inference


@pytest.mark.parametrize("spec, act", [
    ("absmean", "none"), ("absmean", "absmax_int8"), ("twn", "elastic(bits=4)"),
    ("seq", "absmax_int8"), ("dlt(granularity='group', group_size=8)", "none"),
    ("dlt(granularity='group', group_size=8)", "absmax_int8"),
    ("tequila(group_size=8)", "none"), ("tequila(group_size=8)", "elastic(bits=2)")])
def test_packed_layer_matches_fake_quant_layer(spec, act):
  layer = ternary.TernaryDense(features=N, kernel_axes=("embed", "mlp"), use_bias=True,
                               weight_quant=spec, act_quant=act, input_norm=True)
  x = jax.random.normal(jax.random.key(1), (4, 3, K))
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  params["bias"] = jnp.linspace(-0.5, 0.5, N)
  packed = packing.export_layer(params,
                                packing.LayerInfo(spec, act, layer.kernel_axes, K, N))
  assert packed["codes"].dtype == np.uint8 and "kernel" not in packed
  with jax.default_matmul_precision("highest"):
    y_fake = layer.apply({"params": params}, x, jnp.float32(1.0))
    y_packed = layer.apply({"params": packed}, x)
  np.testing.assert_allclose(np.asarray(y_packed), np.asarray(y_fake), rtol=1e-5,
                             atol=1e-5)


def test_packed_matmul_is_integer_for_int8_activations():
  codes = jnp.asarray(_random_codes((K, N)), jnp.int8)
  x = jax.random.normal(jax.random.key(2), (5, K))
  acts = ternary.act_quantizer("absmax_int8").int_quantize(x, {})
  jaxpr = jax.make_jaxpr(ternary.packed_matmul)(x, codes, jnp.float32(0.5), acts)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1 and dots[0].outvars[0].aval.dtype == jnp.int32
  assert all(v.aval.dtype == jnp.int8 for v in dots[0].invars)
  ref = (np.asarray(acts.q, np.int64) @ np.asarray(codes, np.int64)) * 0.5 / np.asarray(
      acts.div)
  np.testing.assert_allclose(np.asarray(ternary.packed_matmul(x, codes, jnp.float32(0.5),
                                                              acts)), ref, rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
  """(init, apply) of Transformer(cfg), jitted once per config."""
  model = transformer.Transformer(cfg)
  return jax.jit(model.init), jax.jit(model.apply)


def _init(cfg, tokens):
  return _jitted(cfg)[0](jax.random.key(0), tokens)["params"]


def _logits(cfg, params, tokens):
  with jax.default_matmul_precision("highest"):
    return np.asarray(_jitted(cfg)[1]({"params": params}, tokens)[0])


def _check_model_parity(cfg, tokens):
  params = _init(cfg, tokens)
  packed = packing.pack_params(params, cfg)
  fake, packed_logits = _logits(cfg, params, tokens), _logits(cfg, packed, tokens)
  assert np.abs(fake - packed_logits).max() < 1e-3
  assert (fake.argmax(-1) == packed_logits.argmax(-1)).all()
  nll = lambda lg: -np.mean(jax.nn.log_softmax(lg)[:, :-1].reshape(-1, lg.shape[-1])[
      np.arange(tokens[:, 1:].size), np.asarray(tokens[:, 1:]).reshape(-1)])
  assert abs(np.exp(nll(packed_logits)) / np.exp(nll(fake)) - 1) < 1e-4
  return params, packed


ABSMEAN_TINY = dict(weight_quant="absmean", act_quant="absmax_int8")
TOKENS = jax.random.randint(jax.random.key(3), (2, 8), 0, 128)


@pytest.mark.parametrize("scan", [False, True])
def test_tiny_model_packed_logits_match_fake_quant(scan):
  cfg = transformer.get_variant("tiny", scan_layers=scan, **ABSMEAN_TINY)
  _, packed = _check_model_parity(cfg, TOKENS)
  layers = packed["layers"] if scan else packed["layers_0"]
  assert set(layers["attn"]["q_proj"]) == {"codes", "scale"}
  assert layers["attn"]["q_proj"]["codes"].dtype == np.uint8
  # Storage: codes (K/4 bytes per column) + one f32 scale per kernel.
  shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
  expected = sum((k // 4 * n + 4) * 8 for k, n in shapes) / sum(k * n for k, n in shapes)
  assert packing.bits_per_weight(packed, cfg) == pytest.approx(expected)
  assert packing.bits_per_weight(packed, cfg) < 2.1


def test_tiny_model_packed_parity_other_methods_and_files(tmp_path):
  cfg = transformer.get_variant(
      "tiny", num_layers=1, weight_quant="dlt", act_quant="elastic", subln=True,
      quant_layers=("q", "k", "v", "o", "gate", "up", "down", "head"),
      tie_embeddings=False, qkv_bias=True)
  _, packed = _check_model_parity(cfg, TOKENS)
  assert set(packed["layers_0"]["attn"]["o_proj"]) == {"codes", "scale", "shift",
                                                       "norm_scale", "a_alpha"}
  assert set(packed["lm_head"]) == {"codes", "scale", "shift", "a_alpha"}
  # Save / load keeps the tree, the config and the logits.
  path = str(tmp_path / "model.tq2.safetensors")
  size = packing.save_packed(path, packed, cfg)
  assert size == os.path.getsize(path)
  loaded, cfg2 = packing.load_packed(path)
  assert cfg2 == cfg
  assert jax.tree.map(np.shape, loaded) == jax.tree.map(np.shape, packed)
  np.testing.assert_array_equal(_logits(cfg, loaded, TOKENS), _logits(cfg, packed, TOKENS))
  bad = str(tmp_path / "plain.safetensors")
  packing.st_numpy.save_file({"a": np.zeros(2, np.float32)}, bad)
  with pytest.raises(ValueError, match="not a tq2 file"):
    packing.load_packed(bad)


# ------------------------------------------------------ prepared form and its kernel


@pytest.mark.parametrize("lead, k, n", [((), 16, 16), ((), 26, 37), ((3,), 40, 5),
                                        ((), 1, 1)])
def test_pack_words_round_trip(lead, k, n):
  codes = _random_codes((*lead, k, n), seed=k)
  words = ternary_kernel.pack_words(codes)
  assert words.dtype == np.uint32
  assert words.shape == (*lead, -(-n // 16), -(-k // 16), 16)
  np.testing.assert_array_equal(
      np.asarray(ternary_kernel.unpack_words(jnp.asarray(words), k, n)), codes)
  # Spec: word [t, q, j] bits 2f..2f+1 hold T[16q + f, 16t + j] + 1; padding holds 1.
  w = words.reshape(-1, *words.shape[-3:])[0]
  c = codes.reshape(-1, k, n)[0]
  t, q, j, f = (n - 1) // 16, (k - 1) // 16, (n - 1) % 16, (k - 1) % 16
  assert (int(w[t, q, j]) >> (2 * f)) & 3 == c[k - 1, n - 1] + 1
  if k % 16:
    assert (int(w[0, q, 0]) >> 30) & 3 == 1


def test_scale_rows():
  n = 20
  assert ternary_kernel.scale_rows(np.float32(0.5), n).tolist() == [[0.5] * n + [0.0] * 12]
  rows = ternary_kernel.scale_rows(np.arange(n, dtype=np.float32), n)
  assert rows.shape == (1, 32) and rows[0, n - 1] == n - 1
  stacked = ternary_kernel.scale_rows(np.ones((3, 2, n), np.float32), n, num_lead=1)
  assert stacked.shape == (3, 2, 32)
  assert ternary_kernel.scale_rows(np.ones(3, np.float32), n, num_lead=1).shape == (3, 1, 32)


@pytest.mark.parametrize("k, n, m, a", [(32, 12, 1, 1), (26, 37, 5, 1), (48, 12, 7, 3),
                                        (64, 20, 9, 4), (160, 33, 17, 5), (300, 17, 64, 1),
                                        (24, 12, 2, 3), (32, 16, 65, 2)])
def test_ternary_matmul_kernel_and_xla_match_numpy(k, n, m, a):
  rng = np.random.default_rng(k + m)
  codes = _random_codes((k, n), seed=k)
  scale = rng.uniform(0.5, 1.5, (a, n)).astype(np.float32)
  x = rng.standard_normal((m, k)).astype(np.float32)
  ref = x.astype(np.float64) @ (np.repeat(scale, k // a, axis=0) * codes)
  words = jnp.asarray(ternary_kernel.pack_words(codes))
  rows = jnp.asarray(ternary_kernel.scale_rows(scale if a > 1 else scale[0], n))
  for kernel in (True, False):
    fn = jax.jit(lambda x, w, s, kernel=kernel: ternary_kernel.matmul(x, w, s, n, kernel))
    np.testing.assert_allclose(np.asarray(fn(x, words, rows)), ref, rtol=1e-5, atol=1e-5)
  fits = ternary_kernel.kernel_fits(k, a)
  assert fits == (a == 1 or k // a % 16 == 0)
  hlo = jax.jit(lambda x, w, s: ternary_kernel.matmul(x, w, s, n)).lower(
      x, words, rows).as_text()
  assert (ternary_kernel.TARGET in hlo) == (fits and ternary_kernel.available())


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                    reason="no C++ compiler: packed layers run in XLA")
def test_the_cpu_kernel_builds_where_a_compiler_is_present():
  assert ternary_kernel.available()  # A broken build would only warn elsewhere.


def _benchmark_methods():
  bench = testing.load_driver(os.path.join(REPO, "experiments", "benchmarks",
                                           "ternary.py"))
  return list(bench.METHODS.values())


PREPARED_SPECS = _benchmark_methods() + [
    ("dlt(granularity='group', group_size=16)", "absmax_int8"),
    ("tequila(group_size=32)", "elastic(bits=4, signed=False)"),
    ("absmean(granularity='group', group_size=8)", "none"),  # Groups of 8: XLA path.
    ("absmean(granularity='shard', shards=2)", "none")]


@pytest.mark.parametrize("spec, act", PREPARED_SPECS)
def test_prepared_layer_matches_packed_and_fake_quant(spec, act):
  k, n = 64, 40
  layer = ternary.TernaryDense(features=n, kernel_axes=("embed", "mlp"), use_bias=True,
                               weight_quant=spec, act_quant=act, input_norm=True)
  x = jax.random.normal(jax.random.key(1), (2, 40, k))
  params = nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])
  params["bias"] = jnp.linspace(-0.5, 0.5, n)
  info = packing.LayerInfo(spec, act, layer.kernel_axes, k, n)
  packed = packing.export_layer(params, info)
  prepared = packing.prepare_layer(packed, k)
  assert "codes" not in prepared and prepared["codes_u32"].dtype == np.uint32
  assert prepared["scale_rows"].shape[-1] == 48
  apply = jax.jit(layer.apply)
  for rows in (x[:1, :1], x[:, :3], x):  # Decoding, a small batch, prefill.
    with jax.default_matmul_precision("highest"):
      y_fake = apply({"params": params}, rows, jnp.float32(1.0))
      y_packed = apply({"params": packed}, rows)
      y_prepared = apply({"params": prepared}, rows)
    np.testing.assert_allclose(np.asarray(y_prepared), np.asarray(y_fake), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_prepared), np.asarray(y_packed), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_tiny_model_prepared_logits_match_packed(scan, tmp_path):
  cfg = transformer.get_variant("tiny", scan_layers=scan, **ABSMEAN_TINY)
  params = _init(cfg, TOKENS)
  packed = packing.pack_params(params, cfg)
  path = str(tmp_path / "model.tq2.safetensors")
  packing.save_packed(path, packed, cfg)
  prepared, cfg2 = packing.load_packed(path, prepare=True)
  assert cfg2 == cfg
  layers = prepared["layers"] if scan else prepared["layers_0"]
  assert set(layers["attn"]["q_proj"]) == {"codes_u32", "scale_rows"}
  assert layers["attn"]["q_proj"]["codes_u32"].shape == ((2, 2, 2, 16) if scan else
                                                         (2, 2, 16))
  fake = _logits(cfg, params, TOKENS)
  np.testing.assert_allclose(_logits(cfg, prepared, TOKENS), _logits(cfg, packed, TOKENS),
                             atol=1e-4)
  np.testing.assert_allclose(_logits(cfg, prepared, TOKENS), fake, atol=1e-3)
  # Prepared storage: 2 bits per weight plus one f32 scale per column (per tensor here).
  shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
  expected = sum(2 * k * n + 32 * n for k, n in shapes) / sum(k * n for k, n in shapes)
  assert packing.bits_per_weight(prepared, cfg) == pytest.approx(expected)
  again = packing.prepare_for_inference(prepared, cfg)  # Already prepared: unchanged.
  assert jax.tree.map(np.shape, again) == jax.tree.map(np.shape, prepared)
  with pytest.raises(ValueError, match="prepared"):
    packing.save_packed(str(tmp_path / "bad.safetensors"), prepared, cfg)


# ----------------------------------------------------------------- the command


def test_export_command(tmp_path, capsys):
  export = testing.load_driver(os.path.join(REPO, "experiments", "export_packed.py"))
  cfg = transformer.get_variant("tiny", **ABSMEAN_TINY)
  params = _init(cfg, TOKENS)
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {"model": {"variant": "tiny", "weight_quant": "absmean",
                 "act_quant": "absmax_int8"}}))
  export.save_params(params, str(workdir / "params.safetensors"))
  out = str(tmp_path / "packed.safetensors")
  export.main(["--workdir", str(workdir), "--out", out])
  printed = capsys.readouterr().out
  assert "bytes before" in printed and "bits per quantized weight" in printed
  loaded, cfg2 = packing.load_packed(out)
  assert cfg2 == cfg
  np.testing.assert_allclose(_logits(cfg, loaded, TOKENS), _logits(cfg, params, TOKENS),
                             atol=1e-3)
  with pytest.raises(FileNotFoundError, match="--params"):
    export.main(["--workdir", str(tmp_path / "empty"), "--variant", "tiny"])


# ----------------------------------------------------------------------- adapters


def _decode_i2s(buf, n, k):
  """Independent I2_S decoder from bitnet.cpp's description: 128-weight blocks of 32
  bytes, byte b holds elements b, b+32, b+64, b+96 at bits 7-6, 5-4, 3-2, 1-0; code
  0/1/2 = -1/0/+1; then a float32 scale."""
  total = n * k
  nblocks = -(-total // 128)
  flat = np.zeros(nblocks * 128, np.int64)
  for blk in range(nblocks):
    for b in range(32):
      byte = int(buf[blk * 32 + b])
      for g, shift in enumerate((6, 4, 2, 0)):
        flat[blk * 128 + g * 32 + b] = ((byte >> shift) & 3) - 1
  scale = np.frombuffer(bytes(buf[nblocks * 32:nblocks * 32 + 4]), np.float32)[0]
  return flat[:total].reshape(n, k), scale


def _decode_hf(weight, weight_scale, n):
  """Independent HF BitNet decoder: packed row r holds rows r, r+R, r+2R, r+3R of the
  (N, K) weight at bits 0-1, 2-3, 4-5, 6-7; value = code - 1; W = T / weight_scale."""
  rows, k = weight.shape
  out = np.zeros((4 * rows, k))
  for i in range(4):
    out[i * rows:(i + 1) * rows] = ((weight.astype(np.int64) >> (2 * i)) & 3) - 1
  return out[:n], float(weight_scale[0])


@pytest.mark.parametrize("k, n", [(128, 3), (24, 5), (130, 7)])
def test_i2s_and_hf_adapters(k, n):
  codes = _random_codes((k, n), seed=k)
  layer = {"codes": packing.pack_codes(codes), "scale": np.float32(0.037)}
  buf = packing.to_i2s(layer, k)
  assert buf.dtype == np.uint8 and buf.size == -(-k * n // 128) * 32 + 32
  t, scale = _decode_i2s(buf, n, k)
  np.testing.assert_array_equal(t, codes.T)
  assert scale == np.float32(0.037)
  hf = packing.to_hf_bitnet(layer, k)
  assert hf["weight"].shape == (-(-n // 4), k) and hf["weight_scale"].shape == (1,)
  t, inv = _decode_hf(hf["weight"], hf["weight_scale"], n)
  np.testing.assert_array_equal(t, codes.T)
  np.testing.assert_allclose(t / inv, 0.037 * codes.T, rtol=1e-7)


def test_adapters_need_a_per_tensor_scale():
  info, _, params = _layer_params("absmean(granularity='channel')")
  layer = packing.export_layer(params, info)
  with pytest.raises(ValueError, match="per-tensor"):
    packing.to_i2s(layer, K)
  info, _, params = _layer_params("tequila(granularity='tensor')")
  with pytest.raises(ValueError, match="deadzone_bias"):
    packing.to_hf_bitnet(packing.export_layer(params, info), K)

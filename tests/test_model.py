"""Transformer: cached decoding equals the full forward; shapes, dtypes, segments."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import layers
from fcp_jax.models import transformer as tfm


def _decode_stepwise(model, params, tokens, prefill):
  cfg = model.cfg
  apply = jax.jit(model.apply)
  cache = tfm.init_cache(cfg, tokens.shape[0], tokens.shape[1] + 3)
  logits, cache = apply({"params": params}, tokens[:, :prefill], cache=cache)
  outs = [logits]
  for i in range(prefill, tokens.shape[1]):
    logits, cache = apply({"params": params}, tokens[:, i:i + 1], cache=cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_cached_decoding_equals_full_forward(scan, remat):
  cfg, model, params = testing.tiny_model(scan_layers=scan, remat=remat)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, cfg.vocab_size)
  full, none_cache = jax.jit(model.apply)({"params": params}, tokens)
  assert none_cache is None
  stepwise, cache = _decode_stepwise(model, params, tokens, prefill=4)
  np.testing.assert_array_less(np.abs(np.asarray(full - stepwise)).max(), 1e-5)
  assert int(cache["index"]) == 11
  layer_shape = (3, cfg.num_kv_heads, 14, cfg.head_dim)  # [B, K, S, H]
  if scan:  # One stacked [L, B, K, S, H] array, scanned with the layers.
    assert cache["k"].shape == (cfg.num_layers,) + layer_shape
  else:  # One buffer per layer.
    assert [k.shape for k in cache["k"]] == [layer_shape] * cfg.num_layers


def test_scan_and_loop_compute_the_same_function():
  cfg, model, params = testing.tiny_model()
  _, scan_model, _ = testing.tiny_model(scan_layers=True)
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                   *[params[f"layers_{i}"] for i in range(cfg.num_layers)])
  tokens = jnp.arange(20).reshape(2, 10) % cfg.vocab_size
  a, _ = model.apply({"params": params}, tokens)
  b, _ = scan_model.apply({"params": stacked}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_left_padding_with_segments_matches_unpadded():
  cfg, model, params = testing.tiny_model()
  tokens = jnp.array([[5, 9, 13, 2, 7]])
  ref, _ = model.apply({"params": params}, tokens)
  padded = jnp.array([[0, 0, 0, 5, 9, 13, 2, 7]])
  segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  positions = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]])
  out, _ = model.apply({"params": params}, padded, positions, segments)
  np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def test_packed_segments_do_not_attend_across():
  cfg, model, params = testing.tiny_model()
  a, b = jnp.array([[3, 4, 5]]), jnp.array([[6, 7, 8, 9]])
  ra, _ = model.apply({"params": params}, a)
  rb, _ = model.apply({"params": params}, b)
  packed = jnp.concatenate([a, b], axis=1)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3]])
  out, _ = model.apply({"params": params}, packed, positions, segments)
  np.testing.assert_allclose(out[:, :3], ra, atol=1e-5)
  np.testing.assert_allclose(out[:, 3:], rb, atol=1e-5)


def test_every_param_has_logical_axes_and_variants_are_consistent():
  cfg = tfm.get_variant("tiny", tie_embeddings=False, qkv_bias=True)
  model = tfm.Transformer(cfg)
  boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  params = nn.unbox(boxed)
  assert params["lm_head"]["kernel"].shape == (cfg.embed_dim, cfg.vocab_size)
  assert params["layers_0"]["attn"]["q_proj"]["bias"].shape == (cfg.num_heads * cfg.head_dim,)


@pytest.mark.parametrize("name", sorted(tfm.VARIANTS))
def test_variant_shapes_evaluate_abstractly(name):
  cfg = tfm.get_variant(name)
  model = tfm.Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes["params"])))
  expected = {"smollm2-135m": 134.5e6, "qwen2.5-0.5b": 494e6, "llama-3.2-1b": 1.236e9,
              "7b": 7.6e9}
  if name in expected:
    assert abs(n - expected[name]) / expected[name] < 0.01, (name, n)


def test_bfloat16_compute_and_params():
  cfg, model, params = testing.tiny_model(dtype="bfloat16", param_dtype="bfloat16")
  assert params["embed"]["embedding"].dtype == jnp.bfloat16
  logits, _ = model.apply({"params": params}, jnp.ones((1, 5), jnp.int32))
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


def test_rope_styles_relate_by_a_permutation():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 2, 8))
  pos = jnp.array([[0, 5, 17]])
  inv = layers.rope_frequencies(8, 10_000.0)
  half = layers.apply_rope(x, pos, inv, "half")
  perm = np.stack([np.arange(4), np.arange(4) + 4], axis=1).reshape(-1)  # half -> pairs
  inter = layers.apply_rope(x[..., perm], pos, inv, "interleaved")
  np.testing.assert_allclose(inter, half[..., perm], atol=1e-6)
  # Position 0 is the identity; norms are preserved.
  np.testing.assert_allclose(half[:, 0], x[:, 0], atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(half, axis=-1), jnp.linalg.norm(x, axis=-1),
                             rtol=1e-5)


def test_rope_table_once_is_the_per_layer_rotation():
  # The Transformer computes the (sin, cos) tables once (``rope_table_once``, a
  # conditional on CPU) and every layer rotates by them: bitwise what each layer's
  # ``apply_rope`` computed from the positions, under jit as in the model.
  pos = jnp.array([[0, 5, 17], [3, 4, 1000]])
  inv = layers.rope_frequencies(8, 10_000.0)
  once = jax.jit(layers.rope_table_once)(pos, inv)
  plain = jax.jit(layers.rope_table)(pos, inv)
  for a, b in zip(once, plain):
    assert a.shape == (2, 3, 4)
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2, 8))
  for style in ("half", "interleaved"):
    rotated = jax.jit(lambda x, t, s=style: layers.rotate(x, t, s))(x, once)
    per_layer = jax.jit(lambda x, p, s=style: layers.apply_rope(x, p, inv, s))(x, pos)
    np.testing.assert_array_equal(rotated, per_layer)


def test_llama3_rope_scaling_changes_only_low_frequencies():
  base = layers.rope_frequencies(64, 500_000.0)
  scaled = layers.rope_frequencies(64, 500_000.0, ("llama3", 32.0, 1.0, 4.0, 8192))
  assert np.allclose(scaled[0], base[0])             # highest frequency unchanged
  assert np.allclose(scaled[-1], base[-1] / 32.0)    # lowest frequency divided by factor


def test_bad_config_values_raise():
  with pytest.raises(KeyError, match="rope_bse"):
    tfm.get_variant("tiny", rope_bse=1.0)
  with pytest.raises(KeyError, match="Unknown model variant"):
    tfm.get_variant("tinny")
  with pytest.raises(ValueError, match="num_kv_heads"):
    tfm.get_variant("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="quant_layers"):
    tfm.get_variant("tiny", quant_layers=("q", "attn"))

"""Attention paths (``TransformerConfig.attention``) equal the reference ``xla`` path.

Values and parameter gradients on padded, packed and cached (prefill, then decoding)
inputs, for the tiny variant (4 query heads over 2 key/value heads). Outputs at padding
positions are unspecified (their queries attend to nothing) and are left out.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import transformer as tfm

PATHS = ["dot_product"]  # Besides the reference; "cudnn" needs a GPU.


def _models(attention, **overrides):
  cfg, ref_model, params = testing.tiny_model(**overrides)
  assert cfg.attention == "xla" and cfg.num_kv_heads < cfg.num_heads
  return ref_model, tfm.Transformer(cfg.replace(attention=attention)), params


def _value_and_grad(forward, params, valid):
  """``forward(params) -> logits [B, T, V]``; a weighted sum over valid positions."""
  def objective(p):
    logits = forward(p)  # [B, T, V]
    w = jax.random.normal(jax.random.PRNGKey(7), logits.shape)  # [B, T, V]
    return jnp.sum(logits * w * valid[..., None]), logits
  (_, logits), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
  return logits, grads


def _assert_same(forward_ref, forward, params, valid):
  ref, ref_grads = _value_and_grad(forward_ref, params, valid)
  out, grads = _value_and_grad(forward, params, valid)
  keep = np.asarray(valid, bool)
  np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(ref)[keep],
                             atol=2e-5, rtol=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4,
                               err_msg=jax.tree_util.keystr(path))


def _apply(model, tokens, positions, segments):
  return lambda p: model.apply({"params": p}, tokens, positions, segments)[0]


@pytest.mark.parametrize("attention", PATHS)
def test_padded_rows_match_reference(attention):
  ref_model, model, params = _models(attention)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 1, 100)
  segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])  # Row 0 left-padded.
  positions = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5], list(range(9))])
  _assert_same(_apply(ref_model, tokens, positions, segments),
               _apply(model, tokens, positions, segments), params, segments > 0)


@pytest.mark.parametrize("attention", PATHS)
@pytest.mark.parametrize("scan", [False, True])
def test_packed_rows_match_reference(attention, scan):
  overrides = dict(scan_layers=True, remat="dots") if scan else {}
  ref_model, model, params = _models(attention, **overrides)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 1, 100)
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0],  # Three documents, then padding.
                        [1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
  _assert_same(_apply(ref_model, tokens, positions, segments),
               _apply(model, tokens, positions, segments), params, segments > 0)


def _cached(model, tokens, segments, positions, steps):
  """Prefill, then chunks of ``steps`` tokens against the cache; all logits [B, T, V]."""
  def forward(p):
    cache = tfm.init_cache(model.cfg, tokens.shape[0], tokens.shape[1] + 2)
    outs, start = [], 0
    for n in steps:
      s = slice(start, start + n)
      logits, cache = model.apply({"params": p}, tokens[:, s], positions[:, s],
                                  segments[:, s], cache=cache)
      outs.append(logits)
      start += n
    return jnp.concatenate(outs, axis=1)
  return forward


@pytest.mark.parametrize("attention", PATHS)
def test_cached_decoding_matches_reference(attention):
  ref_model, model, params = _models(attention)
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 1, 100)
  segments = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])  # Row 0 left-padded.
  positions = jnp.array([[0, 0, 0, 1, 2, 3, 4, 5], list(range(8))])
  steps = (4, 1, 2, 1)  # Prefill 4, then decode 1 token or a chunk of 2 at a time.
  _assert_same(_cached(ref_model, tokens, segments, positions, steps),
               _cached(model, tokens, segments, positions, steps), params, segments > 0)


def test_unknown_attention_lists_options():
  with pytest.raises(ValueError, match="Unknown attention 'flash'.*dot_product"):
    tfm.get_variant("tiny", attention="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU error")
def test_cudnn_names_its_setting_and_platform_off_gpu():
  _, model, params = _models("cudnn")
  with pytest.raises(ValueError, match="attention='cudnn' needs a GPU"):
    model.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))

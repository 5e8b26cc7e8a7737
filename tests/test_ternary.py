"""Tests for fcp_jax.models.ternary: quantizers, λ invariants, gradients, schedules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fcp_jax.models import layers
from fcp_jax.models import ternary
from fcp_jax.models import ternary_training
from fcp_jax.models import transformer

WEIGHT_SPECS = [
    "absmean",
    "absmean(granularity='channel', stat='median')",
    "absmean(granularity='group', group_size=8)",
    "absmean(granularity='shard', shards=2)",
    "twn",
    "tbt",
    "seq",
    "seq(grad='paretoq')",
    "dlt",
    "dlt(granularity='group', group_size=8)",
    "tequila(group_size=8)",
]
K, N = 24, 12


def _kernel(seed=0, shape=(K, N)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.1


def _layer(wq="absmean", aq="none", **kw):
  return ternary.TernaryDense(features=N, kernel_axes=("embed", "mlp"), weight_quant=wq,
                              act_quant=aq, **kw)


def _init(layer, x):
  return nn.unbox(jax.jit(layer.init)(jax.random.key(0), x)["params"])


def _x(seed=1, shape=(3, 5, K)):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("spec", WEIGHT_SPECS)
def test_codes_are_ternary_and_lambda_one_is_dequantized(spec):
  wq = ternary.weight_quantizer(spec)
  w = _kernel()
  qp = wq.init_params(w)
  q = wq.quantize(w, qp)
  assert set(np.unique(np.asarray(q.codes))) <= {-1.0, 0.0, 1.0}
  assert np.all(np.asarray(q.scale) > 0)
  w_hat, _ = wq.fake_quant(w, qp, jnp.float32(1.0))
  np.testing.assert_array_equal(np.asarray(w_hat), np.asarray(ternary.dequantize(q)))
  w0, bias0 = wq.fake_quant(w, qp, jnp.float32(0.0))
  np.testing.assert_array_equal(np.asarray(w0), np.asarray(w))
  if bias0 is not None:
    np.testing.assert_array_equal(np.asarray(bias0), 0.0)


def test_absmean_matches_bitnet_formula():
  w = np.asarray(_kernel(3))
  gamma = max(np.abs(w).mean(), 1e-5)
  ref = np.clip(np.round(w / gamma), -1, 1)
  q = ternary.weight_quantizer("absmean").quantize(jnp.asarray(w), {})
  np.testing.assert_array_equal(np.asarray(q.codes), ref)
  np.testing.assert_allclose(np.asarray(q.scale), [[gamma]], rtol=1e-6)
  med = np.median(np.abs(w), axis=0)
  q = ternary.weight_quantizer("absmean(granularity='channel', stat='median')").quantize(
      jnp.asarray(w), {})
  np.testing.assert_allclose(np.asarray(q.scale)[0], med, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.codes), np.clip(np.round(w / med), -1, 1))


def test_twn_tbt_seq_tequila_match_their_formulas():
  w = np.asarray(_kernel(4))
  mean_abs = np.abs(w).mean(0)
  # TWN: threshold 0.7 mean|W|, scale = mean |W| over the kept weights, per channel.
  keep = np.abs(w) > 0.7 * mean_abs
  q = ternary.weight_quantizer("twn").quantize(jnp.asarray(w), {})
  np.testing.assert_array_equal(np.asarray(q.codes), np.sign(w) * keep)
  np.testing.assert_allclose(np.asarray(q.scale)[0],
                             (np.abs(w) * keep).sum(0) / keep.sum(0), rtol=1e-6)
  # TBT: s = 4/3 mean|W|, codes = clip(round(W/s)).
  q = ternary.weight_quantizer("tbt").quantize(jnp.asarray(w), {})
  np.testing.assert_allclose(np.asarray(q.scale)[0], 4 / 3 * mean_abs, rtol=1e-6)
  # SEQ: levels {-2/3, 0, 2/3} α, α initialised to max|W| per channel.
  wq = ternary.weight_quantizer("seq")
  qp = wq.init_params(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(qp["w_alpha"])[0], np.abs(w).max(0), rtol=1e-6)
  deq = np.asarray(ternary.dequantize(wq.quantize(jnp.asarray(w), qp)))
  alpha = np.abs(w).max(0)
  np.testing.assert_allclose(deq, 2 / 3 * alpha * (np.abs(w) >= alpha / 3) * np.sign(w),
                             rtol=1e-6)
  # Tequila: per group of 8 along K; dead-zone weights summed into a bias.
  q = ternary.weight_quantizer("tequila(group_size=8, bias_lambda=0.5)").quantize(
      jnp.asarray(w), {})
  alpha = np.abs(w.reshape(3, 8, N)).mean(1)  # [3, N]
  dead = np.abs(w) < np.repeat(alpha, 8, axis=0) / 2
  np.testing.assert_allclose(np.asarray(q.scale), alpha, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.codes), np.sign(w) * ~dead)
  np.testing.assert_allclose(np.asarray(q.bias), 0.5 * (w * dead).sum(0), rtol=1e-5)


@pytest.mark.parametrize("wq, aq", [
    ("absmean", "absmax_int8"), ("twn", "elastic"), ("seq", "elastic(bits=2)"),
    ("dlt(granularity='group', group_size=8)", "elastic(bits=4, signed=False)"),
    ("tequila(group_size=8)", "none")])
def test_lambda_zero_is_the_float_layer_bitwise(wq, aq):
  x = _x()
  tern = _layer(wq, aq, use_bias=True)
  params = _init(tern, x)
  params["bias"] = jnp.linspace(-1, 1, N)
  dense = layers.Dense(features=N, kernel_axes=("embed", "mlp"), use_bias=True)
  y_float = dense.apply({"params": {"kernel": params["kernel"], "bias": params["bias"]}},
                        x)
  y0 = tern.apply({"params": params}, x, jnp.float32(0.0))
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(y_float))


def test_lambda_zero_with_input_norm_is_rmsnorm_then_dense():
  x = _x()
  tern = _layer("absmean", "absmax_int8", input_norm=True, norm_eps=1e-6)
  params = _init(tern, x)
  params["norm_scale"] = jnp.linspace(0.5, 1.5, K)
  y0 = tern.apply({"params": params}, x, jnp.float32(0.0))
  norm = layers.RMSNorm(eps=1e-6)
  xn = norm.apply({"params": {"scale": params["norm_scale"]}}, x)
  ref = layers.Dense(N, ("embed", "mlp")).apply({"params": {"kernel": params["kernel"]}},
                                                xn)
  np.testing.assert_array_equal(np.asarray(y0), np.asarray(ref))


@pytest.mark.parametrize("aq", ["absmax_int8", "elastic(bits=4)"])
def test_lambda_one_is_the_quantized_layer(aq):
  x = _x()
  tern = _layer("absmean", aq)
  params = _init(tern, x)
  y1 = tern.apply({"params": params}, x, None)  # None means λ=1.
  w = np.asarray(params["kernel"], np.float64)
  gamma = np.abs(w).mean()
  w_q = gamma * np.clip(np.round(w / gamma), -1, 1)
  xn = np.asarray(x, np.float64)
  if aq == "absmax_int8":
    s = 127 / np.abs(xn).max(-1, keepdims=True)
    x_q = np.clip(np.round(xn * s), -128, 127) / s
  else:
    alpha = float(params["a_alpha"])
    x_q = alpha * np.clip(np.round(xn / alpha), -8, 7)
  np.testing.assert_allclose(np.asarray(y1), x_q @ w_q, rtol=1e-5, atol=1e-5)
  y_half = tern.apply({"params": params}, x, jnp.float32(0.5))
  assert not np.allclose(np.asarray(y_half), np.asarray(y1))


def test_bfloat16_compute_follows_float32_quantization():
  x = _x()
  layer32 = _layer("absmean", "absmax_int8")
  layer16 = _layer("absmean", "absmax_int8", dtype=jnp.bfloat16)
  params = _init(layer32, x)
  y32 = layer32.apply({"params": params}, x)
  y16 = layer16.apply({"params": params}, x.astype(jnp.bfloat16))
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=2e-2,
                             atol=2e-2)


def test_elastic_init_and_levels():
  x = _x()
  params = _init(_layer("absmean", "elastic(bits=2)"), x)
  np.testing.assert_allclose(float(params["a_alpha"]), 2 * np.abs(np.asarray(x)).mean(),
                             rtol=1e-5)  # Signed 2-bit: Qp = 1.
  aq = ternary.act_quantizer("elastic(bits=2)")
  x_hat = aq.fake_quant(x, params, jnp.float32(1.0)) / params["a_alpha"]
  assert set(np.unique(np.round(np.asarray(x_hat), 5))) <= {-1.0, 0.0, 1.0}
  assert ternary.act_quantizer("elastic(bits=3, signed=False)").levels == (0, 7)


# --------------------------------------------------------------------------- gradients


def _grads(wq_spec, lam, w, qp, cot):
  wq = ternary.weight_quantizer(wq_spec)
  return jax.grad(lambda w_, qp_: jnp.sum(wq.fake_quant(w_, qp_, lam)[0] * cot),
                  argnums=(0, 1))(w, qp)


@pytest.mark.parametrize("spec", ["absmean", "absmean(granularity='channel')", "twn",
                                  "tbt"])
@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_parameter_free_methods_have_identity_ste(spec, lam):
  w, cot = _kernel(), _kernel(9)
  gw, _ = _grads(spec, jnp.float32(lam), w, {}, cot)
  np.testing.assert_array_equal(np.asarray(gw), np.asarray(cot))


def _seq_reference(w, alpha, cot, clip, outside):
  """ParetoQ's SEQ gradients written from the formula (numpy, float64)."""
  w, alpha, cot = (np.asarray(a, np.float64) for a in (w, alpha, cot))
  u = w / alpha
  inside = np.abs(u) <= clip
  codes = np.round(1.5 * np.clip(u, -clip, clip))
  g = 1 / np.sqrt(w.size)
  d_alpha = np.where(inside, codes / 1.5 - u, outside * np.sign(u))
  return cot * inside, (g * cot * d_alpha).sum(0, keepdims=True)


@pytest.mark.parametrize("grad, outside", [("autodiff", 2 / 3), ("paretoq", 1.0)])
def test_seq_clipped_ste_and_lsq_scale_gradient(grad, outside):
  w, cot = _kernel(), _kernel(9)
  spec = f"seq(grad='{grad}')"
  qp = {"w_alpha": jnp.abs(w).max(0, keepdims=True) * 0.6}  # Some weights clip.
  gw, gq = _grads(spec, jnp.float32(1.0), w, qp, cot)
  ref_w, ref_alpha = _seq_reference(w, qp["w_alpha"], cot, 0.99, outside)
  assert (np.asarray(gw) == 0).any() and (np.asarray(gw) != 0).any()
  np.testing.assert_allclose(np.asarray(gw), ref_w, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gq["w_alpha"]), ref_alpha, rtol=1e-4, atol=1e-7)


def test_dlt_scale_shift_and_weight_gradients():
  w, cot = _kernel(), _kernel(9)
  wq = ternary.weight_quantizer("dlt")
  qp = wq.init_params(w)
  lam = 0.75
  gw, gq = _grads("dlt", jnp.float32(lam), w, qp, cot)
  wn, cn = np.asarray(w), np.asarray(cot)
  codes = np.sign(wn) * (np.abs(wn) > 0.7 * np.abs(wn).mean(0))
  np.testing.assert_allclose(np.asarray(gq["w_alpha"])[0], lam * (cn * codes).sum(0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gq["w_shift"])[0], lam * cn.sum(0), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(gw), cn, rtol=1e-6)


def test_tequila_gradient_adds_the_dead_zone_term():
  x, g_out = _x(), _x(7, (3, 5, N))
  layer = _layer("tequila(group_size=8, bias_lambda=0.1)")
  params = _init(layer, x)
  lam = 0.5
  loss = lambda p: jnp.sum(layer.apply({"params": p}, x, jnp.float32(lam)) * g_out)
  gw = np.asarray(jax.grad(loss)(params)["kernel"], np.float64)
  w = np.asarray(params["kernel"])
  alpha = np.repeat(np.abs(w.reshape(3, 8, N)).mean(1), 8, axis=0)
  dead = np.abs(w) < alpha / 2
  xf, gf = np.asarray(x, np.float64).reshape(-1, K), np.asarray(g_out, np.float64)
  gf = gf.reshape(-1, N)
  ref = xf.T @ gf + lam * 0.1 * dead * gf.sum(0)
  assert dead.any()
  np.testing.assert_allclose(gw, ref, rtol=1e-5, atol=1e-5)


def test_elastic_lsq_gradients():
  x, cot = _x(), _x(7)
  aq = ternary.act_quantizer("elastic(bits=4)")
  qp = {"a_alpha": jnp.float32(0.2)}
  gx, gq = jax.grad(lambda x_, qp_: jnp.sum(aq.fake_quant(x_, qp_, jnp.float32(1.0)) * cot),
                    argnums=(0, 1))(x, qp)
  xn, cn = np.asarray(x, np.float64), np.asarray(cot, np.float64)
  u = xn / 0.2
  qn, qp_ = -8, 7
  inside = (u >= qn) & (u <= qp_)
  d_alpha = np.where(inside, np.round(u) - u, np.where(u < qn, qn, qp_))
  g = 1 / np.sqrt(xn.size * qp_)
  assert (~inside).any()
  np.testing.assert_allclose(np.asarray(gx), cn * inside, rtol=1e-6)
  np.testing.assert_allclose(float(gq["a_alpha"]), g * (cn * d_alpha).sum(), rtol=1e-4)


def test_absmax_activation_gradient_is_identity():
  x, cot = _x(), _x(7)
  aq = ternary.act_quantizer("absmax_int8")
  gx = jax.grad(lambda x_: jnp.sum(aq.fake_quant(x_, {}, jnp.float32(1.0)) * cot))(x)
  np.testing.assert_array_equal(np.asarray(gx), np.asarray(cot))


# ----------------------------------------------------------------------- configuration


def test_bad_specs_raise_clear_errors():
  with pytest.raises(KeyError, match="absmean"):
    ternary.weight_quantizer("absmaen")
  with pytest.raises(KeyError, match="absmax_int8"):
    ternary.act_quantizer("absmax")
  with pytest.raises(ValueError, match="granularity"):
    ternary.weight_quantizer("absmean(granularity='row')")
  with pytest.raises(ValueError, match="stat"):
    ternary.weight_quantizer("absmean(stat='mode')")
  with pytest.raises(ValueError, match="group_size=8"):
    ternary.weight_quantizer("absmean(granularity='group', group_size=8)").blocks((12, 4))
  with pytest.raises(ValueError, match="int8"):
    ternary.act_quantizer("elastic(bits=8, signed=False)")
  with pytest.raises(ValueError, match="act_quant"):
    ternary.validate_specs("absmean", "int4")


def test_layer_options_follow_the_config():
  cfg = transformer.get_variant("tiny", weight_quant="twn", act_quant="absmax_int8",
                                subln=True)
  assert ternary.layer_options(cfg, "o")["input_norm"]
  assert not ternary.layer_options(cfg, "q")["input_norm"]
  cfg = cfg.replace(extra_rmsnorm=True, subln=False)
  assert ternary.layer_options(cfg, "q") == dict(
      weight_quant="twn", act_quant="absmax_int8", input_norm=True,
      norm_eps=cfg.norm_eps)


def test_lambda_schedule():
  np.testing.assert_allclose(
      ternary_training.lambda_schedule(15, num_layers=3, start=10, ramp=10), [0.5] * 3)
  np.testing.assert_allclose(
      ternary_training.lambda_schedule(15, num_layers=3, start=10, ramp=10, stagger=5),
      [0.5, 0.0, 0.0])
  np.testing.assert_allclose(
      ternary_training.lambda_schedule(27, num_layers=3, start=10, ramp=10, stagger=5),
      [1.0, 1.0, 0.7], rtol=1e-6)
  np.testing.assert_array_equal(
      ternary_training.lambda_schedule(9, num_layers=2, start=10), [0, 0])
  np.testing.assert_array_equal(
      ternary_training.lambda_schedule(10, num_layers=2, start=10), [1, 1])
  traced = jax.jit(lambda s: ternary_training.lambda_schedule(s, num_layers=2, ramp=4))
  np.testing.assert_allclose(traced(jnp.int32(1)), [0.25, 0.25])
  with pytest.raises(ValueError, match="ramp"):
    ternary_training.lambda_schedule(0, num_layers=2, ramp=-1)


# ------------------------------------------------------------------------ model level


def _tiny(**kw):
  cfg = transformer.get_variant("tiny", **kw)
  return cfg, transformer.Transformer(cfg)


def _model_init(model, tokens):
  return jax.jit(model.init)(jax.random.key(0), tokens)["params"]


def _tokens(b=2, t=6, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, 128)


def test_weight_decay_mask_only_on_kernels():
  _, model = _tiny(weight_quant="seq", act_quant="elastic", extra_rmsnorm=True,
                   qkv_bias=True, tie_embeddings=False)
  params = jax.eval_shape(model.init, jax.random.key(0), _tokens())["params"]
  mask = ternary_training.weight_decay_mask(params)
  flat = {"/".join(str(k.key) for k in p): bool(v) for p, v in
          jax.tree_util.tree_flatten_with_path(nn.unbox(mask))[0]}
  assert flat["layers_0/attn/q_proj/kernel"] and flat["lm_head/kernel"]
  for name in ("layers_0/attn/q_proj/w_alpha", "layers_0/attn/q_proj/a_alpha",
               "layers_0/attn/q_proj/norm_scale", "layers_0/attn/q_proj/bias",
               "layers_0/attn_norm/scale", "embed/embedding", "final_norm/scale"):
    assert not flat[name], name
  assert sum(flat.values()) == 2 * 7 + 1


def test_quant_metrics_per_layer_unrolled_and_scanned():
  tokens = _tokens()

  def metrics_of(model, params):
    _, state = jax.jit(lambda p: model.apply({"params": p}, tokens,
                                             mutable=["intermediates"]))(params)
    return ternary_training.quant_metrics(state["intermediates"])

  _, model = _tiny(weight_quant="absmean")
  params = nn.unbox(_model_init(model, tokens))
  metrics = metrics_of(model, params)
  kernel = params["layers_1"]["mlp"]["down_proj"]["kernel"]
  codes = np.asarray(ternary.weight_quantizer("absmean").quantize(kernel, {}).codes)
  name = "quant/layers_1/mlp/down_proj"
  assert metrics[f"{name}/zero_frac"] == pytest.approx((codes == 0).mean())
  assert metrics[f"{name}/code_hist/neg"] == (codes == -1).sum()
  assert metrics[f"{name}/code_hist/zero"] == (codes == 0).sum()
  assert metrics[f"{name}/code_hist/pos"] == (codes == 1).sum()
  assert metrics[f"{name}/scale"] == pytest.approx(np.abs(np.asarray(kernel)).mean(),
                                                   rel=1e-5)
  assert len([k for k in metrics if k.endswith("/zero_frac")]) == 2 * 7 + 1
  # The same weights stacked for scan_layers give the same per-layer names and values.
  _, scan_model = _tiny(weight_quant="absmean", scan_layers=True)
  layers = [params.pop(f"layers_{i}") for i in range(2)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  scanned = metrics_of(scan_model, params)
  assert scanned.keys() == metrics.keys()
  for key, value in metrics.items():
    assert scanned[key] == pytest.approx(value, rel=1e-6), key


def test_float_checkpoint_loads_into_ternary_model_and_back():
  tokens = _tokens()
  _, float_model = _tiny(num_layers=1)
  float_params = nn.unbox(_model_init(float_model, tokens))
  cfg, model = _tiny(num_layers=1, weight_quant="seq", act_quant="elastic",
                     extra_rmsnorm=True)
  filled = ternary_training.fill_quant_params(model, float_params, tokens)
  q = filled["layers_0"]["attn"]["q_proj"]
  kernel = float_params["layers_0"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(q["w_alpha"][0], np.abs(np.asarray(kernel)).max(0))
  np.testing.assert_array_equal(q["norm_scale"], np.ones(cfg.embed_dim))
  assert float(q["a_alpha"]) > 1e-5  # Initialised from the activations, not the floor.
  assert jax.tree.structure(
      ternary_training.strip_quant_params(filled)) == jax.tree.structure(
      float_params)
  # A parameter-free ternary model takes the float tree as is; λ=0 is the float model.
  _, absmean_model = _tiny(num_layers=1, weight_quant="absmean", act_quant="absmax_int8")
  logits_f, _ = jax.jit(float_model.apply)({"params": float_params}, tokens)
  logits_0, _ = jax.jit(absmean_model.apply)({"params": float_params}, tokens,
                                             qlambda=0.0)
  np.testing.assert_array_equal(np.asarray(logits_0), np.asarray(logits_f))


def _toy_batch(step, perm, batch=16, length=16):
  """Sequences following a fixed permutation of 32 tokens: each next token is
  determined by the current one, so the loss can go to ~0."""
  rng = np.random.default_rng(step)
  seq = [rng.integers(0, 32, (batch,))]
  for _ in range(length - 1):
    seq.append(perm[seq[-1]])
  return jnp.asarray(np.stack(seq, 1), jnp.int32)


def _train(cfg, steps):
  model = transformer.Transformer(cfg)
  perm = np.random.default_rng(0).permutation(32)
  params = jax.jit(model.init)(jax.random.key(0), _toy_batch(0, perm))["params"]
  tx = optax.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.0)
  opt = tx.init(params)

  def loss_fn(p, tokens):
    logits, _ = model.apply({"params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], tokens[:, 1:]).mean()

  @jax.jit
  def step(p, o, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  losses = []
  for i in range(steps):
    params, opt, loss = step(params, opt, _toy_batch(i + 1, perm))
    losses.append(float(loss))
  return losses[0], float(np.mean(losses[-10:]))


@pytest.mark.slow
def test_ternary_training_matches_float_on_toy_data():
  """200 AdamW steps on a learnable toy language: absmean + absmax_int8 must bring the
  loss from ~4.8 to below 0.05, at most 0.05 above the float model's final loss."""
  first_f, last_f = _train(transformer.get_variant("tiny"), 200)
  first_t, last_t = _train(
      transformer.get_variant("tiny", weight_quant="absmean", act_quant="absmax_int8"), 200)
  assert first_t > 4.0 and first_f > 4.0
  assert last_t < 0.05 and last_t <= last_f + 0.05, (last_t, last_f)

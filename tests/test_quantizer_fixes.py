"""Quantizer fixes against the papers' formulas, with hand-computed values: TBT's elastic
activations, a_alpha from data, SEQ's ParetoQ gradient and DLT groups by default,
group sizes that do not divide K, the code flip rate."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcp_jax.models import packing
from fcp_jax.models import ternary
from fcp_jax.models import ternary_training
from fcp_jax.models import transformer
from fcp_jax.training import offline
from fcp_jax.training import sharding
from fcp_jax.training import step as step_lib

X = jnp.array([-0.5, -0.3, 0.0, 0.2, 1.5], jnp.float32)
ONE = jnp.float32(1.0)


def _act_grads(spec, x, alpha, cot):
  aq = ternary.act_quantizer(spec)
  f = lambda x_, a: jnp.sum(aq.fake_quant(x_, {"a_alpha": a}, ONE) * cot)
  return jax.grad(f, argnums=(0, 1))(x, jnp.float32(alpha))


# ------------------------------------------------------------------ TBT elastic acts


def test_elastic_unsigned_two_bits_min_shift_and_qp_two():
  """TBT: x̂ = α clip(round((x - min x)/α), 0, 2) + min x at 2 bits."""
  aq = ternary.act_quantizer("elastic(bits=2, signed=False)")
  assert aq.levels == (0, 2)
  # (x - m)/α = [0, .667, 1.667, 2.333, 6.667] -> codes [0, 1, 2, 2, 2].
  x_hat = aq.fake_quant(X, {"a_alpha": jnp.float32(0.3)}, ONE)
  np.testing.assert_allclose(x_hat, [-0.5, -0.2, 0.1, 0.1, 0.1], atol=1e-6)
  # LSQ gradients on the shifted input, g = 1/sqrt(numel · Qp) with Qp = 2.
  gx, ga = _act_grads("elastic(bits=2, signed=False)", X, 0.3, jnp.ones(5))
  np.testing.assert_array_equal(gx, [1, 1, 1, 0, 0])
  g = 1 / math.sqrt(5 * 2)
  np.testing.assert_allclose(ga, g * (0 + 1 / 3 + 1 / 3 + 2 + 2), rtol=1e-5)


def test_elastic_signed_one_bit_is_sign():
  """TBT: 1 bit is x̂ = α sign(x); ∂/∂α = g Σ δ sign(x), ∂/∂x = 1[|x/α| <= 1]."""
  aq = ternary.act_quantizer("elastic(bits=1)")
  x = jnp.array([-0.7, -0.1, 0.0, 0.2, 1.5], jnp.float32)
  x_hat = aq.fake_quant(x, {"a_alpha": jnp.float32(0.5)}, ONE)
  np.testing.assert_array_equal(x_hat, [-0.5, -0.5, 0.0, 0.5, 0.5])
  cot = jnp.arange(1.0, 6.0)
  gx, ga = _act_grads("elastic(bits=1)", x, 0.5, cot)
  np.testing.assert_array_equal(gx, [0, 2, 3, 4, 0])
  np.testing.assert_allclose(ga, (-1 - 2 + 0 + 4 + 5) / math.sqrt(5), rtol=1e-6)
  # Unsigned 1 bit: {0, α}, no shift.
  x_hat = ternary.act_quantizer("elastic(bits=1, signed=False)").fake_quant(
      x, {"a_alpha": jnp.float32(0.5)}, ONE)
  np.testing.assert_array_equal(x_hat, [0.0, 0.0, 0.0, 0.0, 0.5])


def test_elastic_init_follows_tbt_alpha_init():
  """α0 = 2 mean|x| / sqrt(max(2^(b-1)-1, 1)) signed, 4 mean|x| / sqrt(2^b-1) unsigned."""
  x = jnp.array([-0.7, -0.1, 0.0, 0.2, 1.5], jnp.float32)  # mean|x| = 0.5
  init = lambda spec: float(ternary.act_quantizer(spec).init_params(x)["a_alpha"])
  assert init("elastic(bits=1)") == pytest.approx(1.0)
  assert init("elastic(bits=2)") == pytest.approx(1.0)
  assert init("elastic(bits=4)") == pytest.approx(1.0 / math.sqrt(7))
  assert init("elastic(bits=2, signed=False)") == pytest.approx(2.0 / math.sqrt(3))


@pytest.mark.parametrize("act", ["elastic(bits=2, signed=False)", "elastic(bits=1)",
                                 "elastic(bits=4, signed=False)"])
def test_elastic_packed_layer_matches_fake_quant(act):
  """The packed path adds the min-shift as m Σ_i Ŵ_i; 1 bit packs sign(x)."""
  k, n = 16, 8
  layer = ternary.TernaryDense(features=n, kernel_axes=("embed", "mlp"), act_quant=act)
  x = jax.random.normal(jax.random.key(1), (2, 3, k)) + 0.3
  params = nn.unbox(layer.init(jax.random.key(0), x)["params"])
  packed = packing.export_layer(params, packing.LayerInfo("absmean", act,
                                                          ("embed", "mlp"), k, n))
  with jax.default_matmul_precision("highest"):
    y_fake = layer.apply({"params": params}, x)
    y_packed = layer.apply({"params": packed}, x)
  np.testing.assert_allclose(y_packed, y_fake, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ a_alpha from data


def _tiny(**kw):
  cfg = transformer.get_variant("tiny", act_quant="elastic", weight_quant="absmean", **kw)
  return cfg, transformer.Transformer(cfg)


def _q_proj_input(model, params, tokens):
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if (context.module.scope.path == ("layers_0", "attn", "q_proj")
        and context.method_name == "__call__"):
      seen["x"] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, tokens)
  return np.asarray(seen["x"], np.float64)


def test_init_act_alphas_reflects_the_batch():
  _, model = _tiny()
  tokens = jax.random.randint(jax.random.key(3), (4, 12), 1, 128)
  dummy = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  params = ternary_training.init_act_alphas(model, dummy, tokens)
  # Elastic 8-bit signed: α = 2 mean|x| / sqrt(127) of the input q_proj sees.
  x = _q_proj_input(model, params, tokens)
  alpha = float(params["layers_0"]["attn"]["q_proj"]["a_alpha"])
  assert alpha == pytest.approx(2 * np.abs(x).mean() / math.sqrt(127), rel=1e-5)
  assert alpha != pytest.approx(float(dummy["layers_0"]["attn"]["q_proj"]["a_alpha"]))
  # Every other leaf is the same array.
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                      ternary_training.strip_quant_params(params),
                      ternary_training.strip_quant_params(dummy))
  assert all(jax.tree.leaves(same))
  # Scanned layers: the same values, stacked.
  _, scan_model = _tiny(scan_layers=True)
  stacked = dict(dummy)
  layers = [stacked.pop(f"layers_{i}") for i in range(2)]
  stacked["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  scanned = ternary_training.init_act_alphas(scan_model, stacked, tokens)
  for i in range(2):
    for proj in ("q_proj", "o_proj"):
      np.testing.assert_allclose(scanned["layers"]["attn"][proj]["a_alpha"][i],
                                 params[f"layers_{i}"]["attn"][proj]["a_alpha"],
                                 rtol=1e-5)


def test_init_act_alphas_is_a_no_op_without_elastic_layers():
  cfg = transformer.get_variant("tiny", weight_quant="absmean", act_quant="absmax_int8")
  model = transformer.Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  assert ternary_training.init_act_alphas(model, params, None) is params


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_offline_hook_sets_alphas_and_the_step_takes_them(mode):
  """offline's first-batch hook under both parallel modes: shardings the step accepts."""
  config = ml_collections.ConfigDict(dict(
      model=dict(variant="tiny", weight_quant="absmean", act_quant="elastic"),
      optim=dict(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0,
                 clip_norm=1.0, b1=0.9, b2=0.95),
      loss="nll", quant=dict(lambda_start=0, lambda_ramp=0, lambda_stagger=0)))
  par = sharding.build({"mode": mode, "mesh_shape": (-1, 1, 1)})
  tr = step_lib.build_training(config, par, total_steps=2)
  state = tr.create_state(jax.random.PRNGKey(0))
  rs = np.random.RandomState(0)
  batch = dict(tokens=rs.randint(1, 128, (8, 12)).astype(np.int32),
               positions=np.tile(np.arange(12, dtype=np.int32), (8, 1)),
               segment_ids=np.ones((8, 12), np.int32),
               loss_mask=np.ones((8, 12), np.float32))
  before = float(state.params["layers_0"]["attn"]["q_proj"]["a_alpha"])
  params = offline._act_alphas_from(tr, par, state.params, batch, 0)  # pylint: disable=protected-access
  after = float(params["layers_0"]["attn"]["q_proj"]["a_alpha"])
  assert after != pytest.approx(before)
  state, metrics = tr.train_step(state.replace(params=params), par.put_batch(batch))
  assert np.isfinite(float(metrics["loss"]))


# ------------------------------------------------------------------- weight defaults


def test_seq_defaults_to_the_paretoq_gradient():
  """ParetoQ: ∂L/∂α = g Σ δ (T/1.5 - W/α) inside the clip, g Σ ±δ outside (not ±⅔)."""
  wq = ternary.weight_quantizer("seq")
  assert wq.grad == "paretoq"
  w = jnp.array([[0.5], [-2.0]], jnp.float32)  # u = [0.5, -2]: the second is clipped.
  qp = {"w_alpha": jnp.ones((1, 1), jnp.float32)}
  f = lambda w_, qp_: jnp.sum(wq.fake_quant(w_, qp_, ONE)[0])
  gw, gq = jax.grad(f, argnums=(0, 1))(w, qp)
  np.testing.assert_allclose(wq.fake_quant(w, qp, ONE)[0], [[2 / 3], [-2 / 3]], rtol=1e-6)
  np.testing.assert_array_equal(gw, [[1.0], [0.0]])
  g = 1 / math.sqrt(2)  # codes [1, -1]
  np.testing.assert_allclose(gq["w_alpha"], [[g * ((2 / 3 - 0.5) - 1)]], rtol=1e-5)


def test_dlt_defaults_to_groups_of_128():
  """TernaryLLM's DLT is groupwise: Δ, α per group of 128 inputs of one output."""
  wq = ternary.weight_quantizer("dlt")
  assert (wq.granularity, wq.group_size) == ("group", 128)
  signs = np.where(np.arange(256) % 2, -1.0, 1.0)[:, None] * np.ones((1, 2))
  w = jnp.asarray(signs * np.repeat([1.0, 0.01], 128)[:, None], jnp.float32)  # [256, 2]
  qp = wq.init_params(w)
  np.testing.assert_allclose(qp["w_alpha"], [[1.0, 1.0], [0.01, 0.01]], rtol=1e-6)
  codes = np.asarray(wq.quantize(w, qp).codes)
  np.testing.assert_array_equal(codes, signs)  # Per channel, group 2 would be all 0.
  channel = ternary.weight_quantizer("dlt(granularity='channel')")
  assert not np.asarray(channel.quantize(w, channel.init_params(w)).codes)[128:].any()


def test_group_size_that_does_not_divide_k_raises_a_clear_error():
  """Tequila's G = 128 with SmolLM2's K = 576: a ValueError naming K and the choices."""
  with pytest.raises(ValueError) as e:
    ternary.weight_quantizer("tequila").blocks((576, 64))
  msg = str(e.value)
  assert "tequila(group_size=128)" in msg and "K=576" in msg
  assert "64, 72, 96, 144, 192, 288, 576]" in msg and "granularity='channel'" in msg
  assert ternary.weight_quantizer("tequila(group_size=64)").blocks((576, 64)) == (9, 64)
  layer = ternary.TernaryDense(features=8, kernel_axes=("embed", "mlp"),
                               weight_quant="tequila")
  with pytest.raises(ValueError, match="K=576"):
    layer.init(jax.random.key(0), jnp.ones((1, 576)))


# ------------------------------------------------------------------------ flip rate


def test_flip_rate_counts_changed_codes():
  cfg = transformer.get_variant("tiny", weight_quant="absmean")
  model = transformer.Transformer(cfg)
  old = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  assert ternary_training.flip_rate(old, old, cfg) == 0.0
  # Negating one kernel keeps γ = mean|W| and flips every non-zero code.
  new = jax.tree.map(lambda a: a, old)
  kernel = old["layers_0"]["mlp"]["down_proj"]["kernel"]
  new["layers_0"]["mlp"]["down_proj"]["kernel"] = -kernel
  codes = np.asarray(ternary.weight_quantizer("absmean").quantize(kernel, {}).codes)
  rates = ternary_training.flip_rates(old, new, cfg)
  assert rates["quant/layers_0/mlp/down_proj/flip_rate"] == (codes != 0).mean()
  assert rates["quant/layers_0/mlp/up_proj/flip_rate"] == 0.0
  total = sum(np.prod(old[f"layers_{i}"][m][p]["kernel"].shape) for i in range(2)
              for m, ps in (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                            ("mlp", ("gate_proj", "up_proj", "down_proj"))) for p in ps)
  assert rates["quant/flip_rate"] == pytest.approx((codes != 0).sum() / total)
  assert ternary_training.flip_rate(old, new, cfg) == rates["quant/flip_rate"]


def test_flip_rate_uses_the_learned_scales():
  """SEQ codes depend on w_alpha: halving α moves weights across ±α/3."""
  cfg = transformer.get_variant("tiny", weight_quant="seq", scan_layers=True)
  model = transformer.Transformer(cfg)
  old = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  new = jax.tree.map(lambda a: a, old)
  q = old["layers"]["attn"]["q_proj"]
  new["layers"]["attn"]["q_proj"] = dict(q, w_alpha=q["w_alpha"] / 2)
  w, a = np.asarray(q["kernel"]), np.asarray(q["w_alpha"])  # [L, K, N], [L, 1, N]
  before = np.abs(w) >= a / 3
  after = np.abs(w) >= a / 6
  rate = ternary_training.flip_rates(old, new, cfg)["quant/layers/attn/q_proj/flip_rate"]
  assert rate == pytest.approx((before != after).mean()) and rate > 0


@pytest.mark.parametrize("mode,mesh_shape,scan", [("mesh", (2, 2, 2), False),
                                                  ("mesh", (1, 4, 2), True),
                                                  ("pmap", None, False)])
def test_flip_rate_tracker_on_sharded_params_equals_flip_rates(mode, mesh_shape, scan):
  """``FlipRate`` between train steps (which donate the state) under both parallel
  modes: its codes keep the kernels' shardings, its rates are ``flip_rates``'."""
  config = ml_collections.ConfigDict(dict(
      model=dict(variant="tiny", weight_quant="absmean", act_quant="absmax_int8",
                 scan_layers=scan),
      optim=dict(lr=3e-2, schedule="constant", warmup_steps=0, weight_decay=0.0,
                 clip_norm=1.0, b1=0.9, b2=0.95),
      loss="nll", quant=dict(lambda_start=0, lambda_ramp=0, lambda_stagger=0)))
  par = sharding.build({"mode": mode, "mesh_shape": mesh_shape})
  tr = step_lib.build_training(config, par, total_steps=4)
  state = tr.create_state(jax.random.PRNGKey(0))
  flips = ternary_training.FlipRate(tr.model_cfg, state.params)
  q_proj = ("layers", "attn", "q_proj") if scan else ("layers_0", "attn", "q_proj")
  kernel = functools.reduce(lambda t, k: t[k], q_proj, state.params)["kernel"]
  assert flips._codes[0].sharding == kernel.sharding  # pylint: disable=protected-access
  assert flips._codes[0].dtype == jnp.int8  # pylint: disable=protected-access
  unchanged = flips(state.params)
  assert unchanged["quant/flip_rate"] == 0.0 and unchanged["quant/q_proj/flip_rate"] == 0.0
  rs = np.random.RandomState(0)
  batch = dict(tokens=rs.randint(1, 128, (8, 12)).astype(np.int32),
               positions=np.tile(np.arange(12, dtype=np.int32), (8, 1)),
               segment_ids=np.ones((8, 12), np.int32),
               loss_mask=np.ones((8, 12), np.float32))
  old = jax.device_get(state.params)
  for _ in range(2):
    state, _ = tr.train_step(state, par.put_batch(batch))
  got = flips(state.params)
  want = ternary_training.flip_rates(old, jax.device_get(state.params), tr.model_cfg)
  assert 0 < got["quant/flip_rate"] < 1
  assert got["quant/flip_rate"] == pytest.approx(want["quant/flip_rate"], rel=1e-12)
  kinds = {k.split("/")[-2] for k in want if k.count("/") > 1}
  assert set(got) == {"quant/flip_rate"} | {f"quant/{k}/flip_rate" for k in kinds}
  if scan:  # One kernel per kind: the per-kind rate is the kernel's.
    assert got["quant/q_proj/flip_rate"] == pytest.approx(
        want["quant/layers/attn/q_proj/flip_rate"], rel=1e-12)
  assert flips(state.params)["quant/flip_rate"] == 0.0  # Since the previous call.


@pytest.mark.slow
def test_offline_runs_log_the_flip_rate_of_ternary_models_only(tmp_path):
  """At each logged step: in [0, 1], > 0 with updates, 0 at lr 0; none for float
  models; a run stopped and resumed logs the same rates (and losses)."""
  from test_train_driver import build_triples, local_config  # pylint: disable=g-import-not-at-top
  data_dir = build_triples(str(tmp_path / "tfds"), n_train=32, n_eval=8)
  args = {"total_steps": 10, "log_every": 5, "checkpoint.every": 5, "eval.every": 0,
          "plots": False}

  def logged(workdir, key):
    records = offline.metrics_lib.read_jsonl(str(tmp_path / workdir / "metrics.jsonl"))
    return [(r["step"], r[key]) for r in records if key in r]

  def run(name, arg="runlocal,ternary=True", callbacks=(), **extra):
    offline.run(local_config(data_dir, arg, **{**args, **extra}), str(tmp_path / name),
                callbacks=callbacks)

  run("straight")
  rates = logged("straight", "quant/flip_rate")
  assert [s for s, _ in rates] == [5, 10]
  assert all(0 < r <= 1 for _, r in rates), rates
  assert len(logged("straight", "quant/q_proj/flip_rate")) == 2

  class Stop(Exception):
    pass

  def stop_at_7(event, step):
    if (event, step) == ("step", 7):
      raise Stop()

  with pytest.raises(Stop):
    run("resumed", callbacks=[stop_at_7])
  run("resumed")
  assert logged("resumed", "quant/flip_rate") == rates
  assert logged("resumed", "train/loss") == logged("straight", "train/loss")

  run("frozen", **{"optim.lr": 0.0, "total_steps": 5})
  assert logged("frozen", "quant/flip_rate") == [(5, 0.0)]
  run("float", arg="runlocal", total_steps=5)
  records = offline.metrics_lib.read_jsonl(str(tmp_path / "float" / "metrics.jsonl"))
  assert records and not any(k.startswith("quant/") for r in records for k in r)

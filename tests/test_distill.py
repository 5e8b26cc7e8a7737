"""Distillation (training/distill.py): zero for a student equal to its teacher, the KL
by hand, a frozen teacher, config errors naming the key, the sharded step, and an
offline runlocal run that distils."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcp_jax import config_lib
from fcp_jax.models import transformer
from fcp_jax.training import checkpoint
from fcp_jax.training import distill
from fcp_jax.training import losses
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import offline
from fcp_jax.training import optim
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib
from fcp_jax import testing
from tests import test_train_driver

B, T = 8, 12
ONE_LAYER = dict(num_layers=1)  # Compiles faster; every path is still there.
GSM8K = os.path.join(test_train_driver.REPO, "configs", "gsm8k_smollm2.py")


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  loss_mask = (np.arange(T)[None] >= rs.randint(2, 6, (B, 1))).astype(np.float32)
  return dict(tokens=rs.randint(1, 128, (B, T)).astype(np.int32),
              positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              segment_ids=np.ones((B, T), np.int32), loss_mask=loss_mask)


def _distiller(model, **kw) -> distill.Distiller:
  settings = distill.parse(distill.section(teacher="unused", **kw))
  feature = kw.get("feature", "none") != "none"
  layers = tuple(range(model.cfg.num_layers)) if feature else ()
  return distill.Distiller(settings=settings, teacher_model=model, layers=layers)


def _terms(d, model, params, teacher_params, batch, loss="nll"):
  inputs = {k: batch[k] for k in step_lib.MODEL_INPUTS}
  return d.terms(model, losses.build(loss), params, teacher_params, batch, inputs,
                 None, jax.random.PRNGKey(0))


def _sharp(params, factor=30.0):
  """A peaked teacher: the tied embedding scaled up (logits ~ factor x larger)."""
  return dict(params, embed=jax.tree.map(lambda e: e * factor, params["embed"]))


@pytest.mark.parametrize("feature,overrides", [
    ("off_cosine", dict(scan_layers=False)),
    ("mse", dict(scan_layers=True, loss_chunk=5))])
def test_identical_teacher_and_student_cost_nothing(feature, overrides):
  _, model, params = testing.tiny_model(**overrides)
  batch = _batch()
  only_distill = _distiller(model, ce_weight=0.0, feature=feature, feature_weight=2.0)
  with_nll = _distiller(model)  # ce_weight 1, KL only: the plain NLL.

  @jax.jit
  def metrics(p, tp):
    return [losses.finalize_metrics(_terms(d, model, p, tp, batch))
            for d in (only_distill, with_nll)] + [
                step_lib.make_eval_step(model, losses.build("nll"))(p, batch)]

  m, m_nll, ref = metrics(params, params)
  assert abs(float(m["loss"])) < 1e-5, m
  assert abs(float(m["distill_kl"])) < 1e-6 and abs(float(m["distill_feature"])) < 1e-5
  assert float(m["distill_ce"]) > 1.0  # The NLL is reported all the same.
  assert "distill_feature" not in m_nll
  np.testing.assert_allclose(float(m_nll["loss"]), float(ref["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m_nll["distill_ce"]), float(ref["loss"]), rtol=1e-5)


def test_kl_matches_a_hand_computation():
  zt = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], np.float32)  # [2, V=3]
  zs = np.array([[0.0, 1.0, 0.0], [1.0, -2.0, 0.0]], np.float32)
  for tau in (1.0, 2.0):
    p = np.exp(zt / tau) / np.exp(zt / tau).sum(-1, keepdims=True)
    q = np.exp(zs / tau) / np.exp(zs / tau).sum(-1, keepdims=True)
    want = tau**2 * (p * np.log(p / q)).sum(-1)
    np.testing.assert_allclose(distill.kl_divergence(zt, zs, tau), want, rtol=1e-5)
  # In the loss: the mean over target positions (loss_mask[:, 1:]) of the KL between
  # the logits that predict them.
  _, model, params = testing.tiny_model(**ONE_LAYER)
  teacher = _sharp(params, 5.0)
  batch = _batch(1)
  d = _distiller(model, ce_weight=0.0, temperature=2.0)
  logits = lambda p: model.apply({"params": p}, batch["tokens"])[0][:, :-1]  # [B, T-1, V]
  m, z_s, z_t = jax.jit(lambda p, tp: (losses.finalize_metrics(
      _terms(d, model, p, tp, batch)), logits(p), logits(tp)))(params, teacher)
  mask = batch["loss_mask"][:, 1:]
  want = np.sum(distill.kl_divergence(z_t, z_s, 2.0) * mask) / mask.sum()
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  np.testing.assert_allclose(float(m["distill_kl"]), want, rtol=1e-5)
  # Hidden-state terms by hand: OFF's 1 - cos and the MSE of orthogonal/equal rows.
  a = jnp.array([[[[1.0, 0.0], [3.0, 4.0]]]])  # [L=1, B=1, T=2, D=2]
  b = jnp.array([[[[0.0, 2.0], [3.0, 4.0]]]])
  np.testing.assert_allclose(distill.off_cosine(a, b), [[[1.0, 0.0]]], atol=1e-6)
  np.testing.assert_allclose(distill.mse(a, b), [[[2.5, 0.0]]], atol=1e-6)


def test_the_teacher_is_frozen_and_only_the_student_learns():
  _, model, _ = testing.tiny_model(**ONE_LAYER)
  teacher = _sharp(testing.tiny_model(seed=1, **ONE_LAYER)[2])
  batch = _batch()
  d = _distiller(model, feature="off_cosine", feature_weight=1.0)
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
      b1=0.9, b2=0.95)), total_steps=10)
  state = jax.jit(state_lib.make_init_fn(model, opt.tx))(jax.random.PRNGKey(0))
  before = jax.device_get((state.params, teacher))
  train_step = step_lib.make_train_step(model, losses.build("nll"), opt, distill=d)

  @jax.jit
  def grads_and_step(state, teacher):
    grads = jax.grad(lambda tp: _terms(d, model, state.params, tp, batch).numerator)(
        teacher)
    return grads, train_step(state, batch, teacher)

  grads, (state, m) = grads_and_step(state, teacher)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads))
  for k in ("distill_kl", "distill_feature", "distill_ce"):
    assert np.isfinite(float(m[k])) and float(m[k]) > 0, (k, m)
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                       jax.device_get(state.params), before[0])
  assert all(jax.tree.leaves(moved))  # Every student parameter moved.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(teacher), before[1])
  # The optimizer state is the student's alone.
  assert (jax.tree.structure(state.opt_state)
          == jax.tree.structure(opt.tx.init(state.params)))
  with pytest.raises(ValueError, match="teacher's params"):
    train_step(state, batch)


def test_config_errors_name_the_key():
  with pytest.raises(ValueError, match="cosine_off"):
    distill.parse(distill.section(teacher="t", feature="cosine_off", feature_weight=1.0))
  with pytest.raises(ValueError, match="kl_wieght"):
    distill.parse({"teacher": "t", "kl_wieght": 1.0})
  with pytest.raises(ValueError, match="kl_wieght"):
    distill.section(kl_wieght=1.0)
  with pytest.raises(ValueError, match="distill.temperature"):
    distill.parse(distill.section(teacher="t", temperature=0.0))
  with pytest.raises(ValueError, match="distill.feature_weight"):
    distill.parse(distill.section(teacher="t", feature="mse"))
  with pytest.raises(ValueError, match="distill.ce_weight"):
    distill.parse(distill.section(teacher="t", ce_weight=-1.0))
  with pytest.raises(ValueError, match="distill.layers"):
    distill.parse(distill.section(teacher="t", layers="all"))
  with pytest.raises(ValueError, match="off_cosine"):  # A bad argument of the kind.
    distill.parse(distill.section(teacher="t", feature="off_cosine(epsilon=1)",
                                  feature_weight=1.0))
  with pytest.raises(ValueError, match="init_from"):
    distill.parse(distill.section(teacher="init_from"), init_from="")
  assert distill.parse(None) is None and distill.parse(distill.section()) is None
  assert distill.parse(distill.section(teacher="init_from"), "/base").teacher == "/base"
  config = ml_collections.ConfigDict(dict(
      model=dict(variant="tiny"), init_from="", distill=distill.section(
          teacher="/nowhere", feature="mse", feature_weight=1.0, layers=(0, 5))))
  with pytest.raises(ValueError, match=r"distill.layers has indices \[5\]"):
    distill.build(config, transformer.get_variant("tiny"))


def test_teacher_model_is_its_runs_float_config(tmp_path):
  student = dict(variant="tiny", weight_quant="absmean", act_quant="absmax_int8",
                 extra_rmsnorm=True)
  cfg = distill.teacher_model_config(str(tmp_path / "base"), student)
  assert (cfg.weight_quant, cfg.act_quant, cfg.num_layers) == ("none", "none", 2)
  run = tmp_path / "run"
  config_lib.write_config(ml_collections.ConfigDict(dict(
      model=dict(variant="small", weight_quant="none"))), str(run))
  assert distill.teacher_model_config(f"{run}:7", student).embed_dim == 256
  config_lib.write_config(ml_collections.ConfigDict(dict(model=student)), str(run))
  with pytest.raises(ValueError, match="float run"):
    distill.teacher_model_config(str(run), student)


@pytest.mark.slow
def test_sharded_distillation_step_equals_one_device(tmp_path):
  """The teacher placed by its logical specs (mesh), replicated (pmap, and the
  per-replica step of a compressed reduction): the one-device step's loss terms, and
  its update where the reduction is exact."""
  _, _, params = testing.tiny_model(seed=1)
  checkpoint.save_params(str(tmp_path / "teacher"), _sharp(params, 5.0))
  config = ml_collections.ConfigDict(dict(
      model=dict(variant="tiny"), loss="nll", quant={}, grad_compression="none",
      optim=dict(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0,
                 clip_norm=1.0, b1=0.9, b2=0.95),
      distill=distill.section(teacher=str(tmp_path / "teacher"), feature="mse",
                              feature_weight=0.5)))
  ref = None
  for mode, shape, reduce in (("mesh", (2, 2, 2), "none"), ("pmap", (-1, 1, 1), "none"),
                              ("mesh", (-1, 1, 1), "terngrad")):
    par = sharding.build({"mode": mode, "mesh_shape": shape,
                          "rules": sharding.DEFAULT_RULES})
    config.grad_compression = reduce
    tr = step_lib.build_training(config, par, total_steps=2)
    if ref is None:  # One device, the teacher's params as an argument.
      ref_step = jax.jit(step_lib.make_train_step(
          tr.model, tr.loss, tr.optimizer, distill=distill.build(config, tr.model_cfg)))
      ref = jax.device_get(ref_step(jax.device_get(tr.create_state(jax.random.PRNGKey(
          0))), _batch(), jax.device_get(tr.teacher.params)))
    if mode == "mesh":
      kernel = tr.teacher.params["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [D, F]
      assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    state, m = tr.train_step(tr.create_state(jax.random.PRNGKey(0)),
                             par.put_batch(_batch()))
    for k in ("loss", "distill_kl", "distill_feature", "distill_ce"):
      np.testing.assert_allclose(float(m[k]), float(ref[1][k]), rtol=1e-5)
    if reduce == "terngrad":  # Stochastic codes: another (unbiased) update.
      continue
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=2e-6),
                 jax.device_get(state.params), ref[0].params)


def test_offline_runlocal_run_distils_and_lowers_its_loss(tmp_path):
  """A fresh tiny student learns a peaked float teacher (sharded over 8 devices)."""
  data_dir = test_train_driver.build_triples(str(tmp_path / "tfds"), 32, 8)
  _, _, params = testing.tiny_model(seed=1, **ONE_LAYER)
  teacher = str(tmp_path / "teacher")
  checkpoint.save_params(teacher, _sharp(params))
  config = test_train_driver.local_config(data_dir, **{
      "total_steps": 12, "log_every": 1, "optim.lr": 3e-3, "eval.every": 0,
      "checkpoint.every": 0, "plots": False, "distill.teacher": teacher,
      "distill.feature": "off_cosine", "distill.feature_weight": 0.5})
  with config.unlocked():
    config.model.num_layers = ONE_LAYER["num_layers"]  # The teacher's too (no config).
  summary = offline.run(config, str(tmp_path / "run"))
  records = metrics_lib.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
  train = [r for r in records if "train/loss" in r]
  assert len(train) == 12
  first, last = train[0], train[-1]
  for k in ("train/loss", "train/distill_kl", "train/distill_feature"):
    assert last[k] < first[k], (k, first[k], last[k])
  assert summary["step"] == 12


def test_gsm8k_distill_arg_keeps_default_stage_settings():
  """``distill=none`` adds no key (stage keys unchanged); a recipe's warm-up distils
  from its init_from (the float base)."""
  plain = config_lib.load_config(f"{GSM8K}:ternary=extra_rmsnorm")
  same = config_lib.load_config(f"{GSM8K}:ternary=extra_rmsnorm,distill=none")
  assert plain.to_json() == same.to_json() and "distill" not in plain.warmup
  cfg = config_lib.load_config(f"{GSM8K}:ternary=extra_rmsnorm,distill=off_cosine")
  warmup = config_lib.stage_config(cfg, "warmup")
  assert warmup.distill.teacher == "init_from" and warmup.distill.feature == "off_cosine"
  assert distill.parse(warmup.distill, "/base").teacher == "/base"
  assert all("distill" not in config_lib.stage_config(cfg, s)
             for s in ("offline", "rft"))
  with pytest.raises(ValueError, match="distill='kl' distils the ternary"):
    config_lib.load_config(f"{GSM8K}:distill=kl")
  with pytest.raises(ValueError, match="distill='cos'"):
    config_lib.load_config(f"{GSM8K}:ternary=absmean,distill=cos")

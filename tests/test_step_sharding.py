"""The train step: same update on 1 device, mesh (8,1,1), mesh (2,2,2) and pmap(8);
gradient accumulation equals the full batch; schedules, masks and the λ feed."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcp_jax.training import losses
from fcp_jax.training import optim
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib

B, T = 8, 16
# float32 on CPU: reductions in another order change results by a few ulps; one Adam
# step moves each parameter by about lr = 1e-3, so 2e-6 is ~0.2% of a step.
PARAM_ATOL = 2e-6
LOSS_RTOL = 1e-6
MOMENT_ATOL = 1e-7  # Adam moments: gradients are ~1e-2, their ulp-level noise ~1e-9.


def _optim_cfg(**kw):
  base = dict(lr=1e-3, schedule="cosine", warmup_steps=0, weight_decay=0.1,
              clip_norm=1.0, b1=0.9, b2=0.95)
  return ml_collections.ConfigDict({**base, **kw})


def _batch(seed=0):
  rs = np.random.RandomState(seed)
  loss_mask = (np.arange(T)[None] >= rs.randint(3, 9, (B, 1))).astype(np.float32)
  segment_ids = np.ones((B, T), np.int32)
  segment_ids[:, T - 2:] = 0  # Some padding.
  return dict(tokens=rs.randint(0, 128, (B, T)).astype(np.int32),
              positions=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
              segment_ids=segment_ids, loss_mask=loss_mask * (segment_ids > 0))


@pytest.fixture(scope="module")
def parts():
  model, model_cfg = state_lib.build_model({"variant": "tiny"})
  opt = optim.make_optimizer(_optim_cfg(), total_steps=10, model_cfg=model_cfg)
  return dict(model=model, opt=opt, loss=losses.build("fcp"),
              init_fn=state_lib.make_init_fn(model, opt.tx),
              specs=state_lib.state_logical_specs(model, opt.tx))


@pytest.fixture(scope="module")
def setup(parts):
  """``parts`` plus the reference: one single-device step from PRNGKey(0)."""
  state0 = jax.jit(parts["init_fn"])(jax.random.PRNGKey(0))
  ref = jax.jit(step_lib.make_train_step(parts["model"], parts["loss"], parts["opt"]))(
      state0, _batch())
  return dict(parts, ref=jax.device_get(ref))


def _assert_same_update(state, metrics, ref):
  ref_state, ref_metrics = ref
  np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]),
                             rtol=LOSS_RTOL)
  assert float(metrics["tokens"]) == float(ref_metrics["tokens"])
  assert int(state.step) == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0,
                                                       atol=PARAM_ATOL),
               jax.device_get(state.params), ref_state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5,
                                                       atol=MOMENT_ATOL),
               jax.device_get(state.opt_state), ref_state.opt_state)


@pytest.mark.slow
@pytest.mark.parametrize("mode,shape", [("mesh", (8, 1, 1)), ("mesh", (2, 2, 2)),
                                        ("pmap", None)])
def test_parallel_step_equals_single_device(setup, mode, shape):
  assert jax.device_count() == 8
  par = sharding.build({"mode": mode, "mesh_shape": shape or (-1, 1, 1),
                        "rules": sharding.DEFAULT_RULES})
  state = par.create_state(setup["init_fn"], jax.random.PRNGKey(0), setup["specs"])
  train_step = par.jit_train_step(step_lib.make_train_step(
      setup["model"], setup["loss"], setup["opt"], axis_name=par.axis_name),
                                  setup["specs"])
  state, metrics = train_step(state, par.put_batch(_batch()))
  _assert_same_update(state, metrics, setup["ref"])
  if mode == "mesh" and shape == (2, 2, 2):
    kernel = state.params["layers_0"]["mlp"]["gate_proj"]["kernel"]  # [D, F]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (16, 32)
  # Evaluation of the new params agrees with the single-device evaluation.
  eval_step = par.jit_eval_step(step_lib.make_eval_step(
      setup["model"], setup["loss"], axis_name=par.axis_name), setup["specs"])
  ref_eval = step_lib.make_eval_step(setup["model"], setup["loss"])(
      setup["ref"][0].params, _batch(1))
  got = eval_step(state.params, par.put_batch(_batch(1)))
  np.testing.assert_allclose(float(got["loss"]), float(ref_eval["loss"]), rtol=1e-5)


def test_grad_accumulation_equals_full_batch(setup):
  step4 = jax.jit(step_lib.make_train_step(setup["model"], setup["loss"], setup["opt"],
                                           grad_accum=4))
  state0 = jax.jit(setup["init_fn"])(jax.random.PRNGKey(0))
  state, metrics = step4(state0, _batch())
  _assert_same_update(state, metrics, setup["ref"])
  with pytest.raises(ValueError, match="grad_accum=3 does not divide the batch size 8"):
    jax.jit(step_lib.make_train_step(setup["model"], setup["loss"], setup["opt"],
                                     grad_accum=3))(state, _batch())


def test_schedules_two_stage_and_warmup():
  cfg = _optim_cfg(lr=1.0, schedule="linear(end_factor=0.0)", warmup_steps=4,
                   stage2_at=0.5, stage2_lr_factor=0.5, weight_decay=0.1,
                   stage2_weight_decay=0.0)
  opt = optim.make_optimizer(cfg, total_steps=20)
  lr = [float(opt.lr(s)) for s in range(20)]
  np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
  # Linear decay from 1 at step 4 to 0 at step 20, halved from step 10 on.
  np.testing.assert_allclose(lr[8], 1 - 4 / 16, rtol=1e-6)
  np.testing.assert_allclose(lr[12], 0.5 * (1 - 8 / 16), rtol=1e-6)
  assert [float(opt.weight_decay(s)) for s in (0, 9, 10, 19)] == pytest.approx(
      [0.1, 0.1, 0.0, 0.0])
  cos = optim.make_optimizer(_optim_cfg(lr=2.0, schedule="cosine(end_factor=0.1)"),
                             total_steps=10)
  np.testing.assert_allclose([float(cos.lr(s)) for s in (0, 5, 10)],
                             [2.0, 2.0 * (0.1 + 0.9 * 0.5), 0.2], rtol=1e-6)
  with pytest.raises(KeyError, match="Registered: constant, cosine, linear"):
    optim.make_optimizer(_optim_cfg(schedule="cosin"), total_steps=10)


@pytest.mark.slow
def test_weight_decay_only_on_kernels(parts):
  params = parts["init_fn"](jax.random.PRNGKey(0)).params
  mask = optim.kernels_only_mask(params)
  assert mask["layers_0"]["attn"]["q_proj"]["kernel"] is True
  assert mask["embed"]["embedding"] is False
  assert mask["final_norm"]["scale"] is False
  # With lr, grads = 0 except weight decay: only kernels move.
  cfg = _optim_cfg(lr=0.1, weight_decay=0.5, clip_norm=0.0)
  tx = optim.make_optimizer(cfg, total_steps=10).tx
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates["layers_0"]["attn"]["q_proj"]["kernel"],
                             -0.1 * 0.5 * params["layers_0"]["attn"]["q_proj"]["kernel"],
                             rtol=1e-6)
  assert float(jnp.abs(updates["embed"]["embedding"]).max()) == 0.0


@pytest.mark.slow
def test_ternary_lambda_is_fed_per_step_without_recompiling():
  ternary_training = pytest.importorskip("fcp_jax.models.ternary_training")
  model, model_cfg = state_lib.build_model(
      {"variant": "tiny", "weight_quant": "absmean", "act_quant": "none"})
  opt = optim.make_optimizer(_optim_cfg(), total_steps=10, model_cfg=model_cfg)
  quant = {"lambda_start": 1, "lambda_ramp": 2, "lambda_stagger": 1}
  qlambda_fn = step_lib.make_qlambda_fn(model_cfg, quant)
  train_step = jax.jit(step_lib.make_train_step(model, losses.build("nll"), opt,
                                                qlambda_fn=qlambda_fn),
                       donate_argnums=0)
  state = jax.jit(state_lib.make_init_fn(model, opt.tx))(jax.random.PRNGKey(0))
  seen = []
  for _ in range(4):
    step = int(state.step)
    state, m = train_step(state, _batch())
    expected = ternary_training.lambda_schedule(
        step, num_layers=model_cfg.num_layers, start=1,
                                       ramp=2, stagger=1)
    seen.append(float(m["qlambda"]))
    np.testing.assert_allclose(float(m["qlambda"]), float(jnp.mean(expected)))
  # Layer ℓ ramps from step 1 + ℓ over 2 steps: means over the 2 layers.
  assert seen == [0.0, 0.0, 0.25, 0.75]
  assert train_step._cache_size() == 1  # pylint: disable=protected-access
  assert step_lib.make_qlambda_fn(state_lib.model_config({"variant": "tiny"}))(0) is None


def test_bad_parallel_config_raises():
  with pytest.raises(ValueError, match=r"needs 16 devices, but 8 are available"):
    sharding.make_mesh((4, 2, 2))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.logical_rules([("mlp", "model")])
  with pytest.raises(KeyError, match="Registered: mesh, pmap"):
    sharding.build({"mode": "pjit"})
  par = sharding.build({"mode": "mesh", "mesh_shape": (8, 1, 1)})
  with pytest.raises(ValueError, match="Global batch size 4 is not divisible by the 8"):
    par.put_batch({k: v[:4] for k, v in _batch().items()})


_WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, {tests_dir!r})
import jax
from fcp_jax.training import losses, optim, sharding, state as state_lib, step as step_lib
from test_step_sharding import _batch, _optim_cfg
pid, port, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
sharding.initialize_distributed({{"distributed": True, "num_processes": 2,
    "process_id": pid, "coordinator_address": "127.0.0.1:" + port}})
model, model_cfg = state_lib.build_model({{"variant": "tiny"}})
opt = optim.make_optimizer(_optim_cfg(), total_steps=10, model_cfg=model_cfg)
specs = state_lib.state_logical_specs(model, opt.tx)
par = sharding.build({{"mode": mode, "mesh_shape": (-1, 1, 1)}})
state = par.create_state(state_lib.make_init_fn(model, opt.tx), jax.random.PRNGKey(0), specs)
step = par.jit_train_step(step_lib.make_train_step(
    model, losses.build("fcp"), opt, axis_name=par.axis_name), specs)
batch = _batch()
rows = len(batch["tokens"]) // 2
local = {{k: v[pid * rows:(pid + 1) * rows] for k, v in batch.items()}}  # Own shard.
state, metrics = step(state, par.put_batch(local))
print("RESULT", float(metrics["loss"]), float(metrics["tokens"]), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_two_processes_each_feeding_its_shard_match_single_process(setup, tmp_path, mode):
  import os  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  script = tmp_path / "worker.py"
  script.write_text(_WORKER.format(tests_dir=tests_dir))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = str(s.getsockname()[1])
  env = dict(os.environ, PYTHONPATH=os.path.dirname(tests_dir), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port, mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=400)[0] for p in procs]
  ref_loss = float(setup["ref"][1]["loss"])
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
    loss, tokens = map(float, out.split("RESULT")[1].split()[:2])
    # The global batch is the union of the two shards: same loss as one process.
    np.testing.assert_allclose(loss, ref_loss, rtol=LOSS_RTOL)
    assert tokens == float(setup["ref"][1]["tokens"])

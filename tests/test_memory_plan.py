"""Memory plans (``training/memory_plan.py``, ``experiments/memory_plan.py``) on the tiny
variant with fake CPU devices, the drivers' check, and the named remat policies."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcp_jax import testing
from fcp_jax.models import transformer as tfm
from fcp_jax.training import memory_plan
from fcp_jax.training import sharding
from fcp_jax.training import step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "experiments", "memory_plan.py")
FIELDS = ("args (params+opt)", "temps", "outputs", "code", "total")


def _par(n=4):
  return sharding.build({"mode": "mesh", "mesh_shape": (1, -1, 1)}, jax.devices()[:n])


@pytest.mark.slow
def test_command_on_fake_devices_prints_fields_and_does_not_fit():
  """A fresh process: the command asks for 16 fake devices itself."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, DRIVER, "--variant=tiny", "--devices=16", "--seq_len=32",
       "--tokens_per_device=32", "--prompts=16", "--prompt_len=16", "--new_tokens=4",
       "--chip_gib=1e-6"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]  # Some row does not fit.
  text = out.stdout
  assert all(f in text for f in FIELDS), text
  for step in ("train", "prefill", "decode"):
    assert f" {step} " in text, text
  assert " 16  1x16x1 " in text, text  # 16 fake devices, an FSDP mesh.
  assert "DOES NOT FIT" in text and "over" in text and "model.remat" in text, text


def test_config_stage_plan_fits():
  rows = testing.load_driver(DRIVER).main(["--config=configs/arith_fcp.py:runlocal", "--stage=warmup",
                         "--devices=2", "--remat=proj", "--chip_gib=16"])
  assert [(r["label"]["remat"], r["label"]["batch"]) for r in rows] == [("proj", "8x128")]
  for r in rows:
    plan = r["plan"]
    assert plan.name == "train" and plan.arguments > 0 and plan.temporaries > 0
    assert plan.total < 1 << 30 and plan.spare(16 * memory_plan.GIB) > 0


def test_check_before_training_stops_with_the_knobs():
  config = memory_plan.train_config({"variant": "tiny"})
  with pytest.raises(memory_plan.DoesNotFit) as e:
    memory_plan.check_before_training(config, _par(), rows=4, seq_len=16,
                                      limit_bytes=1e-6 * memory_plan.GIB)
  message = str(e.value)
  for word in ("train step", "does not fit", "GiB over", "temporaries", "remat",
               "loss_chunk", "attention", "more devices"):
    assert word in message, message
  # A run's own built step is planned as it is: the same figures.
  par = _par()
  tr = step_lib.build_training(config, par, total_steps=1)
  assert (memory_plan.plan_training(config, par, rows=4, seq_len=16, tr=tr)
          == memory_plan.plan_training(config, par, rows=4, seq_len=16))


def test_check_before_training_does_nothing_on_cpu(monkeypatch):
  monkeypatch.setattr(memory_plan, "plan_training", lambda *a, **k: 1 / 0)
  memory_plan.check_before_training(memory_plan.train_config({"variant": "tiny"}),
                                    _par(), rows=4, seq_len=16)


@pytest.mark.parametrize("scan", [False, True])
def test_named_remat_policies_equal_reference(scan):
  """``proj`` and ``attn_proj`` (the large variants' default): same values and grads."""
  cfg, ref_model, params = testing.tiny_model(scan_layers=scan)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 1, 100)  # [B, T]

  def value_and_grad(m):
    def objective(p):
      logits, _ = m.apply({"params": p}, tokens)  # [B, T, V]
      w = jax.random.normal(jax.random.PRNGKey(7), logits.shape)
      return jnp.sum(logits * w), logits
    return jax.jit(jax.value_and_grad(objective, has_aux=True))(params)

  (_, ref), ref_grads = value_and_grad(ref_model)
  for remat in ("proj", "attn_proj"):
    (_, out), grads = value_and_grad(tfm.Transformer(cfg.replace(remat=remat)))
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5),
                 grads, ref_grads)

"""Weight-decay shapes (``optim.weight_decay_schedule``) and the BitNet b1.58 2B4T preset."""

import math
import os

import ml_collections
import numpy as np
import pytest

from fcp_jax import config_lib
from fcp_jax import stages
from fcp_jax.training import optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
common = config_lib.load_module(os.path.join(REPO, "configs", "common.py"))

TOTAL = 20
TWO_STAGE = dict(lr=1.0, schedule="cosine", warmup_steps=2, weight_decay=0.1,
                 stage2_at=0.5, stage2_lr_factor=0.5, stage2_weight_decay=0.0)


def _schedules(total=TOTAL, **kw):
  lr, wd = optim.make_schedules(ml_collections.ConfigDict(kw), total)
  return ([float(lr(s)) for s in range(total + 1)],
          [float(wd(s)) for s in range(total + 1)])


def test_cosine_weight_decay_peaks_in_stage_1_and_is_0_in_stage_2():
  lr, wd = _schedules(**TWO_STAGE, weight_decay_schedule="cosine")
  # Stage 2 from step 10; the cosine runs over steps 2 (end of warm-up) to 10.
  cos = lambda p: 0.1 * 0.5 * (1 + math.cos(math.pi * p))
  np.testing.assert_allclose(wd[:3], [0.1, 0.1, 0.1], rtol=1e-6)
  for step in (3, 4, 6, 9):
    np.testing.assert_allclose(wd[step], cos((step - 2) / 8), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(wd[6], 0.05, rtol=1e-5)
  assert wd[10:] == [0.0] * (TOTAL + 1 - 10)
  assert lr == _schedules(**TWO_STAGE)[0]  # The learning rate is unchanged.


def test_weight_decay_shape_without_a_stage_2_runs_to_the_end():
  _, wd = _schedules(lr=1.0, weight_decay=0.2, weight_decay_schedule="cosine")
  np.testing.assert_allclose([wd[0], wd[5], wd[10], wd[15], wd[20]],
                             [0.2, 0.2 * 0.5 * (1 + math.cos(math.pi / 4)), 0.1,
                              0.2 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
                             rtol=1e-5, atol=1e-8)
  _, lin = _schedules(lr=1.0, weight_decay=0.2,
                      weight_decay_schedule="linear(end_factor=0.5)")
  np.testing.assert_allclose([lin[0], lin[10], lin[20]], [0.2, 0.15, 0.1], rtol=1e-5)


def test_unset_weight_decay_schedule_is_the_old_constant():
  """No key, or "constant": the same values as before the option existed."""
  old_lr, old_wd = _schedules(**TWO_STAGE)
  assert old_wd == [float(np.float32(0.1))] * 10 + [0.0] * (TOTAL + 1 - 10)
  assert _schedules(**TWO_STAGE, weight_decay_schedule="constant") == (old_lr, old_wd)
  with pytest.raises(KeyError, match="Registered: constant, cosine, linear"):
    _schedules(**TWO_STAGE, weight_decay_schedule="cosin")


def test_common_optim_adds_no_key_unless_asked():
  """Configs that do not ask keep their fields, and so their stage keys."""
  before = dict(lr=1e-3, schedule="cosine(end_factor=0.1)", warmup_steps=0,
                warmup_frac=0.05, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0,
                clip_norm=1.0, stage2_at=0.0, stage2_lr_factor=1.0,
                stage2_weight_decay=0.0)
  assert common.optim(1e-3).to_dict() == before
  assert stages.stage_key("s", {"optim": common.optim(1e-3)}, {}) == stages.stage_key(
      "s", {"optim": before}, {})
  asked = common.optim(1e-3, weight_decay_schedule="cosine")
  assert asked.weight_decay_schedule == "cosine"
  assert stages.stage_key("s", {"optim": asked}, {}) != stages.stage_key(
      "s", {"optim": before}, {})


def test_bitnet_2b4t_preset():
  cfg = common.optim(1.0, **common.bitnet_2b4t())
  assert (cfg.schedule, cfg.weight_decay, cfg.weight_decay_schedule, cfg.stage2_at,
          cfg.stage2_lr_factor, cfg.stage2_weight_decay) == ("cosine", 0.1, "cosine",
                                                              0.5, 0.5, 0.0)
  opt = optim.make_optimizer(cfg, total_steps=100)  # Warm-up: 5 steps; stage 2 at 50.
  wd = [float(opt.weight_decay(s)) for s in (0, 5, 50, 99)]
  np.testing.assert_allclose(wd, [0.1, 0.1, 0.0, 0.0], atol=1e-8)
  np.testing.assert_allclose(float(opt.weight_decay(27.5)), 0.05, rtol=1e-5)
  np.testing.assert_allclose(float(opt.lr(50)), 0.5 * 0.5 * (1 + math.cos(
      math.pi * 45 / 95)), rtol=1e-5)

"""Fair defaults: training-token budgets, the methods a config runs, relative lrs."""

import os

import numpy as np
import pytest

from fcp_jax import config_lib
from fcp_jax import experiment
from fcp_jax.training import offline
from fcp_jax.training import online
from tests import test_train_driver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(REPO, "configs", "arith_fcp.py")


def test_updates_for_tokens_takes_the_nearest_count_in_passes():
  # Cumulative 10, 30, 60: 35 is nearer 30 (2 updates), 50 nearer 60 (3).
  assert online.updates_for_tokens([10, 20, 30], 35) == 2
  assert online.updates_for_tokens([10, 20, 30], 50) == 3
  assert online.updates_for_tokens([10, 20, 30], 5) == 1  # At least one update.
  # Past one pass the mini-batches repeat in order: 10, 20, ..., 70 (a tie adds one).
  assert online.updates_for_tokens([10], 35) == 4
  assert online.updates_for_tokens([10, 20], 94) == 6  # 90 is nearer than 100.


def _online_cfg(**online_updates):
  cfg = config_lib.stage_config(config_lib.load_config(f"{ARITH}:runlocal"), "grpo")
  cfg.unlock()
  cfg.online.update(rounds=4, **online_updates)
  return cfg


def test_epochs_and_token_budget_set_the_updates_per_round():
  on = _online_cfg(epochs=2.5).online  # 8 rows, mini-batch 4: 2 per pass.
  on.mini_batch = 4
  assert online.updates_per_round(on) == 5
  on.epochs = 0.1
  assert online.updates_per_round(on) == 1
  on.epochs = 0.0
  with pytest.raises(ValueError, match="online.epochs must be > 0"):
    online.updates_per_round(on)
  assert online.check_token_budget(_online_cfg(train_tokens=1000)) == 250.0
  assert online.check_token_budget(_online_cfg()) == 0.0
  with pytest.raises(ValueError, match="train_tokens and config.online.epochs"):
    online.check_token_budget(_online_cfg(train_tokens=1000, epochs=2.0))
  cfg = _online_cfg(train_tokens=1000)
  cfg.optim.schedule = "cosine(end_factor=0.1)"
  with pytest.raises(ValueError, match="schedule='constant'"):
    online.check_token_budget(cfg)


def test_steps_for_tokens_counts_the_runs_own_batches(tmp_path):
  data_dir = test_train_driver.build_triples(str(tmp_path / "tfds"))
  cfg = test_train_driver.local_config(data_dir)
  pipe = offline.make_pipeline(cfg, offline.policy_lib.build_tokenizer(cfg.tokenizer),
                               cfg.data.train_split, batch_size=cfg.batch_size,
                               train=True)
  it = iter(pipe)
  cumulative = np.cumsum([offline._tokens_in(next(it)) for _ in range(40)])  # [40]
  for target in (1.0, cumulative[3] + 1, (cumulative[9] + cumulative[10]) / 2 - 1,
                 cumulative[25] - 1):
    steps = offline.steps_for_tokens(cfg, target)
    best = 1 + int(np.argmin(np.abs(cumulative - target)))
    assert steps == best, (target, steps, best)


def test_relative_bootstrap_lr_follows_the_offline_lr():
  config = config_lib.load_config(ARITH)
  factor = config.bootstrap.lr_factor
  assert config.bootstrap.optim.lr is None
  assert config_lib.stage_config(config, "bootstrap").optim.lr == pytest.approx(
      factor * config.offline.optim.lr)
  config_lib.apply_overrides(config, ["offline.optim.lr=5e-4"])
  assert config_lib.stage_config(config, "bootstrap").optim.lr == pytest.approx(
      factor * 5e-4)
  config_lib.apply_overrides(config, ["bootstrap.optim.lr=1e-4"])
  with pytest.raises(ValueError, match="bootstrap.optim.lr and config.bootstrap.lr_"):
    config_lib.stage_config(config, "bootstrap")


def test_needed_stages_follow_the_methods_and_references_need_every_method():
  config = config_lib.load_config(f"{ARITH}:runlocal")
  assert experiment.needed_stages(config) == [
      "offline_fcp", "fcp_bootstrap", "rft", "grpo", "rft_collect", "rft_grpo"]
  config_lib.apply_overrides(config, ["methods=('warmup', 'grpo')"])
  assert experiment.needed_stages(config) == ["grpo"]
  config_lib.apply_overrides(config, ["collect.references=10"])
  with pytest.raises(ValueError, match="GRPO cannot use"):
    experiment.needed_stages(config)
  config_lib.apply_overrides(config, ["methods=('fcp_bootstrap', 'rft')"])
  assert experiment.needed_stages(config) == ["offline_fcp", "fcp_bootstrap", "rft"]
  config_lib.apply_overrides(config, ["methods=('fcp_bootstrap', 'ppo')"])
  with pytest.raises(KeyError, match="unknown method 'ppo'"):
    experiment.needed_stages(config)


def test_budget_checks_hold_each_matched_method_to_ten_percent():
  budgets = {m: dict(input_tokens=t) for m, t in (
      ("offline_fcp", 500.0), ("fcp_bootstrap", 1099.0), ("rft", 901.0),
      ("grpo", 1120.0))}
  checks = experiment.budget_checks(1000.0, budgets)
  assert set(checks) == {"fcp_bootstrap_tokens_vs_budget", "rft_tokens_vs_budget",
                         "grpo_tokens_vs_budget"}  # offline_fcp is a part; no rft_grpo.
  assert checks["fcp_bootstrap_tokens_vs_budget"]["ok"]
  assert checks["rft_tokens_vs_budget"]["value"] == pytest.approx(90.1)
  assert checks["rft_tokens_vs_budget"]["ok"]
  assert not checks["grpo_tokens_vs_budget"]["ok"]
  assert experiment.budget_checks(0.0, budgets) == {}


def test_fixed_negative_and_four_seeds_are_the_default_evaluation():
  ev = config_lib.load_config(ARITH).eval
  assert {"negative", "fixed_negative", "pool"} <= set(ev.conditions)
  assert len(ev.seeds) >= 4


def test_budgeted_stages_take_their_steps_from_the_budget_or_name_both():
  config = config_lib.load_config(f"{ARITH}:runlocal")
  experiment.check_budget(config)  # total_steps=0 under a budget.
  config_lib.apply_overrides(config, ["rft.total_steps=5"])
  with pytest.raises(ValueError, match="rft.total_steps=5 and config.budget.train_"):
    experiment.check_budget(config)
  config_lib.apply_overrides(config, ["budget.train_tokens=0"])
  with pytest.raises(ValueError, match="offline.total_steps=0 takes its steps"):
    experiment.check_budget(config)
  config_lib.apply_overrides(config, ["offline.total_steps=4"])
  with pytest.raises(ValueError, match=r"offline.checkpoint.every=None follows the st"):
    experiment.check_budget(config)  # A derived cadence needs the budget's steps.
  config_lib.apply_overrides(config, [f"{name}.{key}=2" for name in ("offline", "rft")
                                      for key in experiment.BUDGET_CADENCE])
  experiment.check_budget(config)  # No budget: each stage's own length and cadence.


def test_budgeted_cadence_follows_the_steps_unless_set(tmp_path):
  data_dir = test_train_driver.build_triples(str(tmp_path / "tfds"))
  cfg = test_train_driver.local_config(data_dir)
  cfg.checkpoint.every = cfg.eval.every = None  # As the budgeted stages leave them.
  steps = offline.steps_for_tokens(cfg, 12000)
  assert steps >= 10
  out = experiment.with_token_steps(cfg, 12000)
  assert (out.total_steps, out.checkpoint.every, out.eval.every) == (
      steps, steps // 5, steps // 2)
  cfg.checkpoint.every = 3  # Set over the derived cadence: kept.
  out = experiment.with_token_steps(cfg, 12000)
  assert (out.checkpoint.every, out.eval.every) == (3, steps // 2)
  defaults = config_lib.load_config(ARITH)
  assert defaults.offline.checkpoint.every is None and defaults.rft.eval.every is None

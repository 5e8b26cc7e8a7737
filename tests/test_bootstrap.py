"""Tests of the online driver: FCP re-templating, GRPO rows, prompt order, crash resume."""

import json
import os
import statistics
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from fcp_jax import config_lib
from fcp_jax import rollout
from fcp_jax.training import online as bootstrap
from fcp_jax.data import chat
from fcp_jax.data import tasks
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.feedback.base import Feedback
from fcp_jax.feedback.pool import ConditionPool
from fcp_jax.training import checkpoint as checkpoint_lib
from fcp_jax.training import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C_PLUS = "Correct and clear; carefully reasoned throughout."


def _feedback(reviewer: str, score: int, correct: bool) -> Feedback:
  return Feedback(user=f"user {score}", reviewer=reviewer, critique=f"critique {score}",
                  score=score, correct=correct)


def _rollouts(tok, condition, responses, feedback, logprobs=None):
  example = tasks.Example(uid="u0", question="3+4=?", answer="7")
  prompt = chat.encode_prompt(tok, example.question, condition, system=None)
  n = len(responses)
  ids = [tok.encode(r) + [tok.im_end_id] for r in responses]
  width = max(len(r) for r in ids)
  if logprobs is None:
    logprobs = np.zeros((n, width), np.float32)
  return rollout.Rollouts(
      examples=[example] * n, questions=[example.question] * n, prompts=[prompt] * n,
      sample_conditions=[condition] * n, responses=ids, texts=list(responses),
      logprobs=logprobs, lengths=np.asarray([len(r) for r in ids]), feedback=feedback,
      group_size=n)


def test_fcp_rows_hold_sampled_response_under_fresh_condition():
  tok = tokenizer_lib.CharTokenizer()
  fresh = ["Incorrect and sloppy; numerically inaccurate overall.",
           "Right and tidy; neatly reasoned throughout."]
  ro = _rollouts(tok, C_PLUS, ["3+4=8\n#### 8", "3+4=7\n#### 7"],
                 [_feedback(fresh[0], 2, False), _feedback(fresh[1], 10, True)])
  objective = bootstrap.ONLINE_OBJECTIVES.build("fcp", _online_cfg())
  batch = objective.batch(tok, ro, max_len=128)
  for i in range(2):
    # Independent reference: the prompt built from scratch under c', then the samples.
    expected_prompt = chat.encode_prompt(tok, "3+4=?", fresh[i], system=None)
    expected = expected_prompt + ro.responses[i]
    n = len(expected)
    np.testing.assert_array_equal(batch["tokens"][i, :n], expected)
    assert np.all(batch["segment_ids"][i, n:] == 0)
    mask = batch["loss_mask"][i]
    # The loss covers exactly the sampled response ids (end token included).
    np.testing.assert_array_equal(np.nonzero(mask)[0],
                                  np.arange(len(expected_prompt), n))
    np.testing.assert_array_equal(batch["tokens"][i][mask > 0], ro.responses[i])
    text = tok.decode(batch["tokens"][i, :n].tolist())
    assert fresh[i] in text and C_PLUS not in text
  # Rows longer than max_len are flagged (the driver counts them as rollout/cut_rows).
  assert batch["truncated"].tolist() == [0, 0]
  long_first = len(chat.encode_prompt(tok, "3+4=?", fresh[0], system=None)) + 3
  assert objective.batch(tok, ro, max_len=long_first)["truncated"].tolist() == [1, 0]


def test_fcp_condition_kind_is_configurable():
  tok = tokenizer_lib.CharTokenizer()
  fb = _feedback("Sound and clear; logically reasoned throughout.", 10, True)
  ro = _rollouts(tok, C_PLUS, ["#### 7"], [fb])
  cfg = _online_cfg(condition_kind="user")
  batch = bootstrap.ONLINE_OBJECTIVES.build("fcp", cfg).batch(tok, ro, max_len=96)
  text = tok.decode(batch["tokens"][0].tolist())
  assert f"<EF>{fb.user}</EF>" in text and fb.reviewer not in text


def test_sample_conditions_shared_or_fresh_per_rollout():
  pool = ConditionPool([f"good {i}" for i in range(50)])
  shared = bootstrap.FcpObjective(_online_cfg()).sample_conditions(
      pool, 3, 4, np.random.default_rng(0))
  assert len(shared) == 12
  for p in range(3):
    assert len(set(shared[p * 4:(p + 1) * 4])) == 1
  fresh = bootstrap.FcpObjective(_online_cfg(fresh_cplus_per_rollout=True)).sample_conditions(
      pool, 3, 4, np.random.default_rng(0))
  assert len(fresh) == 12 and len(set(fresh)) > 3


def test_grpo_rows_advantages_and_old_logprobs():
  tok = tokenizer_lib.CharTokenizer()
  scores = [10, 2, 7, 2]
  responses = ["#### 7", "#### 1", "3+4=7", "no"]
  logprobs = -np.arange(1, 4 * 8 + 1, dtype=np.float32).reshape(4, 8) / 10
  ro = _rollouts(tok, "", responses,
                 [_feedback("x", s, s == 10) for s in scores], logprobs)
  batch = bootstrap.ONLINE_OBJECTIVES.build("grpo", _online_cfg()).batch(
      tok, ro, max_len=64)
  rewards = [s / 10 for s in scores]
  mean, std = statistics.mean(rewards), statistics.stdev(rewards)  # unbiased, by hand
  np.testing.assert_allclose(batch["advantages"], [(r - mean) / (std + 1e-6)
                                                   for r in rewards], rtol=1e-5)
  prompt = chat.encode_prompt(tok, "3+4=?", "", system=None)
  for i, r in enumerate(ro.responses):
    np.testing.assert_array_equal(batch["tokens"][i, :len(prompt)], prompt)
    span = slice(len(prompt), len(prompt) + len(r))
    np.testing.assert_array_equal(batch["tokens"][i, span], r)
    np.testing.assert_array_equal(batch["old_logprobs"][i, span], logprobs[i, :len(r)])
    assert batch["old_logprobs"][i, :len(prompt)].sum() == 0
    np.testing.assert_array_equal(np.nonzero(batch["loss_mask"][i])[0],
                                  np.arange(span.start, span.stop))


def test_failed_feedback_is_never_trained_on():
  tok = tokenizer_lib.CharTokenizer()
  failed = Feedback(user="", reviewer="", critique="", score=5, correct=True, ok=False)
  scores = [10, 2, 7, 2]
  fb = [_feedback("x", s, s == 10) for s in scores]
  ro = _rollouts(tok, C_PLUS, ["#### 7", "#### 1", "3+4=7", "no"], fb[:2] + [failed] + fb[3:])
  fcp = bootstrap.ONLINE_OBJECTIVES.build("fcp", _online_cfg()).batch(tok, ro, max_len=96)
  assert fcp["loss_mask"][2].sum() == 0
  assert all(fcp["loss_mask"][i].sum() == len(ro.responses[i]) for i in (0, 1, 3))
  grpo = bootstrap.ONLINE_OBJECTIVES.build("grpo", _online_cfg()).batch(tok, ro, max_len=96)
  assert grpo["loss_mask"][2].sum() == 0 and grpo["advantages"][2] == 0
  # The group's statistics come from the three answered rows only.
  rewards = [1.0, 0.2, 0.2]
  mean, std = statistics.mean(rewards), statistics.stdev(rewards)
  np.testing.assert_allclose(grpo["advantages"][[0, 1, 3]],
                             [(r - mean) / (std + 1e-6) for r in rewards], rtol=1e-5)


def test_round_prompts_cover_each_epoch_once_and_are_deterministic():
  seen = []
  for r in range(5):
    idx, cursor, _ = bootstrap.round_prompts(10, 4, r, seed=3)
    assert cursor == 4 * (r + 1)
    seen += idx.tolist()
  assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
  assert seen[:10] != seen[10:20]  # A fresh permutation each epoch.
  np.testing.assert_array_equal(bootstrap.round_prompts(10, 4, 3, 3)[0],
                                bootstrap.round_prompts(10, 4, 3, 3)[0])


def test_mini_batch_must_divide_rollouts():
  batch = {"tokens": np.zeros((6, 4), np.int32)}
  with pytest.raises(ValueError, match="mini_batch=4"):
    bootstrap._split_rows(batch, 4)  # pylint: disable=protected-access


def test_fcp_without_pool_is_a_clear_error(tmp_path):
  cfg = _config("runlocal,stage=bootstrap")
  with pytest.raises(ValueError, match="online.pool"):
    bootstrap.run(cfg, str(tmp_path / "run"))


def _config(arg):
  return config_lib.load_config(os.path.join(REPO, "configs", f"arith_fcp.py:{arg}"))


def _online_cfg(**overrides):
  cfg = ml_collections.ConfigDict(_config("runlocal,stage=bootstrap").online.to_dict())
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------------------
# SIGKILL mid-round, then re-run: bitwise equal to an uninterrupted run, no question
# asked twice.
# ---------------------------------------------------------------------------------------


def _run_bootstrap(workdir, pool_path, *, kill_at_round=None):
  driver = (["fcp_jax.bootstrap"] if kill_at_round is None else
            ["fcp_jax.testing", "fcp_jax.training.online:run", "feedback",
             str(kill_at_round)])
  cmd = [sys.executable, "-m", *driver,
         "--config", "configs/arith_fcp.py:runlocal,stage=bootstrap",
         "--workdir", str(workdir), f"--config.online.pool={pool_path}",
         "--config.online.rounds=3", "--config.plots=False"]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def _cache_keys(workdir):
  with open(os.path.join(workdir, bootstrap.FEEDBACK_CACHE)) as f:
    return [json.loads(line)["key"] for line in f if line.strip()]


@pytest.mark.slow
def test_sigkill_mid_round_resume_is_bitwise_equal(tmp_path):
  pool_path = ConditionPool([C_PLUS, "Accurate and tidy; neatly reasoned throughout."]
                            ).save(str(tmp_path / "pool.json"))
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  out = _run_bootstrap(straight, pool_path)
  assert out.returncode == 0, out.stderr[-3000:]
  out = _run_bootstrap(killed, pool_path, kill_at_round=1)
  assert out.returncode == -9, out.stderr[-3000:]  # Died by SIGKILL mid-round 1.
  keys_at_kill = _cache_keys(killed)
  rows_per_round = 4 * 2  # runlocal: 4 prompts x 2 samples.
  # Round 0 was checkpointed; round 1's answers were cached before the kill.
  assert rows_per_round < len(keys_at_kill) <= 2 * rows_per_round
  out = _run_bootstrap(killed, pool_path)  # The same command, resumed.
  assert out.returncode == 0, out.stderr[-3000:]

  # No question asked twice: the cache is identical and has one line per question.
  keys_straight, keys_killed = _cache_keys(straight), _cache_keys(killed)
  assert len(set(keys_killed)) == len(keys_killed)
  assert keys_killed == keys_straight
  with open(killed / "metrics.jsonl") as f:
    resumed = [json.loads(line) for line in f]
  # The resumed run re-sampled round 1 and got every answer of it from the cache.
  assert resumed[-1]["feedback/hits"] >= rows_per_round
  # The ternary code flips of each round, resumed or not (codes kept from the checkpoint).
  with open(straight / "metrics.jsonl") as f:
    flips = [json.loads(line)["quant/flip_rate"] for line in f]
  assert [r["quant/flip_rate"] for r in resumed] == flips and len(flips) == 3

  # Bitwise equal final parameters and optimizer step.
  cfg = _config("runlocal,stage=bootstrap")
  model, _ = state_lib.build_model(cfg.model)
  abstract = jax.eval_shape(lambda: nn.unbox(
      state_lib.init_boxed_params(model, jax.random.PRNGKey(0))))
  a = checkpoint_lib.restore_params(str(straight), abstract)
  b = checkpoint_lib.restore_params(str(killed), abstract)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ckpt = checkpoint_lib.Checkpointer(str(killed / "checkpoints"), every=1)
  assert ckpt.latest_step() == 3
  ckpt.close()


def test_updates_per_round_validates_the_mini_batch():
  assert bootstrap.updates_per_round(_online_cfg(prompts_per_step=4, num_samples=4,
                                                 mini_batch=8)) == 2
  with pytest.raises(ValueError, match="mini_batch=3"):
    bootstrap.updates_per_round(_online_cfg(mini_batch=3))


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "absmean"])
def test_one_online_update_lowers_its_own_batch_nll(quant):
  from fcp_jax.training import losses, optim, step as step_lib  # pylint: disable=g-import-not-at-top
  tok = tokenizer_lib.CharTokenizer()
  ro = _rollouts(tok, C_PLUS, ["3+4=7\n#### 7", "#### 8", "3+4=8\n#### 8", "#### 7"],
                 [_feedback(f"verdict {i}", 5, True) for i in range(4)])
  batch = bootstrap.ONLINE_OBJECTIVES.build("fcp", _online_cfg()).batch(tok, ro, 64)
  batch.pop("truncated")
  model_cfg = {"variant": "tiny", "weight_quant": quant,
               "act_quant": "none" if quant == "none" else "absmax_int8"}
  model, cfg = state_lib.build_model(model_cfg)
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0)), total_steps=1, model_cfg=cfg)
  nll = losses.build("nll")
  state = jax.jit(state_lib.make_init_fn(model, opt.tx))(jax.random.PRNGKey(0))
  qlambda_fn = step_lib.make_qlambda_fn(cfg, {"lambda_start": 0, "lambda_ramp": 0})
  train_step = jax.jit(step_lib.make_train_step(model, nll, opt, qlambda_fn=qlambda_fn))
  eval_step = jax.jit(step_lib.make_eval_step(model, nll, qlambda_fn=qlambda_fn))
  before = float(eval_step(state.params, batch)["loss"])
  state, metrics = train_step(state, batch)
  after = float(eval_step(state.params, batch)["loss"])
  assert float(metrics["loss"]) == pytest.approx(before, rel=1e-5)
  assert after < before - 1e-3, (before, after)
  # The budget metric counts the rows' non-padding tokens.
  assert float(metrics["input_tokens"]) == float(np.count_nonzero(batch["segment_ids"]))


@pytest.mark.slow
def test_grpo_kl_is_to_the_starting_policy_and_rounds_log_their_batch_nll(tmp_path):
  cfg = _config("runlocal,stage=grpo")
  config_lib.apply_overrides(cfg, ["loss='grpo(clip_eps=0.2, kl_coef=0.1)'",
                                   "online.rounds=2", "optim.lr=1e-2", "plots=False"])
  bootstrap.run(cfg, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    rounds = [json.loads(line) for line in f]
  # Round 1's one update starts at the reference policy: the k3 KL to it is zero; after
  # that update the policy has moved, and round 2's KL is positive.
  assert rounds[0]["train/kl"] < 1e-6 < rounds[1]["train/kl"]
  on = cfg.online
  for r in rounds:
    assert r["train/updates"] == on.prompts_per_step * on.num_samples // on.mini_batch
    assert r["rollout/batch_nll_before"] > 0 and r["rollout/batch_nll_after"] > 0
    assert r["train/input_tokens"] > r["train/tokens"] > 0
    # A ternary model (runlocal's default): the share of codes the round changed.
    assert 0 < r["quant/flip_rate"] <= 1 and 0 <= r["quant/q_proj/flip_rate"] <= 1
    # Where the round's time went: each phase measured, within the round's wall time.
    phases = [r[f"time/{k}_s"] for k in ("sample", "feedback", "update", "diagnostics")]
    assert min(phases[0], phases[2], phases[3]) > 0 and phases[1] >= 0
    assert sum(phases) <= r["time/round_s"]
  # Logged before and after the round's update: round 1's update moved the policy, so
  # its rows' NLL changed (a value logged twice, or before the update, would not).
  assert rounds[0]["rollout/batch_nll_after"] != rounds[0]["rollout/batch_nll_before"]

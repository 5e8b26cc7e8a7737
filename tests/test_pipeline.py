"""Tests of the end-to-end pipeline, its pair selection and the sweep merge."""

import collections
import json
import os
import sys

import numpy as np
import pytest

from fcp_jax import config_lib
from fcp_jax import experiment as pipeline
from fcp_jax import rollout
from fcp_jax.training import online as bootstrap
from fcp_jax.data import tasks
from fcp_jax.data import tfds_builders
from fcp_jax.feedback import pool as pool_lib
from fcp_jax.feedback.base import Feedback
from fcp_jax.stages import StaleStageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(REPO, "configs", "arith_fcp.py")


def _row(uid, response, correct):
  fb = Feedback(user="u", reviewer="r", critique="c", score=10 if correct else 1,
                correct=correct)
  return dict(example=tasks.Example(uid=uid, question=uid), question=uid,
              response=response, feedback=fb)


def test_select_pairs_keeps_mixed_prompts_one_right_one_wrong():
  rows = ([_row("a", "ok1", True), _row("a", "ok2", True), _row("a", "bad", False),
           _row("a", "bad", False)]
          + [_row("b", f"ok{i}", True) for i in range(4)]
          + [_row("c", f"x{i}", False) for i in range(3)] + [_row("c", " ", True)]
          + [_row("d", "<|pad|>junk", True), _row("d", "y", False), _row("d", "z", False),
             _row("d", "w", False)])
  kept, stats = pipeline.select_pairs(rows, 4, pairs=1, seed=0)
  assert stats == dict(prompts=4, all_correct=1, all_wrong=2, mixed=1,
                       unstorable_dropped=2)
  assert [r["example"].uid for r in kept] == ["a", "a"]
  assert [r["feedback"].correct for r in kept] == [True, False]
  kept2, _ = pipeline.select_pairs(rows, 4, pairs=2, seed=0)
  # Only one distinct wrong response exists for "a": duplicates are not picked twice.
  assert sorted(r["response"] for r in kept2) == ["bad", "ok1", "ok2"]
  # pairs=0: natural proportions, every storable sample of the mixed prompts, in order.
  natural, stats0 = pipeline.select_pairs(rows, 4, pairs=0, seed=0)
  assert stats0 == stats
  assert [r["response"] for r in natural] == ["ok1", "ok2", "bad", "bad"]


def _chain_sum(size):
  return tasks.TASKS.build("chain_sum(min_terms=2, max_terms=3, compact=True)",
                           split="train", size=size, seed=0)


def test_condition_bank_holds_positive_and_negative_feedback(tmp_path):
  env = bootstrap.build_feedback_env("critic(noise=0.0, seed=0)", str(tmp_path))
  examples = _chain_sum(64)
  bank = pipeline.condition_bank(env, examples, kind="reviewer", seed=0)
  assert bank == sorted(set(bank)) and "" not in bank
  assert bank == pipeline.condition_bank(env, examples, kind="reviewer", seed=0)
  scores = {}
  with open(tmp_path / bootstrap.FEEDBACK_CACHE) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == len(examples)
  for rec in records:
    scores.setdefault(rec["feedback"]["reviewer"], set()).add(rec["feedback"]["score"])
  assert set(scores) == set(bank)
  all_scores = set().union(*scores.values())
  assert 10 in all_scores and min(all_scores) <= 4  # Clean-correct and wrong verdicts.


def test_warmup_records_draw_direct_references_and_conditions_independently():
  examples = _chain_sum(400)
  bank = ["good", "bad", "so-so"]
  rows = pipeline.warmup_records(examples, instruction="none", kind="reviewer", seed=3,
                                 direct_fraction=0.5, condition_fraction=0.25, bank=bank)
  assert [r["uid"] for r in rows] == [e.uid for e in examples]
  direct = np.array([r["response"].startswith("####") for r in rows])
  conditioned = np.array([r["feedback"] != "" for r in rows])
  assert 0.4 < direct.mean() < 0.6 and 0.17 < conditioned.mean() < 0.33
  assert {r["feedback"] for r in rows} == set(bank) | {""}
  for r, e in zip(rows, examples):
    assert r["response"] == tasks.reference_response(e, direct=r["response"].startswith(
        "####"))
  # The condition draw does not depend on the direct draw (same seed, no directs).
  plain = pipeline.warmup_records(examples, instruction="none", kind="reviewer", seed=3,
                                  condition_fraction=0.25, bank=bank)
  assert [r["feedback"] for r in plain] == [r["feedback"] for r in rows]
  null = pipeline.warmup_records(examples, instruction="none", kind="reviewer", seed=3)
  assert all(r["feedback"] == "" for r in null)
  with pytest.raises(ValueError, match="bank"):
    pipeline.warmup_records(examples, instruction="none", kind="reviewer", seed=3,
                            condition_fraction=0.5)


def test_reference_rows_are_the_warmup_references_with_feedback(tmp_path):
  examples = _chain_sum(40)
  env = bootstrap.build_feedback_env("critic(noise=0.0, seed=0)", str(tmp_path))
  warm = pipeline.warmup_records(examples, instruction="none", kind="reviewer", seed=2,
                                 direct_fraction=0.5)
  rows = pipeline.reference_rows(env, examples, 10, 20, instruction="none",
                                 kind="reviewer", seed=2, direct_fraction=0.5)
  assert [r["example"].uid for r in rows] == [e.uid for e in examples[10:30]]
  assert [r["response"] for r in rows] == [w["response"] for w in warm[10:30]]
  direct = [r["response"].startswith("####") for r in rows]
  assert 0 < sum(direct) < len(rows)
  # The env's own verdicts: all correct; clean chains score 10, bare answers that skip
  # intermediate values less.
  assert all(r["feedback"].correct for r in rows)
  assert {r["feedback"].score for r, d in zip(rows, direct) if not d} == {10}
  assert min(r["feedback"].score for r, d in zip(rows, direct) if d) < 10
  assert pipeline.reference_rows(env, examples, 10, 0, instruction="none",
                                 kind="reviewer", seed=2, direct_fraction=0.5) == []
  with pytest.raises(ValueError, match="collect.references=31 needs 41 train prompts"):
    pipeline.reference_rows(env, examples, 10, 31, instruction="none", kind="reviewer",
                            seed=2, direct_fraction=0.5)


def test_split_records_is_seeded_and_disjoint():
  recs = [dict(i=i) for i in range(40)]
  a = pipeline.split_records(recs, 0.1, seed=1)
  assert len(a["eval"]) == 4 and len(a["train"]) == 36
  assert {r["i"] for r in a["eval"]} | {r["i"] for r in a["train"]} == set(range(40))
  assert a == pipeline.split_records(recs, 0.1, seed=1)


def test_effect_checks_are_computed_from_the_table():
  ev = {"warmup": {"null": {"accuracy": 0.30}},
        "fcp_bootstrap": {"pool": {"accuracy": 0.45}, "negative": {"accuracy": 0.20}}}
  checks = pipeline.effect_checks(ev)
  assert checks["bootstrap_pool_minus_warmup_pts"]["value"] == pytest.approx(15.0)
  assert checks["bootstrap_pool_minus_warmup_pts"]["ok"]
  assert checks["bootstrap_pool_minus_negative_pts"]["value"] == pytest.approx(25.0)
  ev["fcp_bootstrap"]["pool"]["accuracy"] = 0.35
  assert not pipeline.effect_checks(ev)["bootstrap_pool_minus_warmup_pts"]["ok"]


@pytest.mark.slow
def test_tiny_pipeline_through_sweep_writes_every_artefact_and_resumes(tmp_path):
  merged, paths = sweep.run_sweep(CONFIG, "runlocal", ["seed=0"], str(tmp_path))
  cfg = config_lib.load_config(f"{CONFIG}:runlocal,seed=0")
  run = tmp_path / sweep.entry_name("seed=0", cfg)
  with open(run / "results.json") as f:
    results = json.load(f)
  for name in ("config.json", "results.json", "results.md",
               "plots/accuracy_per_method.png", "plots/accuracy_by_condition.png",
               "plots/curves.png", "collect/pool.json", "collect/negatives.json",
               "fcp_bootstrap/metrics.jsonl",
               "grpo/metrics.jsonl", "warmup/metrics.jsonl"):
    assert (run / name).exists(), name
  for stage in ("data", "warmup", "collect", "offline_fcp", "fcp_bootstrap", "rft",
                "grpo", "rft_collect", "rft_grpo"):
    assert (run / stage / pipeline.DONE).exists(), stage
  methods = cfg.methods
  assert set(methods) == set(pipeline.METHOD_STAGES)
  for method in methods:
    assert (run / "eval" / method / "eval.json").exists()
    for cond in cfg.eval.conditions:
      r = results["eval"][method][cond]
      assert r["num_questions"] == 16 and r["accuracy"] == pytest.approx(
          np.mean(r["per_seed"]))
    # Both pools are drawn per seed; the fixed negative text is decoded once.
    assert results["eval"][method]["pool"]["num_seeds"] == 2
    assert results["eval"][method]["negative"]["num_seeds"] == 2
    assert results["eval"][method]["fixed_negative"]["num_seeds"] == 1
  negatives = pool_lib.ConditionPool.load(str(run / "collect" / "negatives.json"))
  assert negatives.settings["require_incorrect"] and len(negatives) > 0
  assert negatives.settings["max_score"] == cfg.collect.negative_max_score
  # The warm-up rows: answer-only references and random conditions, as configured.
  warm = tfds_builders.load_source(tfds_builders.TRIPLES, str(run / "warmup" / pipeline.TFDS_DIR),
                                   cfg.warmup.data.name, "train")
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else x
  conditions = [text(r["condition"]) for r in warm]
  assert 0 < sum(c != "" for c in conditions) < len(conditions)
  assert 0 < sum(text(r["response"]).startswith("####") for r in warm) < len(warm)
  on = cfg.bootstrap.online
  assert results["budget"]["fcp_online"] == on.rounds * on.prompts_per_step * on.num_samples
  assert results["budget"]["collect"] == cfg.collect.prompts * cfg.collect.num_samples
  with open(run / "collect" / pipeline.DONE) as f:
    collected = json.load(f)
  assert collected["references"] == cfg.collect.references == 0
  assert collected["triples"] == 2 * collected["mixed"]
  # Fair defaults, per method beyond the shared warm-up: the same references (none),
  # the same generated samples and training tokens within 10% of the budget.
  per = results["budget"]["methods"]
  fcp_samples = results["budget"]["collect"] + results["budget"]["fcp_online"]
  for method in ("fcp_bootstrap", "rft", "grpo", "rft_grpo"):
    assert per[method]["samples"] == fcp_samples, method
    assert per[method]["references"] == 0, method
    check = results["checks"][f"{method}_tokens_vs_budget"]
    assert check["ok"] and check["value"] == pytest.approx(
        100 * per[method]["input_tokens"] / cfg.budget.train_tokens), method
  assert per["offline_fcp"]["samples"] == results["budget"]["collect"]
  assert per["warmup"]["updates"] == cfg.warmup.total_steps
  assert per["warmup"]["references"] == cfg.data.train_size
  on_updates = on.rounds * on.prompts_per_step * on.num_samples // on.mini_batch
  assert per["fcp_bootstrap"]["updates"] == per["offline_fcp"]["updates"] + on_updates
  with open(run / "grpo" / pipeline.DONE) as f:
    assert json.load(f)["rounds"] == fcp_samples // (
        cfg.grpo.online.prompts_per_step * cfg.grpo.online.num_samples)
  for method, m in per.items():
    assert m["input_tokens"] > m["loss_tokens"] > 0 and m["seconds"] > 0, method
  assert per["fcp_bootstrap"]["loss_tokens"] > per["offline_fcp"]["loss_tokens"]
  with open(run / "results.md") as f:
    md = f.read()
  assert "| fcp_bootstrap | pool |" in md and "## Checks" in md
  assert "rft_grpo_tokens_vs_budget" in md
  assert os.path.exists(paths["md"]) and os.path.exists(paths["png"])
  assert set(merged["base"]) == set(methods)

  # Re-running skips every complete stage (no stage record is written again) and
  # reports the same table.
  done = {stage: os.stat(run / stage / pipeline.DONE).st_mtime_ns
          for stage in results["stage_keys"]}
  again = pipeline.run(cfg, str(run), store=str(tmp_path / "stages"))
  assert again["stage_keys"] == results["stage_keys"]
  assert {stage: os.stat(run / stage / pipeline.DONE).st_mtime_ns
          for stage in results["stage_keys"]} == done
  assert again["eval"] == results["eval"]
  with open(run / "fcp_bootstrap" / pipeline.DONE) as f:
    assert json.load(f)["rounds"] == on.rounds

  # A changed override recomputes exactly the stages downstream of it, in a workdir of
  # its own that shares the store: the warm-up and the collection are reused.
  changed = config_lib.load_config(f"{CONFIG}:runlocal,seed=0")
  config_lib.apply_overrides(changed, ["offline.optim.lr=5e-4",
                                      "eval.splits=('test', 'validation')"])
  other = tmp_path / "other"
  out = pipeline.run(changed, str(other), store=str(tmp_path / "stages"))
  downstream = {"offline_fcp", "fcp_bootstrap", "eval/offline_fcp", "eval/fcp_bootstrap"}
  for stage, key in results["stage_keys"].items():
    assert (out["stage_keys"][stage] != key) == (stage in downstream), stage
    same = os.path.realpath(other / stage) == os.path.realpath(run / stage)
    assert same == (stage not in downstream), stage
  for stage, lr in (("offline_fcp", 5e-4), ("fcp_bootstrap", 5e-4 * cfg.bootstrap.lr_factor)):
    with open(other / stage / "config.json") as f:  # The bootstrap's lr is relative.
      assert json.load(f)["optim"]["lr"] == pytest.approx(lr), stage
  # Validation stages ran beside the test ones; the table reported is test's.
  assert out["split"] == "test" and out["eval"] == out["by_split"]["test"]
  assert set(out["by_split"]["validation"]) == set(methods)
  assert (out["by_split"]["validation"]["warmup"]["null"]["num_questions"]
          == out["split_sizes"]["validation"] > 0)
  assert all((other / "validation" / m / pipeline.DONE).exists() for m in methods)
  assert out["config"]["offline"]["optim"]["lr"] == 5e-4
  assert json.loads((other / "config.json").read_text())["offline"]["optim"]["lr"] == 5e-4

  # With on_change="refuse", a re-run of the first workdir under the changed setting
  # stops and names what changed, before running anything.
  config_lib.apply_overrides(changed, ["on_change=refuse"])
  with pytest.raises(StaleStageError, match=r"offline_fcp(.|\n)*lr: 0.001 -> 0.0005"):
    pipeline.run(changed, str(run), store=str(tmp_path / "stages"))


class _FlakyEnv:
  """Fails the first ``fail_times`` answers for each response, then answers."""

  def __init__(self, fail_times):
    self.fail_times, self.asked = fail_times, collections.Counter()

  def feedback(self, batch):
    out = []
    for example, response in batch:
      self.asked[response] += 1
      ok = self.asked[response] > self.fail_times
      out.append(Feedback(user="u", reviewer="r", critique="c", score=9 if ok else 5,
                          correct=True, ok=ok))
    return out


def test_failed_feedback_is_asked_again_then_stops_the_stage():
  queries = [(tasks.Example(uid=str(i), question=str(i)), f"r{i}") for i in range(3)]
  env = _FlakyEnv(fail_times=1)
  first = env.feedback(queries)
  first[0] = Feedback(user="u", reviewer="r", critique="c", score=9, correct=True)
  env.asked["r0"] = 0
  fixed = rollout.retry_failed(env, queries, first, where="collect")
  assert all(fb.ok for fb in fixed) and env.asked == {"r0": 0, "r1": 2, "r2": 2}
  stubborn = _FlakyEnv(fail_times=10)
  with pytest.raises(rollout.FeedbackFailedError,
                     match=r"collect: the feedback env failed on 3 of 3 responses after "
                           r"2 retries"):
    rollout.retry_failed(stubborn, queries, stubborn.feedback(queries), where="collect")
  assert stubborn.asked["r0"] == 3


@pytest.mark.parametrize("override", ["data.task='chain_sum(min_terms=2, max_terms=2)'",
                                      "seed=5"])
def test_every_stage_reads_the_prompts_of_the_shared_task(override):
  """The online stages' prompts and the eval driver's questions are the data stage's."""
  config = config_lib.load_config(f"{CONFIG}:runlocal")
  config_lib.apply_overrides(config, [override])
  seed = config_lib.shared_value(config, "data.task_seed")
  train = tasks.TASKS.build(config.data.task, split="train", size=config.data.train_size,
                            seed=seed)
  held_out = tasks.TASKS.build(config.data.task, split="eval",
                               size=config.data.eval_size, seed=seed)
  default = tasks.TASKS.build(config_lib.load_config(f"{CONFIG}:runlocal").data.task,
                              split="train", size=8, seed=0)
  assert [e.question for e in train[:8]] != [e.question for e in default]
  for stage in ("bootstrap", "grpo"):
    on = config_lib.stage_config(config, stage).online
    assert ([e.uid for e in bootstrap.load_prompts(on)]
            == [e.uid for e in train[:on.task_size]]), stage
  ev = config_lib.stage_config(config, "eval").eval
  assert ([e.uid for e in tasks.TASKS.build(ev.task, split="eval", size=ev.size,
                                            seed=ev.task_seed)]
          == [e.uid for e in held_out[:ev.size]])


def test_train_validation_and_test_prompts_are_disjoint_by_question():
  task = config_lib.load_config(f"{CONFIG}:runlocal").data.task
  splits = pipeline.split_prompts(task, train_size=300, validation_size=100,
                                  test_size=100, seed=0)
  questions = {k: [e.question for e in v] for k, v in splits.items()}
  assert len(questions["train"]) == 300 and len(questions["test"]) == 100
  assert 90 <= len(questions["validation"]) <= 100
  for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
    assert not set(questions[a]) & set(questions[b]), (a, b)
  assert len(set(questions["validation"])) == len(questions["validation"])
  # Train and test do not depend on how many validation prompts are drawn.
  none = pipeline.split_prompts(task, train_size=300, validation_size=0, test_size=100,
                                seed=0)
  assert [e.uid for e in none["train"]] == [e.uid for e in splits["train"]]
  assert [e.uid for e in none["test"]] == [e.uid for e in splits["test"]]
  assert none["validation"] == []

"""Tests of evaluation under conditions: prompts, scoring, statistics, files."""

import json
import math

import numpy as np
import pytest

from fcp_jax import evaluation as evaluate
from fcp_jax.data import answers
from fcp_jax.data import chat
from fcp_jax.data import tasks
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.feedback.cache import CachedFeedbackEnv
from fcp_jax.feedback.critic import Critic
from fcp_jax.feedback.pool import ConditionPool
from fcp_jax.sampling.sampler import SampleOutput


class ScriptedSampler:
  """Answers from the prompt text: right under a 'good' condition, else wrong.

  Records every prompt it was asked, so the test can check what the model saw.
  """

  def __init__(self, tok, examples):
    self.tokenizer = tok
    self.answers = {e.question: e.answer for e in examples}
    self.prompts = []
    self.methods = []

  def sample(self, params, prompts, rng, *, max_new_tokens, method, num_samples=1,
             qlambda=None, min_prompts=0):
    del params, rng, qlambda, min_prompts
    self.methods.append(method)
    texts = []
    for p in prompts:
      text = self.tokenizer.decode(p)
      self.prompts.append(text)
      _, q, e = chat.question_span(self.tokenizer, p)
      question = self.tokenizer.decode(p[q:e])
      good = "good" in text or evaluate.POSITIVE["reviewer"] in text
      if "<EF></EF>" in text:
        texts.append("no idea")  # Null condition: no final answer.
      else:
        texts.append(f"#### {self.answers[question] if good else '-999'}")
    n = len(texts)
    lengths = np.asarray([len(t) + 1 for t in texts], np.int32)
    return SampleOutput(tokens=np.zeros((n, max_new_tokens), np.int32), lengths=lengths,
                        logprobs=np.zeros((n, max_new_tokens), np.float32), text=texts,
                        prompt_index=np.arange(n))


def _examples(n=10):
  return [tasks.Example(uid=f"u{i}", question=f"{i}+{i}=?", answer=str(2 * i))
          for i in range(n)]


def test_conditions_shape_the_prompt_and_the_accuracy():
  tok = tokenizer_lib.CharTokenizer()
  examples = _examples()
  # Half the pool is "good": the pool accuracy is the fraction of good draws.
  pool = ConditionPool(["good one", "good two", "bad one", "bad two"])
  sampler = ScriptedSampler(tok, examples)
  res = evaluate.evaluate_policy(
      sampler, None, examples, conditions=["pool", "null", "negative", "positive", "none"],
      seeds=[0, 1, 2], pool=pool, kind="reviewer", max_new_tokens=8, batch_size=4)
  assert set(sampler.methods) == {"greedy"}
  assert res["positive"]["accuracy"] == 1.0 and res["negative"]["accuracy"] == 0.0
  assert res["null"]["accuracy"] == 0.0 and res["null"]["answered"] == 0.0
  assert res["none"]["answered"] == 1.0
  # Seeded conditions are decoded once per seed, fixed ones once.
  assert res["pool"]["num_seeds"] == 3 and res["negative"]["num_seeds"] == 1
  assert len(sampler.prompts) == 10 * (3 + 4)
  # Pool accuracy equals the fraction of good conditions drawn (independent recount).
  expected = []
  for s in (0, 1, 2):
    draws = evaluate.CONDITIONS.get("pool")(10, seed=s, pool=pool, kind="reviewer")
    expected.append(np.mean([d.startswith("good") for d in draws]))
  assert res["pool"]["per_seed"] == pytest.approx(expected)
  assert res["pool"]["accuracy"] == pytest.approx(np.mean(expected))
  assert res["pool"]["seed_std"] == pytest.approx(np.std(expected))
  acc = res["pool"]["accuracy"]
  assert res["pool"]["stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / 10))
  # The prompts carry exactly the condition wrappers.
  neg = evaluate.NEGATIVE["reviewer"]
  assert sum(f"<EF>{neg}</EF>" in p for p in sampler.prompts) == 10
  assert sum("<EF>" not in p for p in sampler.prompts) == 10  # "none"


def test_pool_draws_are_seeded_and_vary_with_the_seed():
  pool = ConditionPool([f"c{i}" for i in range(20)])
  draw = evaluate.CONDITIONS.get("pool")
  assert draw(30, seed=4, pool=pool, kind="reviewer") == draw(
      30, seed=4, pool=pool, kind="reviewer")
  assert draw(30, seed=4, pool=pool, kind="reviewer") != draw(
      30, seed=5, pool=pool, kind="reviewer")


def test_custom_fixed_texts_and_missing_pool():
  assert evaluate.CONDITIONS.get("fixed_negative")(2, kind="user", text="meh") == [
      "meh", "meh"]
  assert evaluate.CONDITIONS.get("positive")(1, kind="user") == [evaluate.POSITIVE["user"]]
  with pytest.raises(ValueError, match="pool"):
    evaluate.CONDITIONS.get("pool")(3, seed=0, pool=None, kind="reviewer")
  with pytest.raises(KeyError, match="evaluation condition"):
    evaluate.CONDITIONS.get("nonsense")


def test_fixed_conditions_are_plain_text_for_every_kind():
  tok = tokenizer_lib.CharTokenizer()
  for table in (evaluate.POSITIVE, evaluate.NEGATIVE):
    for text in table.values():
      assert chat.encode_condition(tok, text)[1:-1] == tok.encode(text)


def test_results_files_and_tables(tmp_path):
  tok = tokenizer_lib.CharTokenizer()
  examples = _examples(4)
  res = evaluate.evaluate_policy(
      ScriptedSampler(tok, examples), None, examples, conditions=["positive", "null"],
      seeds=[0], max_new_tokens=8)
  paths = evaluate.write_results(res, str(tmp_path))
  with open(paths["json"]) as f:
    assert json.load(f)["positive"]["accuracy"] == 1.0
  with open(paths["md"]) as f:
    md = f.read()
  assert "| positive | 100.0 | 0.0 |" in md
  table = evaluate.markdown_table({"m": res}, ["positive", "null", "pool"])
  assert "| m | 100.0 ± 0.0 | 0.0 ± 0.0 | – |" in table


def _worst_verdicts():
  """The negative pool as the pipeline builds it: wrong verdicts scored <= 2."""
  critic = Critic(seed=0)
  example = tasks.Example(uid="u", question="4-9+7=?", answer="2",
                          steps=answers.evaluate("4-9+7")[1])
  feedback = [critic.one(example, r) for r in
              [f"#### {g}" for g in range(3, 60)] + ["4-9=-5\n-5+7=2\n#### 2"]]
  worst = ConditionPool.build(feedback, min_score=0, max_score=2, require_incorrect=True)
  return worst, feedback


def test_negative_condition_draws_the_worst_verdicts():
  negatives, feedback = _worst_verdicts()
  # Every bare wrong guess scores 2; the clean chain (10) stays out.
  assert {f.score for f in feedback[:-1]} == {2} and feedback[-1].score == 10
  assert set(negatives.conditions) == {f.reviewer for f in feedback[:-1]}
  assert len(negatives) > 20
  draw = evaluate.CONDITIONS.get("negative")
  a = draw(40, seed=3, kind="reviewer", negatives=negatives)
  assert a == draw(40, seed=3, kind="reviewer", negatives=negatives)
  assert a != draw(40, seed=4, kind="reviewer", negatives=negatives)
  assert set(a) <= set(negatives.conditions) and len(set(a)) > 15
  # A text does not override the pool; no pool falls back to the fixed NEGATIVE text.
  assert draw(2, seed=3, kind="reviewer", negatives=negatives, text="meh") == draw(
      2, seed=3, kind="reviewer", negatives=negatives)
  assert draw(2, kind="user") == [evaluate.NEGATIVE["user"]] * 2
  # The paper's fixed fully negative text: eval.negative, or the kind's default.
  fixed = evaluate.CONDITIONS.get("fixed_negative")
  assert fixed(2, kind="reviewer", negatives=negatives, text="meh") == ["meh"] * 2
  assert fixed(2, kind="critique") == [evaluate.NEGATIVE["critique"]] * 2

  # Drawn negatives are decoded once per seed (and a fixed text once).
  tok = tokenizer_lib.CharTokenizer()
  examples = _examples(6)
  sampler = ScriptedSampler(tok, examples)
  res = evaluate.evaluate_policy(sampler, None, examples, conditions=["negative"],
                                 seeds=[0, 1], negatives=negatives, max_new_tokens=8)
  assert res["negative"]["num_seeds"] == 2 and len(sampler.prompts) == 12
  for s, prompts in ((0, sampler.prompts[:6]), (1, sampler.prompts[6:])):
    conds = draw(6, seed=s, kind="reviewer", negatives=negatives)
    assert all(f"<EF>{c}</EF>" in p for c, p in zip(conds, prompts))
  sampler.prompts.clear()
  res = evaluate.evaluate_policy(sampler, None, examples, conditions=["fixed_negative"],
                                 seeds=[0, 1], negatives=negatives, max_new_tokens=8,
                                 texts=dict(fixed_negative="meh"))
  assert res["fixed_negative"]["num_seeds"] == 1 and len(sampler.prompts) == 6
  assert all("<EF>meh</EF>" in p for p in sampler.prompts)


def test_no_answer_condition_draws_the_envs_verdicts_on_no_answer(tmp_path):
  critic = Critic(seed=0)
  no_answer = evaluate.no_answer_pool(critic, "reviewer")
  assert no_answer.conditions == critic.no_answer_verdicts("reviewer")
  # A cache wrapper answers for the env it wraps; an env that cannot list them gives None.
  cached = CachedFeedbackEnv(critic, str(tmp_path / "cache.jsonl"))
  assert (evaluate.no_answer_pool(cached, "user").conditions
          == critic.no_answer_verdicts("user"))

  class Judge:
    def config_key(self):
      return "judge"
  assert evaluate.no_answer_pool(Judge(), "reviewer") is None

  draw = evaluate.CONDITIONS.get("no_answer")
  a = draw(40, seed=3, no_answer=no_answer)
  assert a == draw(40, seed=3, no_answer=no_answer) != draw(40, seed=4, no_answer=no_answer)
  assert set(a) <= set(no_answer.conditions)
  with pytest.raises(ValueError, match="eval.feedback"):
    draw(2, seed=0)
  examples = _examples(6)
  sampler = ScriptedSampler(tokenizer_lib.CharTokenizer(), examples)
  res = evaluate.evaluate_policy(sampler, None, examples, conditions=["no_answer"],
                                 seeds=[0, 1], no_answer=no_answer, max_new_tokens=8)
  assert res["no_answer"]["num_seeds"] == 2 and len(sampler.prompts) == 12


def test_fallback_negatives_are_the_critics_own_words():
  critic = Critic(seed=0)
  for kind in ("reviewer", "user", "critique"):
    assert evaluate.NEGATIVE[kind] in critic.no_answer_verdicts(kind)
  assert evaluate.POSITIVE["reviewer"] in {
      Critic(seed=s).one(tasks.Example(uid="u", question="1+1=?", answer="2",
                                       steps=answers.evaluate("1+1")[1]),
                         "1+1=2\n#### 2").reviewer for s in range(3000)}


def test_config_no_answer_follows_eval_feedback_and_conditions():
  from fcp_jax import config_lib  # pylint: disable=g-import-not-at-top
  ev = config_lib.load_config("configs/arith_fcp.py:runlocal,stage=eval").eval
  assert evaluate.config_no_answer(ev) is None  # Not among the default conditions.
  ev.conditions = ("pool", "no_answer")
  assert evaluate.config_no_answer(ev).conditions == Critic(seed=0).no_answer_verdicts(ev.kind)
  ev.feedback = ""
  assert evaluate.config_no_answer(ev) is None


def test_standalone_driver_refuses_splits_it_cannot_draw(tmp_path):
  from fcp_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fcp_jax import evaluate as evaluate_driver  # pylint: disable=g-import-not-at-top
  cfg = config_lib.load_config("configs/arith_fcp.py:runlocal,stage=eval")
  config_lib.apply_overrides(cfg, ["eval.splits=('validation',)", "init_from=/nowhere"])
  with pytest.raises(ValueError, match=r"eval.splits=\('validation',\).*test prompts"):
    evaluate_driver.run(cfg, str(tmp_path))

"""Tests for the rule-based critic: verdicts, score bands, named steps, style rules."""

import random
import re

import pytest

from fcp_jax.data import answers
from fcp_jax.data import tasks
from fcp_jax.data.tasks import TASKS, Example
from fcp_jax.feedback import critic as critic_lib
from fcp_jax.feedback.base import FEEDBACK_ENVS, Feedback, Query

EX = Example(uid="sum-1", question="What is 3 + 4 + 5?", answer="12",
             steps=answers.evaluate("3+4+5")[1], task="chain_sum")
TASK_SYMBOLS = re.compile(r"[\d+\-*/=×÷#<>()$%]")
TASK_WORDS = {"answer", "sum", "step", "steps", "number", "total", "calculate",
              "calculation", "arithmetic", "problem", "result", "final", "add", "legs",
              "multiplication", "equation", "math"}


@pytest.fixture(scope="module")
def env():
  return FEEDBACK_ENVS.build("critic(noise=0.0, seed=0)")


def _band(score):
  return "high" if score >= 8 else "low" if score <= 4 else "mid"


# response, correct, band, what the critique must name.
CASES = {
    "correct": ("3+4=7\n7+5=12\n#### 12", True, "high", ["12"]),
    "arithmetic_slip": ("3+4=7\n7+5=13\n#### 13", False, "low", ["line 2", "7+5=13", "12"]),
    "skipped_step": ("3+4=7\n#### 13", False, "low", ["7+5=12"]),
    "no_final_answer": ("3+4=7\n7+5=", False, "low", ["7+5=12"]),
    "missing_marker": ("3+4=7\n7+5=12", True, "mid", ["####"]),
    "verbose": ("Let me think about this very carefully, one piece at a time. " * 3
                + "3+4=7\n7+5=12\n#### 12", True, "mid", ["characters"]),
    "correct_but_skips": ("#### 12", True, "mid", ["3+4=7"]),
    "empty": ("", False, "low", ["final answer", "3+4=7"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_written_responses(env, name):
  response, correct, band, named = CASES[name]
  (fb,) = env.feedback([(EX, response)])
  assert fb.correct is correct and fb.ok
  assert _band(fb.score) == band, (fb.score, fb)
  for word in named:
    assert word.lower() in fb.critique.lower(), fb.critique
  assert fb.user and fb.reviewer and fb.critique


def test_exact_scores_and_analysis(env):
  scores = {name: env.one(EX, CASES[name][0]).score for name in CASES}
  assert scores["correct"] == 10 and scores["missing_marker"] == 7
  assert scores["empty"] == 0 and scores["arithmetic_slip"] < scores["skipped_step"]
  # A bare wrong guess never outscores a worked wrong attempt.
  assert env.one(EX, "#### 13").score < scores["arithmetic_slip"]
  a = env.analyze(EX, CASES["arithmetic_slip"][0])
  assert a.wrong_claim.text == "7+5=13" and a.wrong_claim.line == 2
  assert env.analyze(EX, CASES["skipped_step"][0]).missing.text == "7+5=12"
  assert env.analyze(EX, CASES["verbose"][0]).verbose
  assert not env.analyze(EX, CASES["correct"][0]).verbose


def test_gsm8k_slip_names_the_step(env):
  ex = TASKS.build("gsm8k", split="train", size=None)[0]  # 48/2=24, 48+24=72.
  slip = "In May she sold 48/2 = 24 clips.\nAltogether 48 + 24 = 82 clips.\n#### 82"
  fb = env.one(ex, slip)
  assert not fb.correct and fb.score <= 4 and "48+24=82" in fb.critique
  good = "In May she sold 48/2 = 24 clips.\nAltogether 48 + 24 = 72 clips.\n#### 72"
  assert env.one(ex, good).score >= 8


def _responses(ex, rng):
  ref = tasks.reference_response(ex)
  wrong = str(int(ex.answer) + rng.choice([-2, -1, 1, 3]))
  return [ref, ref.replace(f"#### {ex.answer}", f"#### {wrong}"),
          ref.rsplit("\n", 1)[0], f"#### {ex.answer}", ""]


def test_styles_and_variety_over_1000_seeded_examples(env):
  examples = TASKS.build("chain_sum(min_terms=2, max_terms=4, max_digits=2)",
                         split="train", size=200, seed=0)
  rng = random.Random(0)
  queries = [Query(ex, r) for ex in examples for r in _responses(ex, rng)]
  assert len(queries) == 1000
  feedback = env.feedback(queries)
  reviewers = {fb.reviewer for fb in feedback}
  assert len(reviewers) >= 50
  assert len({fb.user for fb in feedback}) >= 20
  for q, fb in zip(queries, feedback):
    assert not TASK_SYMBOLS.search(fb.user), fb.user
    words = set(re.findall(r"[a-z]+", fb.user.lower()))
    question_words = set(re.findall(r"[a-z]{4,}", q.example.question.lower()))
    assert not words & (TASK_WORDS | question_words), fb.user
    assert not re.search(r"\d|line|step", fb.reviewer.lower()), fb.reviewer
    assert fb.correct == answers.check_answer(q.example, q.response)


def test_same_query_same_feedback_and_seed_changes_wording(env):
  a = env.one(EX, CASES["correct"][0])
  assert env.one(EX, CASES["correct"][0]) == a
  others = [critic_lib.Critic(seed=s).one(EX, CASES["correct"][0]) for s in range(1, 8)]
  assert any(o.reviewer != a.reviewer for o in others)
  assert all(o.score == a.score for o in others)


def test_noise_blurs_or_flips_but_keeps_truth():
  noisy = critic_lib.Critic(noise=1.0, seed=0)
  clean = critic_lib.Critic(noise=0.0, seed=0)
  right, wrong = CASES["correct"][0], CASES["arithmetic_slip"][0]
  examples = [Example(uid=f"u{i}", question="q", answer="12", steps=EX.steps)
              for i in range(40)]
  for ex in examples:
    for response in (right, wrong):
      fb, truth = noisy.one(ex, response), clean.one(ex, response)
      assert fb.correct == truth.correct and fb != truth
      assert not TASK_SYMBOLS.search(fb.user) and not re.search(r"\d", fb.reviewer)
      assert fb.score == 5 or (fb.score >= 8) != (truth.score >= 8)
  some = critic_lib.Critic(noise=0.3, seed=0)
  changed = sum(some.one(ex, right) != clean.one(ex, right) for ex in examples)
  assert 3 <= changed <= 25
  with pytest.raises(ValueError):
    critic_lib.Critic(noise=1.5)


def test_config_key_and_requirements(env):
  assert env.config_key() != critic_lib.Critic(noise=0.1).config_key()
  with pytest.raises(ValueError, match="reference answer"):
    env.one(Example(uid="x", question="Tell me a joke"), "ha")
  with pytest.raises(TypeError, match="Example"):
    env.feedback([("not an example", "x")])


def test_feedback_record():
  fb = Feedback(user="u", reviewer="r", critique="c", score=7, correct=True)
  assert [fb.condition(k) for k in ("user", "reviewer", "critique")] == ["u", "r", "c"]
  with pytest.raises(KeyError, match="reviewer"):
    fb.condition("analysis")
  with pytest.raises(ValueError):
    Feedback(user="", reviewer="", critique="", score=11, correct=False)
  assert Feedback.from_dict(fb.to_dict()) == fb


def test_no_answer_verdicts_lists_exactly_what_the_critic_writes_without_answer(env):
  reviewer = env.no_answer_verdicts("reviewer")
  assert len(reviewer) == len(set(reviewer)) == 4 * 4 * 3 * 3
  user, critique = env.no_answer_verdicts("user"), env.no_answer_verdicts("critique")
  seen = set()
  for i in range(300):  # Responses with no final answer: score 0, texts from the lists.
    ex = Example(uid=f"u{i}", question=f"{i}+1=?", answer=str(i + 1),
                 steps=answers.evaluate(f"{i}+1")[1], task="chain_sum")
    fb = env.one(ex, random.Random(i).choice(["", "hmm", "let me see", "no idea"]))
    assert fb.score == 0 and fb.reviewer in reviewer and fb.user in user
    assert any(fb.critique.startswith(c[:-1]) for c in critique), fb.critique
    seen.add(fb.reviewer)
  assert len(seen) > 60  # The critic's seeded draws cover much of the list.
  # Nothing question-specific: no digit, no task symbol.
  assert not any(TASK_SYMBOLS.search(t) for t in reviewer + user + critique)
  # A wrong but answered response gets none of them.
  assert env.one(EX, "#### 13").reviewer not in reviewer
  with pytest.raises(KeyError, match="kind"):
    env.no_answer_verdicts("score")


def test_critique_without_numbers_names_the_fault_but_leaks_no_value(env):
  plain = critic_lib.Critic(seed=0, critique_numbers=False)
  assert plain.config_key() != env.config_key()
  assert "critique_numbers=False" in plain.config_key()
  queries = [Query(EX, case[0]) for case in CASES.values()]
  for q, a, b in zip(queries, env.feedback(queries), plain.feedback(queries)):
    assert not re.search(r"\d", b.critique), b.critique
    assert b.critique == critic_lib.NUMBER.sub("N", a.critique)
    assert (b.user, b.reviewer, b.score, b.correct) == (a.user, a.reviewer, a.score,
                                                         a.correct)
  slip = plain.one(EX, CASES["arithmetic_slip"][0])
  assert "line N" in slip.critique and "N+N=N" in slip.critique

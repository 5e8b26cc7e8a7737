"""Tests for the JSONL feedback cache and the positive-condition pool."""

import json
import logging
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from fcp_jax.data import answers
from fcp_jax.data.tasks import Example
from fcp_jax.feedback.base import Feedback, failed_feedback
from fcp_jax.feedback.cache import CachedFeedbackEnv, make_env
from fcp_jax.feedback.critic import Critic
from fcp_jax.feedback.pool import ConditionPool, EmptyPoolError

EXAMPLES = [Example(uid=f"u{i}", question=f"What is {i} + 5?", answer=str(i + 5),
                    steps=answers.evaluate(f"{i}+5")[1]) for i in range(6)]


class CountingEnv:
  """Wraps the critic, counting the queries it is asked; can fail on demand."""

  def __init__(self, fail=False):
    self.critic, self.asked, self.fail = Critic(seed=1), [], fail

  def config_key(self):
    return self.critic.config_key()

  def feedback(self, batch):
    self.asked.extend(r for _, r in batch)
    if self.fail:
      return [failed_feedback(False) for _ in batch]
    return self.critic.feedback(batch)


def _queries():
  return [(e, f"{i}+5={i + 5}\n#### {i + 5}") for i, e in enumerate(EXAMPLES)]


def test_cache_hits_misses_and_resume(tmp_path):
  path = str(tmp_path / "feedback_cache.jsonl")
  env = CountingEnv()
  cached = CachedFeedbackEnv(env, path)
  queries = _queries()
  first = cached.feedback(queries[:4] + queries[:2])  # Duplicates asked once.
  assert len(env.asked) == 4 and (cached.hits, cached.misses) == (2, 4)
  assert first[4] == first[0]
  assert first == env.critic.feedback(queries[:4] + queries[:2])
  assert sum(1 for _ in open(path)) == 4
  # A re-run (new process) never asks again for what is stored.
  env2 = CountingEnv()
  resumed = CachedFeedbackEnv(env2, path)
  assert len(resumed) == 4
  again = resumed.feedback(queries)
  assert env2.asked == [queries[4][1], queries[5][1]]
  assert again[:4] == first[:4] and (resumed.hits, resumed.misses) == (4, 2)
  record = json.loads(open(path).readlines()[-1])
  assert record["uid"] == "u5" and record["config_key"] == env.config_key()
  # Another env configuration is another key.
  other = CachedFeedbackEnv(Critic(seed=2), path)
  other.feedback(queries[:1])
  assert other.misses == 1


def test_make_env_builds_registered_envs(tmp_path):
  path = str(tmp_path / "c.jsonl")
  env = make_env("critic(noise=0.0, seed=1)", path)
  assert isinstance(env, CachedFeedbackEnv) and env.config_key() == Critic(seed=1).config_key()
  assert env.feedback(_queries()[:1]) == Critic(seed=1).feedback(_queries()[:1])
  assert isinstance(make_env("critic"), Critic)
  with pytest.raises(KeyError, match="llm_judge"):
    make_env("judge")


def test_half_written_last_line_is_dropped_not_fatal(tmp_path, caplog):
  path = str(tmp_path / "cache.jsonl")
  CachedFeedbackEnv(CountingEnv(), path).feedback(_queries()[:3])
  with open(path, "a") as f:
    f.write('{"key": "abc", "feedback": {"user": "hal')  # Killed mid-write.
  caplog.set_level(logging.WARNING)
  env = CountingEnv()
  cached = CachedFeedbackEnv(env, path)
  assert len(cached) == 3 and cached.bad_lines == 1
  assert "half-written" in caplog.text
  cached.feedback(_queries()[:4])
  assert len(env.asked) == 1
  lines = open(path).read().splitlines()
  assert len(lines) == 4 and all(json.loads(line) for line in lines)


def test_corrupt_middle_line_and_missing_newline(tmp_path, caplog):
  path = str(tmp_path / "cache.jsonl")
  CachedFeedbackEnv(CountingEnv(), path).feedback(_queries()[:2])
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write(lines[0] + "\nnot json\n" + lines[1])  # Complete last record, no newline.
  caplog.set_level(logging.WARNING)
  cached = CachedFeedbackEnv(CountingEnv(), path)
  assert len(cached) == 2 and cached.bad_lines == 1 and "corrupt" in caplog.text
  cached.feedback(_queries()[2:3])
  assert len(CachedFeedbackEnv(CountingEnv(), path)) == 3


def test_failures_are_not_cached_by_default(tmp_path):
  path = str(tmp_path / "cache.jsonl")
  failing = CachedFeedbackEnv(CountingEnv(fail=True), path)
  out = failing.feedback(_queries()[:2] + _queries()[:1])
  assert not out[0].ok and (failing.misses, failing.hits, failing.failures) == (2, 1, 3)
  assert not os.path.exists(path) or not open(path).read()
  env = CountingEnv()
  CachedFeedbackEnv(env, path).feedback(_queries()[:2])
  assert len(env.asked) == 2  # Retried on resume.
  kept = CachedFeedbackEnv(CountingEnv(fail=True), str(tmp_path / "c2.jsonl"),
                           cache_failures=True)
  kept.feedback(_queries()[:1])
  assert len(CachedFeedbackEnv(CountingEnv(), str(tmp_path / "c2.jsonl"))) == 1


class StreamingEnv(CountingEnv):
  """Answers through ``feedback_stream``, last query first, noting the cache's length.

  ``fail_uids`` get ``ok=False``; the stream dies (as a killed process would) before
  answering ``die_at`` (a uid).
  """

  def __init__(self, path, fail_uids=(), die_at=None):
    super().__init__()
    self.path, self.fail_uids, self.die_at, self.lines_seen = path, fail_uids, die_at, []

  def feedback(self, batch):
    raise AssertionError("a streaming env is asked through feedback_stream")

  def feedback_stream(self, batch):
    answers = self.critic.feedback(batch)
    for i in reversed(range(len(batch))):
      self.lines_seen.append(sum(1 for _ in open(self.path)) if os.path.exists(self.path)
                             else 0)
      if batch[i][0].uid == self.die_at:
        raise KeyboardInterrupt("killed mid-batch")
      self.asked.append(batch[i][1])
      yield i, failed_feedback(False) if batch[i][0].uid in self.fail_uids else answers[i]


def test_streamed_answers_are_appended_as_they_arrive(tmp_path):
  path = str(tmp_path / "cache.jsonl")
  queries = _queries()
  env = StreamingEnv(path, fail_uids=("u1",))
  cached = CachedFeedbackEnv(env, path)
  out = cached.feedback(queries[:4] + queries[3:4])
  # Each ok answer was on disk before the next one was awaited (u1 failed: not stored).
  assert env.lines_seen == [0, 1, 2, 2]
  assert out[:4] == [Critic(seed=1).feedback(queries[:1])[0], failed_feedback(False),
                     *Critic(seed=1).feedback(queries[2:4])] and out[4] == out[3]
  assert (cached.misses, cached.hits, cached.failures) == (4, 1, 1)
  assert [json.loads(line)["uid"] for line in open(path)] == ["u3", "u2", "u0"]
  # A stream that dies mid-batch keeps every answer that arrived before.
  dying = StreamingEnv(path, die_at="u4")
  with pytest.raises(KeyboardInterrupt):
    CachedFeedbackEnv(dying, path).feedback(queries)
  assert dying.asked == [queries[5][1]] and sum(1 for _ in open(path)) == 4
  again = StreamingEnv(path)
  resumed = CachedFeedbackEnv(again, path)
  resumed.feedback(queries)
  assert sorted(again.asked) == sorted([queries[1][1], queries[4][1]])
  assert (resumed.hits, resumed.misses, resumed.failures) == (4, 2, 0)


def test_bad_streams_are_clear_errors(tmp_path):
  class Repeats(StreamingEnv):
    def feedback_stream(self, batch):
      yield 0, Critic().feedback(batch[:1])[0]
      yield 0, Critic().feedback(batch[:1])[0]

  path = str(tmp_path / "c.jsonl")
  with pytest.raises(RuntimeError, match="Repeats streamed a bad or repeated index 0"):
    CachedFeedbackEnv(Repeats(path), path).feedback(_queries()[:2])

  class Short(StreamingEnv):
    def feedback_stream(self, batch):
      yield 1, Critic().feedback(batch[1:2])[0]

  with pytest.raises(RuntimeError, match="Short streamed 1 answers for 2 queries"):
    CachedFeedbackEnv(Short(path), path).feedback(_queries()[2:4])


def _fb(reviewer, score, correct=True, user="fine"):
  return Feedback(user=user, reviewer=reviewer, critique="c", score=score, correct=correct)


RECORDS = [
    _fb("Correct and clear; rigorous.", 10),
    _fb("correct  and CLEAR; rigorous.", 9),  # Duplicate up to case and spacing.
    _fb("Accurate and concise; neat.", 10),  # Length-related.
    _fb("Right but verbose.", 8),  # Length-related.
    _fb("Sound and methodical.", 8),
    _fb("Incorrect and careless.", 2, correct=False),  # Below threshold.
    _fb("Lucky guess, well presented.", 9, correct=False),
    Feedback(user="", reviewer="", critique="", score=9, correct=True),  # Empty.
]


def test_pool_filters_and_counts():
  pool = ConditionPool.build(RECORDS, min_score=8)
  assert pool.conditions == ("Correct and clear; rigorous.", "Sound and methodical.",
                             "Lucky guess, well presented.")
  assert pool.stats == dict(records=8, below_threshold=1, above_threshold=0, incorrect=0,
                            correct=0, empty=1, excluded=2, duplicates=1)
  strict = ConditionPool.build(RECORDS, min_score=8, require_correct=True)
  assert "Lucky guess, well presented." not in strict.conditions
  lenient = ConditionPool.build(RECORDS, min_score=8, exclude=())
  assert "Accurate and concise; neat." in lenient.conditions
  users = ConditionPool.build(RECORDS, kind="user")
  assert users.conditions == ("fine",)
  with pytest.raises(EmptyPoolError, match="empty"):
    ConditionPool.build(RECORDS, min_score=11)


def test_negative_pool_mirrors_the_positive_one():
  """The worst verdicts: score <= max_score and, with require_incorrect, wrong only."""
  worst = ConditionPool.build(RECORDS, min_score=0, max_score=2, require_incorrect=True)
  assert worst.conditions == ("Incorrect and careless.",)
  assert worst.stats["above_threshold"] == 7 and worst.settings["max_score"] == 2
  wrong = ConditionPool.build(RECORDS, min_score=0, require_incorrect=True)
  assert wrong.conditions == ("Incorrect and careless.", "Lucky guess, well presented.")
  assert wrong.stats["correct"] == 6  # The empty text is correct too.
  with pytest.raises(ValueError, match="exclude each other"):
    ConditionPool.build(RECORDS, require_correct=True, require_incorrect=True)


def test_pool_save_load_and_sample(tmp_path):
  pool = ConditionPool.build(RECORDS)
  path = pool.save(str(tmp_path / "pool" / "c_plus.json"))
  loaded = ConditionPool.load(path)
  assert loaded.conditions == pool.conditions and loaded.stats == pool.stats
  assert loaded.settings["min_score"] == 8
  draws = [loaded.sample(np.random.default_rng(s)) for s in range(60)]
  assert set(draws) == set(pool.conditions)
  assert loaded.sample(random.Random(3)) == loaded.sample(random.Random(3))
  assert loaded.sample(5) == loaded.sample(5)
  with pytest.raises(TypeError):
    loaded.sample("seed")
  (tmp_path / "bad.json").write_text('{"conditions": [1, 2]}')
  with pytest.raises(ValueError, match="bad.json"):
    ConditionPool.load(str(tmp_path / "bad.json"))


def test_processes_sharing_a_cache_never_interleave_or_lose_lines(tmp_path):
  """Two processes append to one cache at once; each record reads back whole."""
  path = str(tmp_path / "cache.jsonl")
  script = (
      "import sys\n"
      "from fcp_jax.feedback.cache import CachedFeedbackEnv\n"
      "from fcp_jax.feedback.critic import Critic\n"
      "from fcp_jax.data import tasks\n"
      "env = CachedFeedbackEnv(Critic(seed=0), sys.argv[1])\n"
      "ex = tasks.Example(uid='u', question='1+2=?', answer='3')\n"
      "for i in range(200):\n"
      "  if i % 20 == 0:  # Loads while the other process appends.\n"
      "    env = CachedFeedbackEnv(Critic(seed=0), sys.argv[1])\n"
      "  env.feedback([(ex, sys.argv[2] + str(i) + 'x' * 300)])\n")
  procs = [subprocess.Popen([sys.executable, "-c", script, path, tag])
           for tag in ("a", "b")]
  assert all(p.wait(timeout=120) == 0 for p in procs)
  env = CachedFeedbackEnv(Critic(seed=0), path)
  assert len(env) == 400 and env.bad_lines == 0

"""A JSONL cache around any feedback env, so a resumed run never asks twice.

``CachedFeedbackEnv(env, path)`` keys each query by the sha256 of (question, response,
``env.config_key()``). At start it loads every complete record of ``path``; for each
batch it answers hits from memory, asks ``env`` once per distinct miss, and appends one
JSON line per new record (flushed and fsync'ed before ``feedback`` returns).

Crash tolerance: a half-written last line (the process died mid-write) is dropped with a
warning and cut from the file, so the next append starts on a clean line; a corrupt line
elsewhere is skipped with a warning. Complete records are never lost.

Failed answers (``Feedback.ok`` False, e.g. an unreachable judge) are returned but not
stored unless ``cache_failures=True``, so a resumed run retries them.

``make_env("critic(noise=0.1)", "workdir/feedback_cache.jsonl")`` builds a registered
env (importing this module registers the critic and the LLM judge) and wraps it.
"""

import hashlib
import json
import os
import threading
from typing import Dict, List, Optional, Sequence

from absl import logging

from fcp_jax.feedback import critic as _critic  # pylint: disable=unused-import
from fcp_jax.feedback import llm_judge as _llm_judge  # pylint: disable=unused-import
from fcp_jax.feedback.base import FEEDBACK_ENVS, Feedback, QueryLike, as_queries


class CachedFeedbackEnv:
  """Wraps a ``FeedbackEnv``; same interface, plus ``hits``/``misses`` counters."""

  def __init__(self, env, path: str, *, cache_failures: bool = False):
    self.env = env
    self.path = path
    self.cache_failures = cache_failures
    self.hits = 0
    self.misses = 0
    self.bad_lines = 0
    self._config_key = env.config_key()
    self._store: Dict[str, Feedback] = {}
    self._lock = threading.Lock()
    self._load()

  def config_key(self) -> str:
    return self._config_key

  def key(self, question: str, response: str) -> str:
    payload = json.dumps([question, response, self._config_key], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()

  def __len__(self) -> int:
    return len(self._store)

  def __contains__(self, key: str) -> bool:
    return key in self._store

  def _parse(self, line: bytes) -> bool:
    try:
      record = json.loads(line.decode("utf-8"))
      self._store[record["key"]] = Feedback.from_dict(record["feedback"])
      return True
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
      return False

  def _load(self):
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      data = f.read()
    lines = data.split(b"\n")
    tail = lines.pop()  # Bytes after the last newline: empty unless cut mid-write.
    for i, line in enumerate(lines, start=1):
      if line.strip() and not self._parse(line):
        self.bad_lines += 1
        logging.warning("Feedback cache %s:%d: corrupt line skipped.", self.path, i)
    if tail.strip():
      if self._parse(tail):  # Complete record lacking its newline: add it.
        with open(self.path, "ab") as f:
          f.write(b"\n")
      else:
        self.bad_lines += 1
        logging.warning("Feedback cache %s:%d: half-written last line (%d bytes) dropped.",
                        self.path, len(lines) + 1, len(tail))
        os.truncate(self.path, len(data) - len(tail))
    logging.info("Feedback cache %s: %d records loaded.", self.path, len(self._store))

  def _append(self, records: List[dict]):
    if not records:
      return
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    queries = as_queries(batch)
    keys = [self.key(q.example.question, q.response) for q in queries]
    with self._lock:
      todo = {}  # key -> first query index, in order.
      for i, k in enumerate(keys):
        if k not in self._store and k not in todo:
          todo[k] = i
      self.misses += len(todo)
      self.hits += len(keys) - len(todo)
      fresh = {}
      if todo:
        answers = self.env.feedback([queries[i] for i in todo.values()])
        if len(answers) != len(todo):
          raise RuntimeError(f"Feedback env returned {len(answers)} answers for "
                             f"{len(todo)} queries.")
        new_records = []
        for (k, i), fb in zip(todo.items(), answers):
          fresh[k] = fb
          if fb.ok or self.cache_failures:
            self._store[k] = fb
            q = queries[i]
            new_records.append({"key": k, "uid": q.example.uid,
                                "question": q.example.question, "response": q.response,
                                "config_key": self._config_key,
                                "feedback": fb.to_dict()})
        self._append(new_records)
      return [fresh[k] if k in fresh else self._store[k] for k in keys]


def make_env(spec: str, cache_path: Optional[str] = None, **kwargs):
  """Builds the feedback env named by ``spec``, cached in ``cache_path`` when given."""
  env = FEEDBACK_ENVS.build(spec)
  return CachedFeedbackEnv(env, cache_path, **kwargs) if cache_path else env

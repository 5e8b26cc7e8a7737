"""A JSONL cache around any feedback env, so a resumed run never asks twice.

``CachedFeedbackEnv(env, path)`` keys each query by the sha256 of (question, response,
``env.config_key()``). At start it loads every complete record of ``path``; for each
batch it answers hits from memory, asks ``env`` once per distinct miss, and appends one
JSON line per new record.

When records are appended: an env with ``feedback_stream(batch)`` (the LLM judge, which
yields ``(index, Feedback)`` as each answer arrives) has each answer written, flushed
and fsync'ed on arrival, before the next one is awaited, so a run killed mid-batch keeps
every answer already paid for. Other envs (the rule-based critic, instant) are asked
with ``feedback(batch)``; their records are written, flushed and fsync'ed together
before ``feedback`` returns.

Crash tolerance: a half-written last line (the process died mid-write) is dropped with a
warning and cut from the file, so the next append starts on a clean line; a corrupt line
elsewhere is skipped with a warning. Complete records are never lost. Loads and appends
hold an exclusive ``flock`` on the file, so processes sharing one cache (parallel sweep
arms) never read another's line half-written or interleave their lines.

Failed answers (``Feedback.ok`` False, e.g. an unreachable judge or an unusable reply)
are returned but not stored unless ``cache_failures=True``, so a resumed run retries
them. Counters: ``hits`` and ``misses`` (queries answered from the cache / asked of
``env``; duplicates within a batch are asked once) and ``failures`` (``ok=False``
results returned).

``make_env("critic(noise=0.1)", "workdir/feedback_cache.jsonl")`` builds a registered
env (importing this module registers the critic and the LLM judge) and wraps it.

On several processes, ``PrimaryFeedbackEnv`` lets process 0 alone ask the cached env
and append to the cache; the other processes receive its answers.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax

from fcp_jax import distributed

from fcp_jax.feedback import critic as _critic  # pylint: disable=unused-import
from fcp_jax.feedback import llm_judge as _llm_judge  # pylint: disable=unused-import
from fcp_jax.feedback.base import (FEEDBACK_ENVS, Feedback, Query, QueryLike,
                                   as_queries)


@contextlib.contextmanager
def _locked(f):
  """An exclusive ``flock`` on open file ``f`` for the block."""
  fcntl.flock(f.fileno(), fcntl.LOCK_EX)
  try:
    yield
  finally:
    fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class CachedFeedbackEnv:
  """Wraps a ``FeedbackEnv``; same interface, plus ``hits``/``misses``/``failures``."""

  def __init__(self, env, path: str, *, cache_failures: bool = False):
    self.env = env
    self.path = path
    self.cache_failures = cache_failures
    self.hits = 0
    self.misses = 0
    self.failures = 0
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
    with open(self.path, "rb") as f, _locked(f):  # No other process mid-append.
      self._load_locked(f.read())
    logging.info("Feedback cache %s: %d records loaded.", self.path, len(self._store))

  def _load_locked(self, data: bytes):
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

  def _open_append(self):
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    return open(self.path, "a", encoding="utf-8")

  @staticmethod
  def _write(f, records: List[dict]):
    """Appends ``records``, one JSON line each, and makes them durable (flush + fsync);
    under the file's lock, so processes sharing the cache never interleave lines."""
    with _locked(f):
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
      f.flush()
      os.fsync(f.fileno())

  def _append(self, records: List[dict]):
    if records:
      with self._open_append() as f:
        self._write(f, records)

  def _record(self, key: str, query: Query, fb: Feedback) -> Optional[dict]:
    """Stores ``fb`` under ``key`` and returns its JSONL record, or None if not kept."""
    if not isinstance(fb, Feedback):
      raise TypeError(f"Feedback env {type(self.env).__name__} returned "
                      f"{type(fb).__name__}, not Feedback, for {query.example.uid}.")
    if not (fb.ok or self.cache_failures):
      return None
    self._store[key] = fb
    return {"key": key, "uid": query.example.uid, "question": query.example.question,
            "response": query.response, "config_key": self._config_key,
            "feedback": fb.to_dict()}

  def _ask_batch(self, todo: List[Tuple[str, Query]]) -> Dict[str, Feedback]:
    asked = [q for _, q in todo]
    name = type(self.env).__name__
    stream = getattr(self.env, "feedback_stream", None)
    fresh: Dict[str, Feedback] = {}
    if stream is None:
      answers = self.env.feedback(asked)
      if len(answers) != len(todo):
        raise RuntimeError(f"Feedback env {name} returned {len(answers)} answers for "
                           f"{len(todo)} queries.")
      records = [self._record(k, q, fb) for (k, q), fb in zip(todo, answers)]
      fresh = {k: fb for (k, _), fb in zip(todo, answers)}
      self._append([r for r in records if r is not None])
      return fresh
    with self._open_append() as f:
      for j, fb in stream(asked):
        if not (isinstance(j, int) and 0 <= j < len(todo)) or todo[j][0] in fresh:
          raise RuntimeError(f"Feedback env {name} streamed a bad or repeated index "
                             f"{j!r} for a batch of {len(todo)}.")
        key, query = todo[j]
        fresh[key] = fb
        record = self._record(key, query, fb)
        if record is not None:
          self._write(f, [record])  # On arrival: nothing paid for is lost.
    if len(fresh) != len(todo):
      raise RuntimeError(f"Feedback env {name} streamed {len(fresh)} answers for "
                         f"{len(todo)} queries.")
    return fresh

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    """One ``Feedback`` per query, in order: hits from the cache, misses asked of ``env``.

    New ``ok`` answers are appended to ``path`` as they arrive (see the module doc);
    failed ones (``ok=False``) are returned, counted in ``failures``, and not stored.
    """
    queries = as_queries(batch)
    keys = [self.key(q.example.question, q.response) for q in queries]
    with self._lock:
      todo: Dict[str, Query] = {}  # key -> first query with it, in order.
      for k, q in zip(keys, queries):
        if k not in self._store and k not in todo:
          todo[k] = q
      self.misses += len(todo)
      self.hits += len(keys) - len(todo)
      fresh = self._ask_batch(list(todo.items())) if todo else {}
      out = [fresh[k] if k in fresh else self._store[k] for k in keys]
      self.failures += sum(not fb.ok for fb in out)
      return out


def make_env(spec: str, cache_path: Optional[str] = None, **kwargs):
  """Builds the feedback env named by ``spec``, cached in ``cache_path`` when given."""
  env = FEEDBACK_ENVS.build(spec)
  return CachedFeedbackEnv(env, cache_path, **kwargs) if cache_path else env


class PrimaryFeedbackEnv:
  """A feedback env asked by process 0 only; every process gets its answers.

  Process 0 asks ``cached`` (the env behind its JSONL cache), so each question is asked
  once and one process appends to the cache; the others hold only the bare ``env``
  (for ``config_key`` and the like) and receive the answers. An error on process 0 is
  raised on every process. ``hits``, ``misses`` and ``failures`` are process 0's.
  """

  def __init__(self, env, make_cached):
    self.local = make_cached(env) if distributed.is_primary() else env
    self.hits = self.misses = self.failures = 0

  def config_key(self) -> str:
    return self.local.config_key()

  def __getattr__(self, name):  # no_answer_verdicts, the wrapped env, ...
    if name == "local":
      raise AttributeError(name)
    return getattr(self.local, name)

  def __len__(self) -> int:
    return len(self.local) if distributed.is_primary() else 0

  def feedback(self, batch: Sequence[QueryLike]
               ) -> List[Feedback]:
    if jax.process_count() == 1:
      out = self.local.feedback(batch)
      self._count()
      return out
    reply: Dict[str, Any] = {}
    if distributed.is_primary():
      try:
        reply["feedback"] = [fb.to_dict() for fb in self.local.feedback(batch)]
      except Exception as e:  # pylint: disable=broad-exception-caught
        distributed.broadcast_json(dict(error=f"{type(e).__name__}: {e}"))
        raise
      self._count()
      reply["counts"] = [self.hits, self.misses, self.failures]
    shared = distributed.broadcast_json(reply)
    if "error" in shared:
      raise RuntimeError(f"The feedback env failed on process 0: {shared['error']}")
    self.hits, self.misses, self.failures = shared["counts"]
    return [Feedback.from_dict(d) for d in shared["feedback"]]

  def _count(self):
    self.hits = getattr(self.local, "hits", 0)
    self.misses = getattr(self.local, "misses", 0)
    self.failures = getattr(self.local, "failures", 0)

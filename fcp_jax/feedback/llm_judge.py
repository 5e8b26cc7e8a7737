"""An LLM judge over an OpenAI-compatible chat-completions HTTP API (stdlib only).

One request per (example, response) asks for the published feedback sections
(``docs/fcp_method.md`` §2; the prompt wording below is ours)::

    ### User-style feedback: ...
    ### Analysis along several dimensions: ...
    ### High-level summary: ...
    ### Score (0-10): ...

They map to ``Feedback(user=..., critique=<analysis>, reviewer=<summary>, score=...)``;
``correct`` comes from the task checker (``tasks.check_answer``) when the example has a
reference answer, else from ``score >= correct_threshold``.

Robustness: headers are found whatever their case, spacing, markdown (``**``, ``#``,
numbering) or hyphenation; each request has a timeout; a transient failure (network
error, timeout, HTTP 408/409/429/5xx, malformed or unparsable reply) is retried up to
``max_attempts`` attempts in all with exponential backoff; requests run on a bounded
thread pool (``concurrency``). A query that still fails gets ``failed_feedback``
(empty texts, score 5, ``ok=False``) and is counted (``requests``, ``retries``,
``failures``); a batch whose failure rate exceeds ``max_failure_rate`` raises
``JudgeError``. The API key is read from the environment variable ``api_key_env`` and
never appears in logs, reprs or exception messages.
"""

import concurrent.futures
import hashlib
import json
import os
import http.client
import re
import threading
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional, Sequence

from absl import logging

from fcp_jax.data import tasks
from fcp_jax.feedback.base import (FEEDBACK_ENVS, Feedback, Query, QueryLike, as_queries,
                                   failed_feedback)

PROMPT_TEMPLATE = """\
You are reviewing a model's answer to a problem. You are given the problem, the model's \
answer and a reference final answer, which is to be used only to check correctness.

## Problem
{question}

## Model answer
{response}

## Reference final answer (only for checking correctness)
{reference}

Write three kinds of feedback on the model answer.

1. User-style feedback: 1-3 short, colloquial, first-person sentences such as a real \
user might say after reading the answer. Express only subjective sentiment: how \
helpful it felt, how confident, confused or satisfied you are. Do not mention or quote \
any symbol, number, formula or concept from the problem or the answer. For example: \
"Thanks, that makes sense to me." / "I'm confused, this doesn't look right." / "Not \
sure I can trust this." / "Great, exactly what I needed!"

2. Professional-reviewer feedback. First analyse the answer along several dimensions: \
correctness (compare only the final result with the reference final answer), then \
logical rigor, completeness and clarity (judged on the answer itself). Then write a \
high-level summary of 1-3 sentences made only of adjectives and adverbs. The summary \
must not say where the answer goes wrong or how to improve it. For example: "Correct \
and clear; rigorous and well organized." / "Incorrect and careless; hasty and \
incomplete." / "Correct final result but unclear and disorganized reasoning."

3. An overall integer score from 0 (worst) to 10 (best).

Write in English only. Never mention the words "reference" or "python snippet" in your \
feedback.

Reply in exactly this format:
### User-style feedback: <your text>
### Analysis along several dimensions: <your text>
### High-level summary: <your text>
### Score (0-10): <integer>
"""

# Section name -> header regex (matched case-insensitively at the start of a line).
SECTIONS = {
    "user": r"user[\s_-]*style\s+feedback",
    "analysis": r"analysis(?:\s+along\s+(?:several|multiple)\s+dimensions)?",
    "summary": r"high[\s_-]*level\s+summary",
    "score": r"(?:overall\s+)?score(?:\s*\(\s*0\s*[-–~to ]+\s*10\s*\))?",
}
_HEADER_RE = re.compile(
    r"^[ \t>#*_]*(?:\d+[.)][ \t]*)?[*_]*(?P<name>" + "|".join(
        f"(?P<{k}>{v})" for k, v in SECTIONS.items()) + r")[ \t*_]*(?:[:：]|$)[ \t*_]*",
    re.IGNORECASE | re.MULTILINE)
_RETRY_STATUS = frozenset({408, 409, 429})


class JudgeError(RuntimeError):
  """The judge failed on too many queries of a batch (or is misconfigured)."""


class ParseError(ValueError):
  """A judge reply lacks required sections or a usable score."""


def build_prompt(question: str, response: str, reference: Optional[str]) -> str:
  return PROMPT_TEMPLATE.format(question=question, response=response,
                                reference=reference if reference else "Not provided")


def parse_reply(text: str) -> Dict[str, object]:
  """Splits a reply into ``user``, ``analysis``, ``summary`` (str) and ``score`` (int)."""
  matches = list(_HEADER_RE.finditer(text or ""))
  sections: Dict[str, str] = {}
  for m, nxt in zip(matches, matches[1:] + [None]):
    name = next(k for k in SECTIONS if m.group(k))
    body = text[m.end():nxt.start() if nxt else len(text)].strip().strip("*_ \n")
    if body and name not in sections:
      sections[name] = body
  missing = [k for k in SECTIONS if k not in sections]
  if missing:
    raise ParseError(f"reply lacks section(s) {missing}")
  number = re.search(r"\d+(?:\.\d+)?", sections["score"])
  if not number or float(number.group(0)) > 10:
    raise ParseError(f"no score in 0-10 in {sections['score'][:40]!r}")
  sections["score"] = int(round(float(number.group(0))))
  return sections


class LLMJudge:
  """Feedback env backed by an OpenAI-compatible ``/chat/completions`` endpoint."""

  def __init__(self, *, base_url: str, model: str, api_key_env: Optional[str] = "OPENAI_API_KEY",
               timeout: float = 30.0, max_attempts: int = 3, concurrency: int = 8,
               max_failure_rate: float = 0.2, backoff: float = 1.0,
               max_backoff: float = 30.0, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, correct_threshold: int = 7):
    if max_attempts < 1 or concurrency < 1:
      raise ValueError("max_attempts and concurrency must be >= 1.")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.timeout, self.max_attempts, self.concurrency = timeout, max_attempts, concurrency
    self.max_failure_rate = max_failure_rate
    self.backoff, self.max_backoff = backoff, max_backoff
    self.temperature, self.max_tokens = temperature, max_tokens
    self.correct_threshold = correct_threshold
    self._key = ""
    if api_key_env:
      self._key = os.environ.get(api_key_env, "")
      if not self._key:
        raise JudgeError(f"Environment variable {api_key_env} (the judge's API key) is "
                         "not set; set it, or pass api_key_env=None for a server "
                         "without authentication.")
    self.requests = self.retries = self.failures = 0
    self._last_error = ""
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"LLMJudge(url={self.url!r}, model={self.model!r})"

  def config_key(self) -> str:
    prompt = hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest()[:12]
    return (f"llm_judge(url={self.url}, model={self.model}, temperature="
            f"{self.temperature}, max_tokens={self.max_tokens}, prompt={prompt})")

  def _redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text

  def _count(self, name: str, n: int = 1):
    with self._lock:
      setattr(self, name, getattr(self, name) + n)

  def _post(self, prompt: str) -> str:
    """One HTTP request; returns the reply text or raises."""
    body = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
    if self.temperature is not None:
      body["temperature"] = self.temperature
    if self.max_tokens is not None:
      body["max_tokens"] = self.max_tokens
    headers = {"Content-Type": "application/json"}
    if self._key:
      headers["Authorization"] = f"Bearer {self._key}"
    request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"),
                                     headers=headers, method="POST")
    self._count("requests")
    with urllib.request.urlopen(request, timeout=self.timeout) as reply:
      payload = json.loads(reply.read().decode("utf-8"))
    try:
      return payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
      raise ParseError("reply is not a chat completion (no choices[0].message.content)"
                       ) from None

  def _ask(self, query: Query) -> Feedback:
    """Asks about one query with retries; returns ``failed_feedback`` if all fail."""
    prompt = build_prompt(query.example.question, query.response, query.example.answer)
    error = "no attempt"
    for attempt in range(self.max_attempts):
      if attempt:
        self._count("retries")
        time.sleep(min(self.max_backoff, self.backoff * 2**(attempt - 1)))
      try:
        sections = parse_reply(self._post(prompt))
        return self._to_feedback(query, sections)
      except urllib.error.HTTPError as e:
        error = f"HTTP {e.code}"
        if e.code < 500 and e.code not in _RETRY_STATUS:
          break
      except (OSError, http.client.HTTPException) as e:  # Network errors, timeouts.
        error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
      except (ParseError, ValueError) as e:
        error = f"unusable reply: {e}"
      logging.warning("Judge attempt %d/%d for %s failed: %s", attempt + 1,
                      self.max_attempts, query.example.uid, self._redact(str(error)))
    self._count("failures")
    self._last_error = self._redact(str(error))
    return failed_feedback(self._correct(query, None))

  def _correct(self, query: Query, score: Optional[int]) -> bool:
    if query.example.answer is not None:
      return tasks.check_answer(query.example, query.response)
    return score is not None and score >= self.correct_threshold

  def _to_feedback(self, query: Query, s: Dict[str, object]) -> Feedback:
    return Feedback(user=s["user"], reviewer=s["summary"], critique=s["analysis"],
                    score=s["score"], correct=self._correct(query, s["score"]))

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    queries = as_queries(batch)
    if not queries:
      return []
    before = self.failures
    workers = min(self.concurrency, len(queries))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      out = list(pool.map(self._ask, queries))
    failed = self.failures - before
    logging.info("Judge batch: %d queries, %d failed; totals: %d requests, %d retries, "
                 "%d failures.", len(queries), failed, self.requests, self.retries,
                 self.failures)
    if failed > self.max_failure_rate * len(queries):
      raise JudgeError(
          f"Judge failed on {failed} of {len(queries)} queries (rate "
          f"{failed / len(queries):.2f} > max_failure_rate {self.max_failure_rate}); "
          f"last error: {self._last_error}. Endpoint: {self.url}.")
    return out


@FEEDBACK_ENVS.register("llm_judge")
def llm_judge(**kwargs) -> LLMJudge:
  """``"llm_judge(base_url=..., model=..., api_key_env='OPENAI_API_KEY', timeout=30, ...)"``."""
  return LLMJudge(**kwargs)

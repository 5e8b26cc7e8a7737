"""An LLM judge over any OpenAI-compatible chat-completions server, via the ``openai`` client.

One request per (example, response) asks for the published feedback sections
(``docs/fcp_method.md`` §2; the prompt wording below is ours)::

    ### User-style feedback: ...
    ### Analysis along several dimensions: ...
    ### High-level summary: ...
    ### Score (0-10): ...

They map to ``Feedback(user=..., critique=<analysis>, reviewer=<summary>, score=...)``;
``correct`` comes from the task checker (``answers.check_answer``) when the example has a
reference answer, else from ``score >= correct_threshold``.

Transport (``openai`` 3.x over ``httpx2``, as installed; checked against its source):

* ``base_url`` is any OpenAI-compatible server (OpenAI, vLLM, SGLang, llama.cpp server,
  Ollama); the key is read from the environment variable ``api_key_env`` (``None``: no
  ``Authorization`` header at all).
* HTTP-level retries are the client's own (``max_retries``): connection errors, timeouts
  and HTTP 408/409/429/5xx are retried; the wait honours ``Retry-After-Ms`` /
  ``Retry-After`` (seconds or a date) when it is in (0, 120] s, else it is exponential
  backoff 0.5 s * 2^n, at most 8 s, minus up to 25 % jitter; a ``Retry-After`` over
  120 s is not retried. Other 4xx are final.
* ``timeout`` bounds each connect, read and write (httpx semantics: per operation, so a
  server trickling one byte at a time never trips it); ``deadline_s`` bounds each HTTP
  request as a whole (connect, send, headers and body): every socket operation gets at
  most the time left, and one past the deadline raises a read/write timeout, which the
  client retries like any timeout. One query thus takes at most about
  ``max_attempts * (max_retries + 1) * deadline_s`` plus the waits between retries.
* Redirects are never followed (the client's default httpx client would follow them): a
  3xx is a final failure, so a redirect never carries the request, nor its
  ``Authorization`` header, to another host. Proxy and ``.netrc`` settings from the
  environment are ignored (``trust_env=False``).
* Requests run on a thread pool of ``concurrency`` workers, one connection each.

Replies: the body is parsed by us, not by the client's models, so a reply of any shape
(not JSON, no ``choices``, ``message.content`` not a string, sections missing, score not
an integer in 0-10) is an unusable reply: it is retried up to ``max_attempts`` attempts
in all (``backoff`` * 2^n s apart, at most ``max_backoff``) and then becomes
``failed_feedback`` (empty texts, score 5, ``ok=False``). Nothing a server sends raises
out of a batch; a query that fails is counted (``requests``: HTTP requests sent,
``retries``: requests beyond the first of each query, ``failures``: queries that
failed). A batch whose failure rate exceeds ``max_failure_rate`` raises ``JudgeError``
after all its answers were delivered (``max_failure_rate=1`` never raises).

``feedback_stream(batch)`` yields ``(index, Feedback)`` as each answer arrives (in
completion order), so ``CachedFeedbackEnv`` stores every paid-for answer at once;
``feedback(batch)`` returns them in batch order. The API key never appears in logs,
reprs or exception messages.
"""

import concurrent.futures
import hashlib
import json
import math
import os
import re
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import httpcore2
import httpx2
import openai
from absl import logging

from fcp_jax.data import answers
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


class JudgeError(RuntimeError):
  """The judge failed on too many queries of a batch (or is misconfigured)."""


class ParseError(ValueError):
  """A judge reply is not a chat completion, or lacks required sections or a usable score."""


def build_prompt(question: str, response: str, reference: Optional[str]) -> str:
  return PROMPT_TEMPLATE.format(question=question, response=response,
                                reference=reference if reference else "Not provided")


def parse_reply(text: str) -> Dict[str, object]:
  """Splits a reply into ``user``, ``analysis``, ``summary`` (str) and ``score`` (int)."""
  if not isinstance(text, str):
    raise ParseError(f"reply text is {type(text).__name__}, not a string")
  matches = list(_HEADER_RE.finditer(text))
  sections: Dict[str, Any] = {}
  for m, nxt in zip(matches, matches[1:] + [None]):
    name = next(k for k in SECTIONS if m.group(k))
    body = text[m.end():nxt.start() if nxt else len(text)].strip().strip("*_ \n")
    if body and name not in sections:
      sections[name] = body
  missing = [k for k in SECTIONS if k not in sections]
  if missing:
    raise ParseError(f"reply lacks section(s) {missing}")
  number = re.search(r"[-−]?\d+(?:\.\d+)?", sections["score"])
  value = float(number.group(0).replace("−", "-")) if number else math.nan
  if not 0 <= value <= 10:
    raise ParseError(f"no score in 0-10 in {sections['score'][:40]!r}")
  sections["score"] = int(round(value))
  return sections


def reply_content(body: bytes) -> str:
  """``choices[0].message.content`` of a chat-completion body; ``ParseError`` otherwise."""
  try:
    payload = json.loads(body)
  except (ValueError, UnicodeDecodeError):
    raise ParseError(f"reply body is not JSON ({len(body)} bytes: {body[:40]!r})") from None
  if not isinstance(payload, dict):
    raise ParseError(f"reply is a JSON {type(payload).__name__}, not an object")
  choices = payload.get("choices")
  if not isinstance(choices, list) or not choices:
    error = payload.get("error")
    detail = f" (error: {str(error)[:80]})" if error else ""
    raise ParseError(f"reply has no choices list{detail}")
  message = choices[0].get("message") if isinstance(choices[0], dict) else None
  if not isinstance(message, dict):
    raise ParseError("reply has no choices[0].message object")
  content = message.get("content")
  if not isinstance(content, str):
    raise ParseError(f"choices[0].message.content is {type(content).__name__}, "
                     "not a string")
  return content


_deadline = threading.local()  # .at: monotonic deadline of this thread's HTTP request.


def _time_left(timeout: Optional[float], error: type) -> Optional[float]:
  """``timeout`` capped by the current request's deadline; raises ``error`` past it."""
  at = getattr(_deadline, "at", None)
  if at is None:
    return timeout
  left = at - time.monotonic()
  if left <= 0:
    raise error(f"overall request deadline of {_deadline.seconds:g} s passed")
  return left if timeout is None else min(timeout, left)


def _io(op: Callable[[Optional[float]], Any], timeout: Optional[float], error: type) -> Any:
  """Runs ``op(timeout capped by the deadline)``, naming the deadline if it ran out."""
  try:
    return op(_time_left(timeout, error))
  except error:
    _time_left(None, error)  # Raises the deadline's own message if it has passed.
    raise


class _DeadlineStream(httpcore2.NetworkStream):
  """A socket stream whose every read and write ends by the request's deadline."""

  def __init__(self, inner: httpcore2.NetworkStream):
    self._inner = inner

  def read(self, max_bytes: int, timeout: Optional[float] = None) -> bytes:
    return _io(lambda t: self._inner.read(max_bytes, t), timeout, httpcore2.ReadTimeout)

  def write(self, buffer: bytes, timeout: Optional[float] = None) -> None:
    _io(lambda t: self._inner.write(buffer, t), timeout, httpcore2.WriteTimeout)

  def close(self) -> None:
    self._inner.close()

  def start_tls(self, ssl_context, server_hostname=None, timeout=None):
    return _DeadlineStream(self._inner.start_tls(
        ssl_context, server_hostname, _time_left(timeout, httpcore2.ConnectTimeout)))

  def get_extra_info(self, info: str) -> Any:
    return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore2.NetworkBackend):
  """``httpcore2.SyncBackend`` with ``_DeadlineStream`` connections."""

  def __init__(self):
    self._inner = httpcore2.SyncBackend()

  def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
    return _DeadlineStream(self._inner.connect_tcp(
        host, port, _time_left(timeout, httpcore2.ConnectTimeout), local_address,
        socket_options))

  def connect_unix_socket(self, path, timeout=None, socket_options=None):
    return _DeadlineStream(self._inner.connect_unix_socket(
        path, _time_left(timeout, httpcore2.ConnectTimeout), socket_options))

  def sleep(self, seconds: float) -> None:
    self._inner.sleep(seconds)


class _DeadlineTransport(httpx2.HTTPTransport):
  """An HTTP transport with an overall deadline per request, counting requests.

  The sync client does all I/O of a request (headers and body) in the calling thread,
  so the deadline lives in a thread-local set when the request starts.
  """

  def __init__(self, deadline_s: float, connections: int, on_request: Callable[[], None]):
    super().__init__(trust_env=False)
    if not hasattr(self, "_pool"):
      raise JudgeError(f"httpx2 {httpx2.__version__}: HTTPTransport has no _pool; this "
                       "judge's deadline transport needs updating.")
    self._pool = httpcore2.ConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False),
        max_connections=connections, max_keepalive_connections=connections,
        keepalive_expiry=5.0, network_backend=_DeadlineBackend())
    self.deadline_s = deadline_s
    self._on_request = on_request

  def handle_request(self, request: httpx2.Request) -> httpx2.Response:
    self._on_request()
    _deadline.seconds = self.deadline_s
    _deadline.at = time.monotonic() + self.deadline_s
    return super().handle_request(request)


class LLMJudge:
  """Feedback env backed by an OpenAI-compatible ``/chat/completions`` endpoint."""

  def __init__(self, *, base_url: str, model: str,
               api_key_env: Optional[str] = "OPENAI_API_KEY", timeout: float = 60.0,
               deadline_s: float = 300.0, max_retries: int = 2, max_attempts: int = 3,
               concurrency: int = 8, max_failure_rate: float = 0.2, backoff: float = 1.0,
               max_backoff: float = 30.0, temperature: Optional[float] = None,
               max_tokens: Optional[int] = None, correct_threshold: int = 7):
    if max_attempts < 1 or concurrency < 1 or max_retries < 0:
      raise ValueError(f"LLMJudge: max_attempts ({max_attempts}) and concurrency "
                       f"({concurrency}) must be >= 1, max_retries ({max_retries}) >= 0.")
    if not (timeout > 0 and deadline_s > 0):
      raise ValueError(f"LLMJudge: timeout ({timeout}) and deadline_s ({deadline_s}) "
                       "must be > 0.")
    self.base_url = base_url.rstrip("/")
    self.url = self.base_url + "/chat/completions"
    self.model = model
    self.timeout, self.deadline_s = timeout, deadline_s
    self.max_retries, self.max_attempts = max_retries, max_attempts
    self.concurrency, self.max_failure_rate = concurrency, max_failure_rate
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
    self.requests = self.asked = self.failures = 0
    self._last_error = ""
    self._lock = threading.Lock()
    http_client = httpx2.Client(
        transport=_DeadlineTransport(deadline_s, concurrency, self._count_request),
        timeout=httpx2.Timeout(timeout), follow_redirects=False, trust_env=False)
    self._client = openai.OpenAI(
        base_url=self.base_url, api_key=self._key or "none", max_retries=max_retries,
        timeout=httpx2.Timeout(timeout), http_client=http_client)
    # Without a key, send no Authorization header at all (the client's placeholder key
    # is omitted per request).
    self._headers = {} if self._key else {"Authorization": openai.Omit()}

  def __repr__(self) -> str:
    return f"LLMJudge(url={self.url!r}, model={self.model!r})"

  @property
  def retries(self) -> int:
    """HTTP requests sent beyond the first of each query (client and reply retries)."""
    return self.requests - self.asked

  def config_key(self) -> str:
    prompt = hashlib.sha256(PROMPT_TEMPLATE.encode()).hexdigest()[:12]
    return (f"llm_judge(url={self.url}, model={self.model}, temperature="
            f"{self.temperature}, max_tokens={self.max_tokens}, prompt={prompt})")

  def close(self):
    self._client.close()

  def _redact(self, text: str) -> str:
    return text.replace(self._key, "***") if self._key else text

  def _count_request(self):
    with self._lock:
      self.requests += 1

  def _post(self, prompt: str) -> str:
    """One chat completion (with the client's HTTP retries); returns the reply text."""
    extra: Dict[str, Any] = {"extra_headers": self._headers} if self._headers else {}
    if self.temperature is not None:
      extra["temperature"] = self.temperature
    if self.max_tokens is not None:
      extra["max_tokens"] = self.max_tokens
    raw = self._client.chat.completions.with_raw_response.create(
        model=self.model, messages=[{"role": "user", "content": prompt}], **extra)
    return reply_content(raw.http_response.read())

  def _describe(self, e: BaseException) -> Tuple[str, bool]:
    """(redacted description, whether another attempt may help) of a failed attempt."""
    if isinstance(e, openai.APIStatusError):
      return f"HTTP {e.status_code}", False  # The client already retried what it should.
    if isinstance(e, openai.APITimeoutError):
      return (f"request timed out (timeout {self.timeout:g} s per operation, deadline "
              f"{self.deadline_s:g} s per request; cause: {e.__cause__!r})"), False
    if isinstance(e, openai.APIConnectionError):
      return f"connection error: {e.__cause__!r}", False
    if isinstance(e, ParseError):
      return f"unusable reply: {e}", True
    return f"unexpected {type(e).__name__}: {e}", True

  def _ask(self, query: Query) -> Feedback:
    """Asks about one query with retries; returns ``failed_feedback`` if all fail."""
    prompt = build_prompt(query.example.question, query.response, query.example.answer)
    with self._lock:
      self.asked += 1
    error = "no attempt"
    for attempt in range(self.max_attempts):
      if attempt:
        time.sleep(min(self.max_backoff, self.backoff * 2**(attempt - 1)))
      try:
        sections = parse_reply(self._post(prompt))
      except Exception as e:  # pylint: disable=broad-except  # Nothing kills a batch.
        error, again = self._describe(e)
        error = self._redact(error)
        logging.warning("Judge attempt %d/%d for %s failed: %s", attempt + 1,
                        self.max_attempts, query.example.uid, error)
        if not again:
          break
        continue
      return Feedback(user=sections["user"], reviewer=sections["summary"],
                      critique=sections["analysis"], score=sections["score"],
                      correct=self._correct(query, sections["score"]))
    with self._lock:
      self.failures += 1
      self._last_error = error
    return failed_feedback(self._correct(query, None))

  def _correct(self, query: Query, score: Optional[int]) -> bool:
    if query.example.answer is not None:
      return answers.check_answer(query.example, query.response)
    return score is not None and score >= self.correct_threshold

  def feedback_stream(self, batch: Sequence[QueryLike]) -> Iterator[Tuple[int, Feedback]]:
    """Yields ``(index in batch, Feedback)`` as each answer arrives (completion order).

    Every query is answered once (``ok=False`` when it failed); after the last answer,
    raises ``JudgeError`` if the batch's failure rate exceeds ``max_failure_rate``.
    """
    queries = as_queries(batch)
    if not queries:
      return
    failed = 0
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(self.concurrency, len(queries)), thread_name_prefix="llm_judge")
    try:
      futures = {pool.submit(self._ask, q): i for i, q in enumerate(queries)}
      for future in concurrent.futures.as_completed(futures):
        fb = future.result()
        failed += not fb.ok
        yield futures[future], fb
    finally:
      pool.shutdown(wait=True, cancel_futures=True)
    logging.info("Judge batch: %d queries, %d failed; totals: %d requests, %d retries, "
                 "%d failures.", len(queries), failed, self.requests, self.retries,
                 self.failures)
    if failed > self.max_failure_rate * len(queries):
      raise JudgeError(
          f"Judge failed on {failed} of {len(queries)} queries (rate "
          f"{failed / len(queries):.2f} > max_failure_rate {self.max_failure_rate}); "
          f"last error: {self._last_error}. Endpoint: {self.url}.")

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    """One ``Feedback`` per query, in batch order (see ``feedback_stream``)."""
    out: List[Optional[Feedback]] = [None] * len(batch)
    for i, fb in self.feedback_stream(batch):
      out[i] = fb
    return out  # type: ignore[return-value]


@FEEDBACK_ENVS.register("llm_judge")
def llm_judge(**kwargs) -> LLMJudge:
  """``"llm_judge(base_url=..., model=..., api_key_env='OPENAI_API_KEY', timeout=60,
  deadline_s=300, max_retries=2, max_attempts=3, concurrency=8, ...)"``."""
  return LLMJudge(**kwargs)

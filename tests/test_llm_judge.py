"""Tests for the LLM judge against real HTTP servers on loopback (127.0.0.1).

Every server loop is bounded: hanging and trickling replies stop after 20 s or when the
test ends.
"""

import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fcp_jax.data.tasks import Example
from fcp_jax.feedback import llm_judge
from fcp_jax.feedback.base import FEEDBACK_ENVS
from fcp_jax.feedback.cache import CachedFeedbackEnv

SECRET = "sk-test-SECRET-1234567890"
GOOD_REPLY = """### User-style feedback: Thanks, that makes sense to me!
### Analysis along several dimensions: Correctness: the final result matches. Rigor: fine.
### High-level summary: Correct and clear; rigorous and well organized.
### Score (0-10): 9"""


MALFORMED = {  # mode -> body (JSON, or raw bytes) of an HTTP 200 reply nobody can use.
    "listcontent": {"choices": [{"message": {"content": [{"type": "text",
                                                           "text": GOOD_REPLY}]}}]},
    "nochoices": {"id": "chatcmpl-1", "object": "chat.completion"},
    "emptychoices": {"choices": []},
    "choicesdict": {"choices": {"0": {"message": {"content": GOOD_REPLY}}}},
    "nullmessage": {"choices": [{"message": None}]},
    "intcontent": {"choices": [{"message": {"content": 7}}]},
    "toplist": [GOOD_REPLY],
    "errorobj": {"error": {"message": "model overloaded"}},
    "outofrange": {"choices": [{"message": {"content": GOOD_REPLY.replace(": 9", ": 42")}}]},
    "negative": {"choices": [{"message": {"content": GOOD_REPLY.replace(": 9", ": -3")}}]},
    "notjson": b"<html>Bad gateway</html>",
    "empty": b"",
}


class _Handler(http.server.BaseHTTPRequestHandler):
  """Behaves according to the MODE word (and ID, if any) written in the question."""

  protocol_version = "HTTP/1.1"

  def do_POST(self):  # pylint: disable=invalid-name
    server = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][0]["content"]
    mode = prompt.split("MODE:")[1].split()[0]
    with server.lock:
      server.auth.append(self.headers.get("Authorization"))
      server.calls[mode] = server.calls.get(mode, 0) + 1
      server.times.setdefault(mode, []).append(time.monotonic())
      n = server.calls[mode]
      if "ID:" in prompt:
        uid = prompt.split("ID:")[1].split()[0]
        server.ids[uid] = server.ids.get(uid, 0) + 1
    if mode == "slow":
      time.sleep(0.6)
    if mode == "http500" or (mode == "flaky" and n == 1):
      return self._send(500, {"error": f"boom, your key was {SECRET}"})
    if mode == "http401":
      return self._send(401, {"error": "bad key"})
    if mode == "ratelimit" and n == 1:
      return self._send(429, {"error": "slow down"}, {"Retry-After": "1"})
    if mode.startswith("redirect"):  # redirect302, redirect307, ...
      return self._send(int(mode[8:]), {}, {"Location": server.redirect_to})
    if mode == "barrier":
      try:
        server.barrier.wait()
      except threading.BrokenBarrierError:
        return self._send(500, {"error": "not concurrent"})
    if mode == "trickle":
      return self._trickle()
    if mode == "hang" and n > server.answer_first:  # Hangs until released (20 s at most).
      server.release.wait(20)
    if mode in MALFORMED:
      payload = MALFORMED[mode]
      return self._send(200, payload, {} if isinstance(payload, bytes) else None)
    content = GOOD_REPLY
    if mode == "missing":
      content = "### User-style feedback: meh\n### Score (0-10): 3"
    if mode == "garbage":
      return self._send(200, {"unexpected": True})
    self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

  def do_GET(self):  # pylint: disable=invalid-name
    """Only a followed redirect would GET here: recorded, then 404."""
    with self.server.lock:
      self.server.auth.append(self.headers.get("Authorization"))
      self.server.calls["GET"] = self.server.calls.get("GET", 0) + 1
    self._send(404, {"error": "not found"})

  def _trickle(self):
    """A valid reply, one byte every 0.2 s, for 20 s at most."""
    data = json.dumps({"choices": [{"message": {"content": GOOD_REPLY}}]}).encode()
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    end = time.monotonic() + 20
    for byte in (head + data * 1000):
      if self.server.release.is_set() or time.monotonic() > end:
        break
      try:
        self.wfile.write(bytes([byte]))
        self.wfile.flush()
      except OSError:
        break
      time.sleep(0.2)
    self.close_connection = True

  def _send(self, code, payload, headers=None):
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", "text/html" if headers == {} else "application/json")
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    try:
      self.wfile.write(data)
      self.wfile.flush()
    except OSError:
      return
    with self.server.lock:
      self.server.answered += 1

  def log_message(self, *args):
    pass


def _serve():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  httpd.lock, httpd.auth, httpd.calls, httpd.times, httpd.ids = (
      threading.Lock(), [], {}, {}, {})
  httpd.answered, httpd.answer_first, httpd.release = 0, 0, threading.Event()
  httpd.barrier = threading.Barrier(4, timeout=5)
  threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                   daemon=True).start()
  return httpd


@pytest.fixture
def server():
  httpd = _serve()
  yield httpd
  httpd.release.set()
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def other_server():
  httpd = _serve()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def _spec(server, **overrides):
  args = dict(base_url=f"'http://127.0.0.1:{server.server_address[1]}/v1'", model="'tiny'",
              api_key_env="'TEST_JUDGE_KEY'", timeout=0.2, deadline_s=5, max_retries=1,
              max_attempts=2, concurrency=4, max_failure_rate=0.5, backoff=0.01)
  args.update(overrides)
  return "llm_judge(" + ", ".join(f"{k}={v}" for k, v in args.items()) + ")"


@pytest.fixture
def judge(server, monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  return FEEDBACK_ENVS.build(_spec(server))


def _query(mode, answer="12", response="3+4=7\n7+5=12\n#### 12", uid=None):
  uid = uid or f"q-{mode}"
  return (Example(uid=uid, question=f"What is 3+4+5? MODE:{mode} ID:{uid} ", answer=answer),
          response)


def test_well_formed_reply(judge, server):
  (fb,) = judge.feedback([_query("ok")])
  assert fb.ok and fb.score == 9 and fb.correct
  assert fb.user == "Thanks, that makes sense to me!"
  assert fb.reviewer == "Correct and clear; rigorous and well organized."
  assert fb.critique.startswith("Correctness: the final result matches.")
  assert server.auth == [f"Bearer {SECRET}"]
  assert (judge.requests, judge.retries, judge.failures) == (1, 0, 0)
  (wrong,) = judge.feedback([_query("ok", response="#### 13")])
  assert not wrong.correct  # From the task checker, not from the judge's text.


def test_missing_sections_retry_then_fall_back(judge, server, caplog):
  caplog.set_level(logging.INFO)
  out = judge.feedback([_query("missing"), _query("ok")])
  assert server.calls["missing"] == 2  # max_attempts.
  fb = out[0]
  assert not fb.ok and (fb.user, fb.reviewer, fb.critique, fb.score) == ("", "", "", 5)
  assert fb.correct  # Still the checker's verdict.
  assert out[1].ok and (judge.failures, judge.retries, judge.requests) == (1, 1, 3)
  assert "lacks section" in caplog.text and SECRET not in caplog.text


def test_http_500_is_retried_and_key_never_leaks(judge, server, caplog):
  caplog.set_level(logging.DEBUG)
  (fb,) = judge.feedback([_query("flaky")])
  assert fb.ok and server.calls["flaky"] == 2 and judge.retries == 1
  with pytest.raises(llm_judge.JudgeError) as e:
    judge.feedback([_query("http500")])
  assert server.calls["http500"] == 2
  assert "HTTP 500" in str(e.value) and "1 of 1" in str(e.value)
  assert SECRET not in str(e.value) and SECRET not in repr(judge)
  assert SECRET not in caplog.text and "HTTP 500" in caplog.text


def test_client_errors_are_not_retried(judge, server):
  out = judge.feedback([_query("http401"), _query("ok"), _query("ok")])
  assert server.calls["http401"] == 1 and not out[0].ok and out[1].ok


def test_timeout_and_failure_rate(judge, server, caplog):
  caplog.set_level(logging.WARNING)
  start = time.time()
  out = judge.feedback([_query("slow"), _query("ok"), _query("ok")])  # 1/3 < 0.5.
  assert time.time() - start < 3.0
  assert not out[0].ok and out[0].score == 5 and out[1].ok
  assert server.calls["slow"] == 2
  assert "timed out" in caplog.text.lower() and SECRET not in caplog.text
  with pytest.raises(llm_judge.JudgeError, match="2 of 3"):
    judge.feedback([_query("garbage"), _query("http401"), _query("ok")])


def test_missing_key_and_config_key(monkeypatch):
  monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
  with pytest.raises(llm_judge.JudgeError, match="NO_SUCH_JUDGE_KEY"):
    llm_judge.LLMJudge(base_url="http://127.0.0.1:1", model="m",
                       api_key_env="NO_SUCH_JUDGE_KEY")
  a = llm_judge.LLMJudge(base_url="http://127.0.0.1:1/v1/", model="m", api_key_env=None)
  b = llm_judge.LLMJudge(base_url="http://127.0.0.1:1/v1", model="m2", api_key_env=None)
  assert a.url == "http://127.0.0.1:1/v1/chat/completions"
  assert a.config_key() != b.config_key()


def test_malformed_replies_of_any_shape_fail_softly(server, monkeypatch, caplog):
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  judge = FEEDBACK_ENVS.build(_spec(server, max_failure_rate=1.0))
  caplog.set_level(logging.WARNING)
  out = judge.feedback([_query(mode) for mode in MALFORMED] + [_query("ok")])
  assert [fb.ok for fb in out] == [False] * len(MALFORMED) + [True]
  assert all(fb.score == 5 and fb.correct for fb in out[:-1])  # Checker's verdict kept.
  assert {m: server.calls[m] for m in MALFORMED} == {m: 2 for m in MALFORMED}  # Retried.
  assert judge.failures == len(MALFORMED) and judge.retries == len(MALFORMED)
  for words in ("content is list", "no choices list", "model overloaded", "not JSON",
                "JSON list", "no score in 0-10", "choices[0].message"):
    assert words in caplog.text


def test_retry_after_is_honoured(judge, server):
  (fb,) = judge.feedback([_query("ratelimit")])
  first, second = server.times["ratelimit"]
  assert fb.ok and server.calls["ratelimit"] == 2 and judge.retries == 1
  assert 0.95 <= second - first < 5


def test_trickling_server_is_cut_off_by_the_deadline(server, monkeypatch, caplog):
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  judge = FEEDBACK_ENVS.build(_spec(server, timeout=2.0, deadline_s=1.0,
                                    max_failure_rate=1.0))
  caplog.set_level(logging.WARNING)
  start = time.monotonic()
  out = judge.feedback([_query("trickle"), _query("ok")])
  elapsed = time.monotonic() - start
  assert not out[0].ok and out[1].ok and server.calls["trickle"] == 2  # max_retries=1.
  assert 2.0 <= elapsed < 6.0  # Two attempts of 1 s each plus one backoff, not forever.
  assert "deadline of 1 s passed" in caplog.text and judge.failures == 1


@pytest.mark.parametrize("code", [302, 307])
def test_redirects_are_not_followed(judge, server, other_server, caplog, code):
  server.redirect_to = (f"http://127.0.0.1:{other_server.server_address[1]}"
                        "/v1/chat/completions")
  caplog.set_level(logging.WARNING)
  out = judge.feedback([_query(f"redirect{code}"), _query("ok")])
  assert not out[0].ok and out[1].ok and server.calls[f"redirect{code}"] == 1
  assert other_server.calls == {} and other_server.auth == []  # Never saw the key.
  assert f"HTTP {code}" in caplog.text


def test_queries_run_concurrently(judge, server):
  # Each reply waits until 4 requests are in flight at once (else HTTP 500 after 5 s).
  start = time.monotonic()
  out = judge.feedback([_query("barrier", uid=f"b{i}") for i in range(4)])
  assert all(fb.ok for fb in out) and server.calls["barrier"] == 4
  assert time.monotonic() - start < 4


def test_no_key_means_no_authorization_header(server):
  judge = FEEDBACK_ENVS.build(_spec(server, api_key_env=None))
  assert judge.feedback([_query("ok")])[0].ok and server.auth == [None]


def _hang_queries():
  return [_query("hang", uid=f"k{i}") for i in range(6)]


_KILLED_RUN = """
import sys
from fcp_jax.data.tasks import Example
from fcp_jax.feedback.cache import make_env
spec, path = sys.argv[1:]
make_env(spec, path).feedback([
    (Example(uid=f"k{i}", question=f"What is 3+4+5? MODE:hang ID:k{i} ", answer="12"),
     "3+4=7\\n7+5=12\\n#### 12") for i in range(6)])
print("batch returned")
"""


def test_answers_survive_a_killed_run(server, monkeypatch, tmp_path):
  """Answers are cached as they arrive: a run killed mid-batch re-asks none of them."""
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  path = str(tmp_path / "cache.jsonl")
  spec = _spec(server, timeout=30, deadline_s=30, max_retries=0, concurrency=2)
  server.answer_first = 3  # The first 3 requests are answered, later ones hang.
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, spec, path], cwd=repo,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  try:
    end = time.monotonic() + 60
    while time.monotonic() < end and proc.poll() is None:
      lines = open(path).read().count("\n") if os.path.exists(path) else 0
      if (lines, server.answered, server.calls.get("hang", 0)) == (3, 3, 5):
        break  # 3 answered and cached, 2 in flight: the batch has not returned.
      time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    assert (lines, server.answered, server.calls["hang"]) == (3, 3, 5)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
  answered = {json.loads(line)["uid"] for line in open(path)}
  assert len(answered) == 3
  server.release.set()
  asked_before = dict(server.ids)
  cached = CachedFeedbackEnv(FEEDBACK_ENVS.build(spec), path)
  out = cached.feedback(_hang_queries())
  assert all(fb.ok for fb in out) and (cached.hits, cached.misses) == (3, 3)
  new = {uid: n - asked_before.get(uid, 0) for uid, n in server.ids.items()}
  assert {uid: n for uid, n in new.items() if n} == {
      uid: 1 for uid in {f"k{i}" for i in range(6)} - answered}  # Only the unanswered.
  assert all(server.ids[uid] == 1 for uid in answered)  # Paid for once, never again.


def test_config_key_ignores_transport_knobs_and_secrets(monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  base = dict(base_url="http://127.0.0.1:1/v1", model="m")
  a = llm_judge.LLMJudge(**base, api_key_env="TEST_JUDGE_KEY")
  b = llm_judge.LLMJudge(**base, api_key_env=None, timeout=5, deadline_s=9, max_retries=0,
                         max_attempts=1, concurrency=2)
  c = llm_judge.LLMJudge(**base, api_key_env=None, temperature=0.5)
  assert a.config_key() == b.config_key() != c.config_key()
  assert SECRET not in a.config_key() and SECRET not in repr(a)


@pytest.mark.parametrize("reply", [
    GOOD_REPLY,
    GOOD_REPLY.lower(),
    ("**User-style feedback:** Thanks, that makes sense to me!\n\n"
     "**Analysis along several dimensions**: Correctness: fine.\n"
     "**High-level summary:** Correct and clear.\n**Score (0-10):** 9/10"),
    ("1. User style feedback\nThanks, that makes sense to me!\n"
     "2. Analysis\nCorrectness: fine.\n3. High level summary\nCorrect and clear.\n"
     "4. Score (0 - 10)\n9"),
    "## user-style  feedback :  Thanks, that makes sense to me!\n## ANALYSIS: ok\n"
    "## High-Level Summary: Correct and clear.\n## Overall score: 8.6",
])
def test_parse_reply_variants(reply):
  sections = llm_judge.parse_reply(reply)
  assert sections["score"] == 9
  assert sections["user"].lower().startswith("thanks, that makes sense")
  assert sections["summary"].lower().startswith("correct and clear")
  assert sections["analysis"]


@pytest.mark.parametrize("reply", [
    "", "### Score (0-10): 9", GOOD_REPLY.replace(": 9", ": 12"),
    GOOD_REPLY.replace(": 9", ": great"), GOOD_REPLY.replace(": 9", ": -3"), None,
    [{"type": "text", "text": GOOD_REPLY}]])
def test_parse_reply_rejects(reply):
  with pytest.raises(llm_judge.ParseError):
    llm_judge.parse_reply(reply)


def test_prompt_has_the_published_sections():
  prompt = llm_judge.build_prompt("Q?", "A", None)
  for header in ("### User-style feedback:", "### Analysis along several dimensions:",
                 "### High-level summary:", "### Score (0-10):"):
    assert header in prompt
  assert "Not provided" in prompt and "Q?" in prompt

"""Tests for the LLM judge against a real HTTP server on loopback."""

import http.server
import json
import logging
import threading
import time

import pytest

from fcp_jax.data.tasks import Example
from fcp_jax.feedback import llm_judge
from fcp_jax.feedback.base import FEEDBACK_ENVS

SECRET = "sk-test-SECRET-1234567890"
GOOD_REPLY = """### User-style feedback: Thanks, that makes sense to me!
### Analysis along several dimensions: Correctness: the final result matches. Rigor: fine.
### High-level summary: Correct and clear; rigorous and well organized.
### Score (0-10): 9"""


class _Handler(http.server.BaseHTTPRequestHandler):
  """Behaves according to the MODE word written in the question."""

  def do_POST(self):  # pylint: disable=invalid-name
    server = self.server
    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    prompt = body["messages"][0]["content"]
    mode = prompt.split("MODE:")[1].split()[0]
    with server.lock:
      server.auth.append(self.headers.get("Authorization"))
      server.calls[mode] = server.calls.get(mode, 0) + 1
      n = server.calls[mode]
    if mode == "slow":
      time.sleep(0.6)
    if mode == "http500" or (mode == "flaky" and n == 1):
      return self._send(500, {"error": f"boom, your key was {SECRET}"})
    if mode == "http401":
      return self._send(401, {"error": "bad key"})
    content = {"missing": "### User-style feedback: meh\n### Score (0-10): 3",
               "garbage": None}.get(mode, GOOD_REPLY)
    if content is None:
      return self._send(200, {"unexpected": True})
    self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

  def _send(self, code, payload):
    data = json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    try:
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  httpd.lock, httpd.auth, httpd.calls = threading.Lock(), [], {}
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def judge(server, monkeypatch):
  monkeypatch.setenv("TEST_JUDGE_KEY", SECRET)
  port = server.server_address[1]
  return FEEDBACK_ENVS.build(
      f"llm_judge(base_url='http://127.0.0.1:{port}/v1', model='tiny', "
      "api_key_env='TEST_JUDGE_KEY', timeout=0.2, max_attempts=2, concurrency=4, "
      "max_failure_rate=0.5, backoff=0.01)")


def _query(mode, answer="12", response="3+4=7\n7+5=12\n#### 12"):
  return (Example(uid=f"q-{mode}", question=f"What is 3+4+5? MODE:{mode} ", answer=answer),
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


@pytest.mark.parametrize("reply", ["", "### Score (0-10): 9", GOOD_REPLY.replace(": 9", ": 12"),
                                   GOOD_REPLY.replace(": 9", ": great")])
def test_parse_reply_rejects(reply):
  with pytest.raises(llm_judge.ParseError):
    llm_judge.parse_reply(reply)


def test_prompt_has_the_published_sections():
  prompt = llm_judge.build_prompt("Q?", "A", None)
  for header in ("### User-style feedback:", "### Analysis along several dimensions:",
                 "### High-level summary:", "### Score (0-10):"):
    assert header in prompt
  assert "Not provided" in prompt and "Q?" in prompt

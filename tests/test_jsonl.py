"""Tests for fcp_jax.data.jsonl: file:line errors, skip-and-count mode."""

import json

import pytest

from fcp_jax.data import jsonl

FIELDS = [jsonl.Field("question", str, nonempty=True, aliases=("prompt",)),
          jsonl.Field("response", str, nonempty=True),
          jsonl.Field("score", (int, float), required=False, default=-1)]

GOOD = [{"prompt": "2+2?", "response": "#### 4", "score": 9, "extra": [1]},
        {"question": "3+3?", "response": "#### 6"}]


def _write(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else (line + "\n").encode("utf-8"))
  return str(path)


def test_reads_valid_records_with_aliases_defaults_and_lines(tmp_path):
  path = _write(tmp_path, [json.dumps(GOOD[0]), "", json.dumps(GOOD[1])])
  report = {}
  rows = jsonl.read_jsonl(path, FIELDS, report=report)
  assert [r["question"] for r in rows] == ["2+2?", "3+3?"]
  assert "prompt" not in rows[0] and rows[0]["extra"] == [1]
  assert [r["score"] for r in rows] == [9, -1]
  assert [r["_line"] for r in rows] == [1, 3]
  assert report["records"] == 2 and report["blank"] == 1 and report["skipped"] == 0


BAD_LINES = {
    "invalid JSON": '{"question": "a", "response": ',
    "missing field": json.dumps({"question": "a"}),
    "wrong type": json.dumps({"question": "a", "response": 5}),
    "empty field": json.dumps({"question": "a", "response": "   "}),
    "not an object": json.dumps(["a", "b"]),
    "invalid UTF-8": b'{"question": "\xff\xfe", "response": "x"}\n',
}


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_raises_naming_file_and_line(tmp_path, reason):
  path = _write(tmp_path, [json.dumps(GOOD[1]), BAD_LINES[reason]])
  with pytest.raises(jsonl.JsonlError) as e:
    jsonl.read_jsonl(path, FIELDS)
  assert str(e.value).startswith(f"{path}:2: {reason}")
  assert e.value.line == 2 and e.value.reason == reason


def test_bool_is_not_accepted_as_a_number(tmp_path):
  path = _write(tmp_path, [json.dumps({"question": "a", "response": "b", "score": True})])
  with pytest.raises(jsonl.JsonlError, match=":1: wrong type: field 'score'"):
    jsonl.read_jsonl(path, FIELDS)


def test_skip_mode_counts_every_bad_line(tmp_path):
  lines = [json.dumps(GOOD[0])] + [BAD_LINES[k] for k in sorted(BAD_LINES)] + [""]
  path = _write(tmp_path, lines)
  report = {}
  rows = jsonl.read_jsonl(path, FIELDS, on_error="skip", report=report)
  assert len(rows) == 1
  assert report["skipped"] == len(BAD_LINES)
  assert report["errors"] == {k: 1 for k in BAD_LINES}
  assert report["lines"] == len(BAD_LINES) + 2 and report["blank"] == 1
  assert report["first_errors"][0].startswith(f"{path}:")


def test_missing_file_and_bad_mode(tmp_path):
  with pytest.raises(FileNotFoundError):
    jsonl.read_jsonl(str(tmp_path / "nope.jsonl"))
  with pytest.raises(ValueError, match="on_error"):
    jsonl.read_jsonl(_write(tmp_path, []), on_error="ignore")


def test_write_read_roundtrip(tmp_path):
  path = jsonl.write_jsonl(str(tmp_path / "sub" / "out.jsonl"),
                           [{"question": "é?", "response": "ü"}])
  assert jsonl.read_jsonl(path, FIELDS)[0]["response"] == "ü"

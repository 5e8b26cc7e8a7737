"""Safe JSONL reading: every bad line names its file and line, or is skipped and counted.

A JSONL file holds one JSON object per line. ``read_jsonl`` validates each line against
a list of ``Field`` specs (type, required, non-empty, aliases) and returns the records
with canonical field names. A bad line (invalid UTF-8, invalid JSON, not an object, a
missing field, a wrong type, an empty required string) either raises ``JsonlError``
naming ``path:line`` (``on_error="raise"``, the default) or is skipped and counted in a
report dict (``on_error="skip"``)::

    report = {}
    rows = read_jsonl("data.jsonl", [Field("prompt", str, aliases=("question",)),
                                     Field("response", str, nonempty=True)],
                      on_error="skip", report=report)
    # report == {"path": ..., "lines": 10, "blank": 1, "records": 8, "skipped": 1,
    #            "errors": {"invalid JSON": 1}, "first_errors": ["data.jsonl:4: ..."]}

Blank lines are not records; they are counted as ``blank``. Nothing is dropped silently:
skipped lines are also summarised in one warning.
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, MutableMapping, Optional, Sequence, Tuple

from absl import logging

ON_ERROR = ("raise", "skip")
_MAX_LISTED_ERRORS = 5


class JsonlError(ValueError):
  """A malformed JSONL line; the message starts with ``path:line:``."""

  def __init__(self, path: str, line: int, reason: str, detail: str):
    self.path, self.line, self.reason = path, line, reason
    super().__init__(f"{path}:{line}: {reason}: {detail}")


@dataclasses.dataclass(frozen=True)
class Field:
  """One expected field of a JSONL record.

  Attributes:
    name: canonical name in the returned record.
    types: accepted Python types (``bool`` is only accepted when listed, although it
      is a subclass of ``int``).
    required: a missing (or null) required field is an error; a missing optional one
      is set to ``default``.
    nonempty: strings must contain a non-whitespace character.
    aliases: other names accepted in the file (the first present name wins).
    default: value of a missing optional field.
  """
  name: str
  types: Any = str
  required: bool = True
  nonempty: bool = False
  aliases: Tuple[str, ...] = ()
  default: Any = None

  @property
  def type_tuple(self) -> Tuple[type, ...]:
    return self.types if isinstance(self.types, tuple) else (self.types,)

  def check(self, obj: Dict[str, Any]) -> Tuple[Any, Optional[Tuple[str, str]]]:
    """Returns ``(value, None)`` or ``(None, (reason, detail))``."""
    names = (self.name,) + tuple(self.aliases)
    present = next((n for n in names if n in obj and obj[n] is not None), None)
    if present is None:
      if self.required:
        return None, ("missing field", f"expected {' or '.join(map(repr, names))}")
      return self.default, None
    value = obj[present]
    types = self.type_tuple
    wrong_bool = isinstance(value, bool) and bool not in types
    if wrong_bool or not isinstance(value, types):
      want = "/".join(t.__name__ for t in types)
      return None, ("wrong type",
                    f"field {present!r} should be {want}, got {type(value).__name__}")
    if self.nonempty and isinstance(value, str) and not value.strip():
      return None, ("empty field", f"field {present!r} is empty")
    return value, None


def new_report(path: Optional[str]) -> Dict[str, Any]:
  """An empty report: counts of lines, blank lines, records and skipped bad ones."""
  return {"path": path, "lines": 0, "blank": 0, "records": 0, "skipped": 0,
          "errors": {}, "first_errors": []}


def note_skipped(report: MutableMapping[str, Any], reason: str, message: str):
  """Counts one skipped bad record in ``report`` (keeps the first few messages)."""
  report["skipped"] += 1
  report["errors"][reason] = report["errors"].get(reason, 0) + 1
  if len(report["first_errors"]) < _MAX_LISTED_ERRORS:
    report["first_errors"].append(message)


def validate(obj: Any, fields: Sequence[Field], keep_extra: bool = True
             ) -> Tuple[Optional[Dict[str, Any]], Optional[Tuple[str, str]]]:
  """Checks one decoded record; returns ``(record, None)`` or ``(None, (reason, detail))``.

  The record has the canonical field names (aliases removed).
  """
  if not isinstance(obj, dict):
    return None, ("not an object", f"got a JSON {type(obj).__name__}")
  record = dict(obj) if keep_extra else {}
  for field in fields:
    value, problem = field.check(obj)
    if problem:
      return None, problem
    for alias in field.aliases:
      record.pop(alias, None)
    record[field.name] = value
  return record, None


def read_jsonl(path: str,
               fields: Optional[Sequence[Field]] = None,
               *,
               on_error: str = "raise",
               report: Optional[MutableMapping[str, Any]] = None,
               keep_extra: bool = True) -> List[Dict[str, Any]]:
  """Reads and validates a JSONL file.

  Args:
    path: the file.
    fields: expected fields; ``None`` accepts any JSON object.
    on_error: ``"raise"`` raises ``JsonlError`` at the first bad line; ``"skip"``
      skips it and counts it in ``report``.
    report: optional dict filled with counts (see the module docstring).
    keep_extra: keep fields not listed in ``fields`` (under their own names).

  Returns:
    The records, in file order, each with a ``"_line"`` entry (1-based line number).
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}.")
  if not os.path.exists(path):
    raise FileNotFoundError(f"JSONL file {path!r} does not exist.")
  fields = tuple(fields or ())
  stats = new_report(path)
  records = []

  def fail(line_no: int, reason: str, detail: str):
    error = JsonlError(path, line_no, reason, detail)
    if on_error == "raise":
      raise error
    note_skipped(stats, reason, str(error))

  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      stats["lines"] += 1
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        fail(line_no, "invalid UTF-8", f"byte {e.start}: {e.reason}")
        continue
      if not text.strip():
        stats["blank"] += 1
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        fail(line_no, "invalid JSON", f"{e.msg} at column {e.colno}")
        continue
      record, problem = validate(obj, fields, keep_extra)
      if problem:
        fail(line_no, *problem)
        continue
      record["_line"] = line_no
      records.append(record)

  stats["records"] = len(records)
  if stats["skipped"]:
    logging.warning("Skipped %d bad line(s) of %s: %s. First: %s", stats["skipped"],
                    path, stats["errors"], stats["first_errors"][0])
  if report is not None:
    report.update(stats)
  return records


def write_jsonl(path: str, records: Sequence[Dict[str, Any]]) -> str:
  """Writes ``records`` as JSONL (UTF-8, one object per line) and returns ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path

"""The stage store's records: which code computed each stage, and the warning when a
stage computed by other code is reused."""

from absl import logging
import pytest

from fcp_jax import experiment
from fcp_jax import stages as stages_lib


def test_code_version_digests_the_package_sources(monkeypatch, tmp_path):
  version = stages_lib.code_version()
  assert len(version) == 12 and int(version, 16) >= 0
  package = tmp_path / "pkg"
  package.mkdir()
  (package / "a.py").write_text("x = 1\n")
  monkeypatch.setattr(stages_lib, "__file__", str(package / "stages.py"))
  stages_lib.code_version.cache_clear()
  try:
    first = stages_lib.code_version()
    stages_lib.code_version.cache_clear()
    (package / "a.py").write_text("x = 2\n")
    assert stages_lib.code_version() != first
  finally:
    stages_lib.code_version.cache_clear()
  monkeypatch.undo()
  assert stages_lib.code_version() == version


def test_a_stage_records_its_code_and_reuse_by_other_code_warns(monkeypatch, tmp_path):
  warnings = []
  monkeypatch.setattr(logging, "warning", lambda msg, *args: warnings.append(msg % args))
  stages = stages_lib.Stages(str(tmp_path))
  record = stages.run("s", lambda folder: dict(v=1), settings={})
  assert record["code"] == stages_lib.code_version() and not warnings
  assert stages_lib.Stages(str(tmp_path)).run(
      "s", lambda folder: pytest.fail("recomputed"), settings={})["v"] == 1
  assert not warnings  # Same code: reused quietly.
  monkeypatch.setattr(stages_lib, "code_version", lambda: "0123456789ab")
  again = stages_lib.Stages(str(tmp_path)).run(
      "s", lambda folder: pytest.fail("recomputed"), settings={})
  assert again["code"] == record["code"]  # Reused as it is, still naming its code.
  assert len(warnings) == 1 and record["code"] in warnings[0] and "0123456789ab" in warnings[0]


def test_results_name_the_code_of_the_stages():
  one = experiment._code_line({"a": "abc", "b": "abc"})  # pylint: disable=protected-access
  assert one.endswith("`abc`.") and "different" not in one
  mixed = experiment._code_line({"a": "abc", "b": None, "c": "abc"})  # pylint: disable=protected-access
  assert "different code" in mixed and "`abc`: a, c" in mixed and "`unrecorded`: b" in mixed

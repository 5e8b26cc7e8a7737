"""fcp_jax.data.tfds_compat: parquet splits over 100 rows keep every row; the version guard."""

import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

from fcp_jax.data import tfds_builders
from fcp_jax.data import tfds_compat


def _records(n: int, tag: str):
  return [dict(uid=f"{tag}{i}", question=f"What is {i} + {tag}?", response=f"{tag} {i * 7}",
               feedback=dict(reviewer=f"note {i}", user=f"meh {tag}", score=i % 11,
                             correct=i % 2 == 0))
          for i in range(n)]


def _rows(source):
  rows = {}
  for i in range(len(source)):
    row = source[i]
    rows[row["uid"].decode()] = (row["question"].decode(), row["response"].decode(),
                                 row["condition"].decode(), row["kind"].decode(),
                                 int(row["score"]), int(row["correct"]))
  return rows


def _expected(records):
  return {r["uid"]: (r["question"], r["response"], r["feedback"]["reviewer"], "reviewer",
                     r["feedback"]["score"], int(r["feedback"]["correct"]))
          for r in records}


def test_splits_over_100_rows_read_back_whole(tmp_path):
  train, evals = _records(500, "t"), _records(150, "e")
  data_dir = str(tmp_path)
  tfds_builders.build(tfds_builders.TRIPLES, {"train": train, "eval": evals}, data_dir,
                      "round_0", overwrite=True)
  assert file_adapters._batched is tfds_compat._batched  # pylint: disable=protected-access
  for split, records in (("train", train), ("eval", evals)):
    source = tfds_builders.load_source(tfds_builders.TRIPLES, data_dir, "round_0", split)
    assert len(source) == len(records)
    assert _rows(source) == _expected(records)


def test_importing_the_builders_patches_nothing_building_does(tmp_path):
  out = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
      from tensorflow_datasets.core import file_adapters
      tfds_batched = file_adapters._batched
      from fcp_jax.data import tfds_builders, tfds_compat
      print("imported:", file_adapters._batched is tfds_batched)
      tfds_builders.build(tfds_builders.SFT, [dict(question="q", response="r")],
                          {str(tmp_path)!r})
      print("built:", file_adapters._batched is tfds_compat._batched)
  """)], check=True, capture_output=True, text=True).stdout.splitlines()
  marks = [line for line in out if line.startswith(("imported:", "built:"))]
  assert marks == ["imported: True", "built: True"]


def test_batched_keeps_every_item_and_the_fix_is_idempotent():
  assert list(tfds_compat._batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
  tfds_compat.ensure_parquet_writer()
  tfds_compat.ensure_parquet_writer()
  assert file_adapters._batched is tfds_compat._batched


def _changed(iterator, n, *, strict=False):
  del strict
  return iter(())


@pytest.mark.parametrize("replacement", [_changed, None], ids=["signature", "missing"])
def test_unsupported_tfds_version_raises_naming_it(monkeypatch, replacement):
  monkeypatch.setattr(tfds, "__version__", "4.99.0")
  if replacement is None:
    monkeypatch.delattr(file_adapters, "_batched")
  else:
    monkeypatch.setattr(file_adapters, "_batched", replacement)
  with pytest.raises(RuntimeError, match=r"tensorflow_datasets 4\.99\.0.*verified on 4\.9\.10"):
    tfds_compat.ensure_parquet_writer()


def test_unverified_version_with_the_same_signature_is_patched(monkeypatch):
  def tfds_like(iterator, n):
    del iterator, n
    return iter(())

  monkeypatch.setattr(tfds, "__version__", "4.9.99")
  monkeypatch.setattr(file_adapters, "_batched", tfds_like)
  tfds_compat.ensure_parquet_writer()
  assert file_adapters._batched is tfds_compat._batched

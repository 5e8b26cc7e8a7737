"""TFDS datasets of FCP feedback triples and SFT pairs, written as parquet (no TensorFlow).

Two builders, each built into a caller's ``data_dir`` under a caller-chosen config name
(e.g. one per collection round) from a list of records or a JSONL file:

* ``fcp_feedback_triples``: ``uid, question, response, condition, kind, score, correct``
  (``condition`` is the feedback text ``c`` of style ``kind``; ``score`` is -1 and
  ``correct`` is -1 when unknown);
* ``fcp_sft_pairs``: ``uid, question, response`` (e.g. question and reference response
  for the SFT warm-up).

``file_format='parquet'`` lets TFDS build and read without TensorFlow
(``docs/architecture.md``); read back with ``load_source`` (``tfds.data_source``:
random access, picklable, ready for grain). Text fields come back as UTF-8 ``bytes``.
``build`` first fixes TFDS's parquet writer, which drops examples of splits over 100
(``tfds_compat.py``).

Input records (dicts, or JSONL lines validated with file:line errors, see ``jsonl.py``):

* triples: ``{"prompt"|"question", "response", "feedback"[, "score"][, "correct"]
  [, "uid"|"id"][, "kind"]}`` where ``feedback`` is the condition text (``""`` is the
  null condition) or an object with ``user``/``reviewer``/``critique``/``score``/
  ``correct`` (then ``kind``, default ``reviewer``, picks the text);
* SFT pairs: ``{"prompt"|"question", "response"[, "uid"|"id"]}``.

An empty response is an error, as is every other malformed record; with
``on_error="skip"`` such records are skipped and counted in the returned report.
"""

import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow_datasets as tfds

from fcp_jax.data import jsonl
from fcp_jax.data import tfds_compat
from fcp_jax.data.tasks import Example, stable_hash
from fcp_jax.data.tokenizer import SPECIAL_TOKENS
from fcp_jax.feedback.base import CONDITION_KINDS, Feedback


TRIPLES = "fcp_feedback_triples"
SFT = "fcp_sft_pairs"

Records = Union[str, Sequence[Mapping[str, Any]]]

_COMMON_FIELDS = (
    jsonl.Field("question", str, nonempty=True, aliases=("prompt",)),
    jsonl.Field("response", str, nonempty=True),
    jsonl.Field("uid", (str, int), required=False, aliases=("id",)),
)
_TRIPLE_FIELDS = _COMMON_FIELDS + (
    jsonl.Field("feedback", (str, dict)),
    jsonl.Field("score", (int, float), required=False),
    jsonl.Field("correct", bool, required=False),
    jsonl.Field("kind", str, required=False, default="reviewer"),
)


def triple_record(example: Example, question: str, response: str, feedback: Feedback,
                  kind: str = "reviewer") -> Dict[str, Any]:
  """A triples record from collected feedback (``question`` as shown to the policy)."""
  return dict(uid=example.uid, question=question, response=response,
              feedback=feedback.to_dict(), kind=kind)


def _uid(record: Mapping[str, Any]) -> str:
  if record.get("uid") is not None:
    return str(record["uid"])
  return f"{stable_hash(record['question'], record['response']):016x}"


def _check_plain(record: Mapping[str, Any], *names: str):
  """Texts may not contain the chat template's special tokens (they would break it)."""
  for name in names:
    special = next((t for t in SPECIAL_TOKENS if t in record[name]), None)
    if special:
      raise ValueError(f"{name} contains the special token {special!r}")


def _triple(record: Dict[str, Any]) -> Dict[str, Any]:
  """Normalises a validated triples record into the stored features."""
  kind = record["kind"]
  if kind not in CONDITION_KINDS:
    raise ValueError(f"kind must be one of {CONDITION_KINDS}, got {kind!r}")
  fb = record["feedback"]
  score, correct = record["score"], record["correct"]
  if isinstance(fb, dict):
    if not isinstance(fb.get(kind, ""), str):
      raise ValueError(f"feedback.{kind} must be a string")
    condition = fb.get(kind, "")
    score = fb.get("score") if score is None else score
    correct = fb.get("correct") if correct is None else correct
  else:
    condition = fb
  if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                            or not 0 <= score <= 10):
    raise ValueError(f"score must be a number in [0, 10], got {score!r}")
  if correct is not None and not isinstance(correct, bool):
    raise ValueError(f"correct must be a bool, got {correct!r}")
  _check_plain(dict(record, condition=condition), "question", "response", "condition")
  return dict(uid=_uid(record), question=record["question"], response=record["response"],
              condition=condition, kind=kind,
              score=np.int32(-1 if score is None else round(score)),
              correct=np.int32(-1 if correct is None else int(correct)))


def _pair(record: Dict[str, Any]) -> Dict[str, Any]:
  _check_plain(record, "question", "response")
  return dict(uid=_uid(record), question=record["question"], response=record["response"])


def _validated(records: Records, fields, normalize, on_error: str,
               report: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Validates records from a JSONL path or a list; bad ones raise or are counted."""
  if isinstance(records, (str, os.PathLike)):
    path = os.fspath(records)
    rows = jsonl.read_jsonl(path, fields, on_error=on_error, report=report)
    where = [f"{path}:{r['_line']}" for r in rows]
  else:
    report.update(jsonl.new_report(None))
    rows, where = [], []
    for i, obj in enumerate(records):
      report["lines"] += 1
      row, problem = jsonl.validate(obj, fields)
      if problem:
        if on_error == "raise":
          raise ValueError(f"record {i}: {problem[0]}: {problem[1]}")
        jsonl.note_skipped(report, problem[0], f"record {i}: {problem[0]}: {problem[1]}")
        continue
      rows.append(row)
      where.append(f"record {i}")
  out = []
  for row, loc in zip(rows, where):
    try:
      out.append(normalize(row))
    except ValueError as e:
      if on_error == "raise":
        raise ValueError(f"{loc}: invalid value: {e}") from None
      jsonl.note_skipped(report, "invalid value", f"{loc}: invalid value: {e}")
  report["records"] = len(out)
  return out


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose examples are given to the constructor (no download)."""

  VERSION = tfds.core.Version("1.0.0")
  FEATURES: Dict[str, Any] = {}

  def __init__(self, *, splits: Optional[Mapping[str, List[Dict[str, Any]]]] = None,
               **kwargs):
    self._splits = splits or {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self,
                                 features=tfds.features.FeaturesDict(self.FEATURES))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(rows) for name, rows in self._splits.items()}

  def _generate_examples(self, rows: Iterable[Dict[str, Any]]):
    for i, row in enumerate(rows):
      yield i, row


class FcpFeedbackTriples(_RecordsBuilder):
  """(question, response, feedback condition, score, correct) triples."""
  FEATURES = dict(uid=tfds.features.Text(), question=tfds.features.Text(),
                  response=tfds.features.Text(), condition=tfds.features.Text(),
                  kind=tfds.features.Text(), score=np.int32, correct=np.int32)


class FcpSftPairs(_RecordsBuilder):
  """(question, response) pairs for supervised fine-tuning."""
  FEATURES = dict(uid=tfds.features.Text(), question=tfds.features.Text(),
                  response=tfds.features.Text())


_BUILDERS = {TRIPLES: (FcpFeedbackTriples, _TRIPLE_FIELDS, _triple),
             SFT: (FcpSftPairs, _COMMON_FIELDS, _pair)}


def build(dataset: str, records: Union[Records, Mapping[str, Records]], data_dir: str,
          name: str = "default", *, on_error: str = "raise",
          overwrite: bool = False) -> Dict[str, Any]:
  """Builds ``dataset`` (``TRIPLES`` or ``SFT``) as ``<data_dir>/<dataset>/<name>``.

  Args:
    dataset: which builder.
    records: a JSONL path or a list of dicts (one ``train`` split), or a mapping from
      split name to either.
    data_dir: TFDS data dir to write into.
    name: config name distinguishing datasets of one builder (e.g. ``"round_0"``).
    on_error: ``"raise"`` or ``"skip"`` (counted in the report) for bad records.
    overwrite: rebuild if it exists (otherwise an existing dataset raises).

  Returns:
    A report: ``{split: {records, skipped, errors, ...}, "path": dataset dir}``.
  """
  if dataset not in _BUILDERS:
    raise KeyError(f"Unknown dataset {dataset!r}; known: {sorted(_BUILDERS)}.")
  cls, fields, normalize = _BUILDERS[dataset]
  by_split = records if isinstance(records, Mapping) else {"train": records}
  report: Dict[str, Any] = {}
  splits = {}
  for split, recs in by_split.items():
    report[split] = {}
    splits[split] = _validated(recs, fields, normalize, on_error, report[split])
  config = tfds.core.BuilderConfig(name=name, description=f"{dataset} {name}")
  builder = cls(splits=splits, data_dir=data_dir, config=config, file_format="parquet")
  report["path"] = builder.data_dir
  if os.path.exists(builder.data_dir) and not overwrite:
    raise FileExistsError(f"Dataset {builder.data_dir} exists; pass overwrite=True to "
                          "rebuild it.")
  tfds_compat.ensure_parquet_writer()
  tfds.disable_progress_bar()
  mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite else (
      tfds.download.GenerateMode.FORCE_REDOWNLOAD)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(download_mode=mode))
  return report


def load_source(dataset: str, data_dir: str, name: str = "default",
                split: str = "train"):
  """Random-access source of a built dataset (``tfds.data_source``, parquet)."""
  path = os.path.join(data_dir, dataset, name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No built dataset at {path}; build it with "
                            f"tfds_builders.build({dataset!r}, ...).")
  return tfds.builder_from_directory(_latest_version_dir(path)).as_data_source(split=split)


def _latest_version_dir(path: str) -> str:
  versions = [d for d in os.listdir(path) if os.path.isfile(
      os.path.join(path, d, "dataset_info.json"))]
  if not versions:
    raise FileNotFoundError(f"{path} has no complete version (was the build interrupted?)")
  return os.path.join(path, max(versions, key=lambda v: tuple(map(int, v.split(".")))))

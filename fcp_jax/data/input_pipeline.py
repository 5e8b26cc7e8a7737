"""A resumable grain pipeline from (question, [condition], response) records to batches.

Steps: length scan (host, once) -> per-process shard -> seeded shuffle (different every
epoch) -> repeat -> format + tokenize (``chat.encode_example``) -> pad each sequence to
``max_len`` or pack several per row -> batch -> optional worker processes. Reading runs
on ``read_threads`` threads, ``prefetch`` elements ahead (grain's defaults of 16 threads
and 500 elements are too much for small machines).

Batches are dicts of numpy arrays::

    tokens       [B, T] int32    token ids, ``tokenizer.pad_id`` on padding
    positions    [B, T] int32    position inside each sequence (restarts per segment)
    segment_ids  [B, T] int32    1, 2, ... per packed sequence; 0 = padding
    loss_mask    [B, T] float32  1 where token t is a *target*: a response token (or the
                                 closing <|im_end|>) to be predicted from tokens < t
    score        [B, T] float32  (triples only) the feedback score of the token's
                                 sequence, -1 when unknown, 0 on padding

Loss-mask convention: ``loss_mask[t]`` marks token ``t`` itself, so a trainer takes
``logits[:, :-1]`` against ``tokens[:, 1:]`` weighted by ``loss_mask[:, 1:]``. The
first token of every packed segment is ``<|im_start|>`` (mask 0), so no target is ever
predicted across a segment boundary.

Records come from any random-access source (``tfds_builders.load_source``, a list of
dicts): ``question`` and ``response`` (str or UTF-8 bytes), ``condition`` when
``condition="record"``, optional ``score``. ``condition`` chooses the prompt form by
name (``CONDITION_MODES``): the record's feedback text, the null condition ``<EF></EF>``,
or no wrapper (plain SFT).

Too long: a sequence over ``max_len`` is truncated at the end (``overflow="truncate"``)
or dropped (``"drop"``); one whose prompt alone leaves no room for a response token is
always dropped. Shards are made equal (``even_shards``) by dropping at most
``shard_count - 1`` examples. The host-side scan counts every one of these in
``Pipeline.report``: nothing is dropped silently.

Sharding: process ``shard_index`` of ``shard_count`` (default ``jax.process_index()`` /
``jax.process_count()``) reads kept examples ``shard_index::shard_count``: shards are
disjoint and cover the data. Resuming: ``it = iter(pipeline)``; ``state =
it.get_state()``; later ``it = iter(pipeline); it.set_state(state)`` yields exactly the
batches that would have followed (``grain.checkpoint`` stores the state with orbax).
"""

from typing import Any, Dict, Optional, Sequence

from absl import logging
import grain
import numpy as np

from fcp_jax.data import chat

OVERFLOW = ("truncate", "drop")


def _text(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return _text(value.item())
  return value


def _record_condition(record: Dict[str, Any]) -> Optional[str]:
  if "condition" not in record:
    raise KeyError("condition='record' needs a 'condition' field in every record; "
                   "use condition='null' or 'none' for SFT pairs.")
  return _text(record["condition"])


def _null_condition(record: Dict[str, Any]) -> Optional[str]:
  del record
  return ""


def _no_condition(record: Dict[str, Any]) -> Optional[str]:
  del record
  return None


# How the prompt's condition is chosen (module-level functions: picklable for workers).
CONDITION_MODES = {"record": _record_condition, "null": _null_condition,
                   "none": _no_condition}


class Tokenize(grain.transforms.Map):
  """Record -> ``{"tokens": [L] int32, "loss_mask": [L] float32[, "score": [L]]}``.

  Sequences longer than ``max_len`` are cut at the end (the pipeline's length scan has
  already dropped those that must be dropped).
  """

  def __init__(self, tokenizer, *, condition: str = "record",
               system: Optional[str] = chat.DEFAULT_SYSTEM, max_len: int,
               with_score: bool = False):
    if condition not in CONDITION_MODES:
      raise KeyError(f"Unknown condition mode {condition!r}; known: "
                     f"{sorted(CONDITION_MODES)}.")
    self.tokenizer, self.condition, self.system = tokenizer, condition, system
    self.max_len, self.with_score = max_len, with_score

  def encode(self, record: Dict[str, Any]):
    """Full ``(tokens, loss_mask)`` lists of a record, before any truncation."""
    return chat.encode_example(
        self.tokenizer, _text(record["question"]), CONDITION_MODES[self.condition](record),
        _text(record["response"]), system=self.system)

  def map(self, record: Dict[str, Any]) -> Dict[str, np.ndarray]:
    tokens, mask = self.encode(record)
    out = {"tokens": np.asarray(tokens[:self.max_len], np.int32),  # [L]
           "loss_mask": np.asarray(mask[:self.max_len], np.float32)}  # [L]
    if self.with_score:
      score = float(np.asarray(record.get("score", -1)))
      out["score"] = np.full(len(out["tokens"]), score, np.float32)  # [L]
    return out


class PadToLength(grain.transforms.Map):
  """One sequence -> one row of ``max_len`` (segment id 1 on tokens, 0 on padding)."""

  def __init__(self, max_len: int, pad_id: int):
    self.max_len, self.pad_id = max_len, pad_id

  def map(self, example: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    row = chat.pad_rows([(example["tokens"], example["loss_mask"])], self.pad_id,
                        self.max_len)
    out = {k: row[k][0] for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    if "score" in example:
      score = np.zeros(self.max_len, np.float32)  # [T]
      score[:len(example["score"])] = example["score"]
      out["score"] = score
    return out


class FinishPacked(grain.transforms.Map):
  """Renames grain's packing outputs to ``tokens/positions/segment_ids/...``."""

  def map(self, packed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    out = {"tokens": packed["tokens"],  # [T]
           "positions": packed["tokens_positions"],  # [T]
           "segment_ids": packed["tokens_segment_ids"],  # [T]
           "loss_mask": packed["loss_mask"]}  # [T]
    if "score" in packed:
      out["score"] = packed["score"]  # [T]
    return out


class _Subset:
  """``source[indices[i]]``: a picklable random-access view."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    return self.source[int(self.indices[i])]


class Pipeline:
  """A configured grain pipeline; iterate it for batches, read ``report`` for counts."""

  def __init__(self, source: Sequence[Dict[str, Any]], tokenizer, *, batch_size: int,
               max_len: int, condition: str = "record",
               system: Optional[str] = chat.DEFAULT_SYSTEM, pack: bool = False,
               overflow: str = "truncate", shuffle: bool = True, seed: int = 0,
               num_epochs: Optional[int] = 1, shard_index: Optional[int] = None,
               shard_count: Optional[int] = None, even_shards: bool = True,
               drop_remainder: bool = True, num_workers: int = 0,
               read_threads: int = 2, prefetch: int = 64):
    if overflow not in OVERFLOW:
      raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}.")
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index {shard_index} not in [0, {shard_count}).")
    with_score = len(source) > 0 and "score" in source[0]
    self.tokenize = Tokenize(tokenizer, condition=condition, system=system,
                             max_len=max_len, with_score=with_score)
    kept, self.report = self._scan(source, max_len, overflow)
    if even_shards:
      usable = len(kept) - len(kept) % shard_count
      self.report["dropped_for_even_shards"] = len(kept) - usable
      kept = kept[:usable]
    shard = kept[shard_index::shard_count]
    self.report.update(shard_index=shard_index, shard_count=shard_count,
                       shard_size=len(shard))
    if len(shard) == 0:
      raise ValueError(f"Shard {shard_index}/{shard_count} is empty: {self.report}.")

    ds = grain.MapDataset.source(_Subset(source, shard))
    if shuffle:
      ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(self.tokenize)
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    if pack:
      keys = ("tokens", "loss_mask") + (("score",) if with_score else ())
      lengths = {k: max_len for k in keys}
      ds = grain.experimental.FirstFitPackIterDataset(
          ds.to_iter_dataset(read), length_struct=lengths, num_packing_bins=batch_size,
          seed=seed, shuffle_bins=False,
          padding_struct={k: (tokenizer.pad_id if k == "tokens" else 0) for k in lengths})
      ds = ds.map(FinishPacked())
    else:
      ds = ds.map(PadToLength(max_len, tokenizer.pad_id)).to_iter_dataset(read)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if num_workers:
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self.dataset = ds

  def _scan(self, source, max_len: int, overflow: str):
    """Tokenizes every record once to decide what is kept; returns indices and counts."""
    kept = []
    report = dict(total=len(source), kept=0, truncated=0, dropped_too_long=0,
                  dropped_prompt_too_long=0, max_len=max_len, overflow=overflow)
    for i in range(len(source)):
      try:
        _, mask = self.tokenize.encode(source[i])
      except (KeyError, ValueError, TypeError) as e:
        raise type(e)(f"Pipeline source record {i}: {e}") from None
      prompt_len = mask.index(1)
      if prompt_len >= max_len:
        report["dropped_prompt_too_long"] += 1
      elif len(mask) > max_len and overflow == "drop":
        report["dropped_too_long"] += 1
      else:
        report["truncated"] += len(mask) > max_len
        kept.append(i)
    report["kept"] = len(kept)
    log = logging.warning if report["kept"] < report["total"] or report["truncated"] else (
        logging.info)
    log("Pipeline length scan: %s", report)
    return np.asarray(kept, np.int64), report

  def __iter__(self):
    return iter(self.dataset)

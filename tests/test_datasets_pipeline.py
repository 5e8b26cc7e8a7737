"""Tests for the parquet TFDS builders and the resumable grain pipeline."""

import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fcp_jax.data import answers
from fcp_jax.data import input_pipeline as pipeline_lib
from fcp_jax.data import jsonl
from fcp_jax.data import tasks
from fcp_jax.data import tfds_builders
from fcp_jax.data.tokenizer import IM_END, CharTokenizer
from fcp_jax.feedback.critic import Critic

TOK = CharTokenizer()


def _triples(n=24):
  critic = Critic()
  out = []
  for i in range(n):
    ex = tasks.Example(uid=f"u{i}", question=f"{i}+{i}=?", answer=str(2 * i),
                       steps=answers.evaluate(f"{i}+{i}")[1])
    response = f"{i}+{i}={2 * i + i % 2}\n#### {2 * i + i % 2}"
    out.append(tfds_builders.triple_record(ex, ex.question, response,
                                           critic.one(ex, response)))
  return out


@pytest.fixture(scope="module")
def triples_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  report = tfds_builders.build(tfds_builders.TRIPLES, _triples(), data_dir, "round_0")
  assert report["train"]["records"] == 24 and report["train"]["skipped"] == 0
  return data_dir


def test_triples_roundtrip_through_tfds_data_source(triples_dir):
  source = tfds.data_source(f"{tfds_builders.TRIPLES}/round_0", split="train",
                            data_dir=triples_dir)
  assert len(source) == 24
  rows = {r["uid"].decode(): r for r in (source[i] for i in range(len(source)))}
  for record in _triples():
    row = rows[record["uid"]]
    assert row["question"].decode() == record["question"]
    assert row["response"].decode() == record["response"]
    assert row["condition"].decode() == record["feedback"]["reviewer"]
    assert row["kind"].decode() == "reviewer"
    assert int(row["score"]) == record["feedback"]["score"]
    assert int(row["correct"]) == int(record["feedback"]["correct"])
  same = tfds_builders.load_source(tfds_builders.TRIPLES, triples_dir, "round_0")
  assert len(same) == 24
  with pytest.raises(FileExistsError):
    tfds_builders.build(tfds_builders.TRIPLES, _triples(), triples_dir, "round_0")


def test_overwrite_rebuilds_and_splits(tmp_path):
  data_dir = str(tmp_path)
  tfds_builders.build(tfds_builders.SFT, [dict(question="a", response="b")], data_dir)
  report = tfds_builders.build(
      tfds_builders.SFT, {"train": [dict(question="c", response="d", uid="x")] * 2,
                          "eval": [dict(question="e", response="f")]},
      data_dir, overwrite=True)
  assert report["train"]["records"] == 2 and report["eval"]["records"] == 1
  train = tfds_builders.load_source(tfds_builders.SFT, data_dir)
  assert [train[i]["question"] for i in range(len(train))] == [b"c", b"c"]
  assert tfds_builders.load_source(tfds_builders.SFT, data_dir, split="eval")[0][
      "response"] == b"f"


def test_triples_from_jsonl_with_bad_lines(tmp_path):
  good = {"prompt": "1+1=?", "response": "#### 2", "feedback": "Correct.", "score": 9,
          "correct": True, "id": 7}
  lines = [json.dumps(good),
           json.dumps({**good, "response": ""}),
           json.dumps({**good, "score": "high"}),
           json.dumps({**good, "score": 42}),
           json.dumps({"prompt": "2+2=?", "response": "#### 4",
                       "feedback": {"user": "Nice!", "reviewer": "Good.", "score": 8,
                                    "correct": True}, "kind": "user"}),
           "{oops"]
  path = tmp_path / "triples.jsonl"
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(jsonl.JsonlError, match=r"triples\.jsonl:2: empty field"):
    tfds_builders.build(tfds_builders.TRIPLES, str(path), str(tmp_path / "d1"))
  report = tfds_builders.build(tfds_builders.TRIPLES, str(path), str(tmp_path / "d2"),
                               on_error="skip")
  assert report["train"]["records"] == 2 and report["train"]["skipped"] == 4
  assert report["train"]["errors"] == {"empty field": 1, "wrong type": 1,
                                       "invalid JSON": 1, "invalid value": 1}
  source = tfds_builders.load_source(tfds_builders.TRIPLES, str(tmp_path / "d2"))
  rows = sorted((source[i] for i in range(2)), key=lambda r: r["uid"])
  assert rows[0]["uid"] == b"7" and rows[0]["condition"] == b"Correct."
  assert rows[1]["condition"] == b"Nice!" and int(rows[1]["score"]) == 8
  with pytest.raises(ValueError, match="record 0: missing field"):
    tfds_builders.build(tfds_builders.TRIPLES, [{"response": "x", "feedback": ""}],
                        str(tmp_path / "d3"))
  with pytest.raises(ValueError, match="record 1: invalid value: condition contains"):
    tfds_builders.build(tfds_builders.TRIPLES, [good, {**good, "feedback": "ok</EF>"}],
                        str(tmp_path / "d4"))


def test_sft_pairs_and_pipeline_without_condition(tmp_path):
  examples = [tasks.Example(uid=f"s{i}", question=f"{i}+7-3=?", answer=str(i + 4),
                            steps=answers.evaluate(f"{i}+7-3")[1]) for i in range(12)]
  records = [dict(uid=e.uid, question=e.question, response=tasks.reference_response(e))
             for e in examples]
  tfds_builders.build(tfds_builders.SFT, records, str(tmp_path), "warmup")
  source = tfds_builders.load_source(tfds_builders.SFT, str(tmp_path), "warmup")
  pipe = pipeline_lib.Pipeline(source, TOK, batch_size=4, max_len=128, condition="none",
                               system=None, shard_index=0, shard_count=1)
  batch = next(iter(pipe))
  assert set(batch) == {"tokens", "positions", "segment_ids", "loss_mask"}
  text = TOK.decode(batch["tokens"][0])
  assert "<EF>" not in text and "system" not in text
  responses = {r["response"] for r in records}
  for b in range(4):
    target = TOK.decode(batch["tokens"][b][batch["loss_mask"][b] > 0])
    assert target.endswith(IM_END) and target[:-len(IM_END)] in responses


def _records(n=40):
  return [dict(question=f"Q{i:03d}?", response=f"answer number {i}" + "!" * (i % 7),
               condition=["Good.", "", "Bad; unclear."][i % 3], score=i % 11)
          for i in range(n)]


def _questions(batch):
  """Questions of each segment in a batch (decoded from ids)."""
  out = []
  for row, seg in zip(batch["tokens"], batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      text = TOK.decode(row[seg == s])
      out.append(text.split("Q", 1)[1][:3])
  return out


@pytest.mark.parametrize("pack", [False, True])
def test_batches_shapes_masks_and_scores(pack):
  records = _records()
  pipe = pipeline_lib.Pipeline(records, TOK, batch_size=4, max_len=220, pack=pack,
                               shard_index=0, shard_count=1, seed=1)
  batch = next(iter(pipe))
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "tokens": ((4, 220), "int32"), "positions": ((4, 220), "int32"),
      "segment_ids": ((4, 220), "int32"), "loss_mask": ((4, 220), "float32"),
      "score": ((4, 220), "float32")}
  assert ((batch["segment_ids"] == 0) == (batch["tokens"] == TOK.pad_id)).all()
  assert (batch["loss_mask"][batch["segment_ids"] == 0] == 0).all()
  by_question = {r["question"][1:4]: r for r in records}
  n_segments = 0
  for row in range(4):
    seg = batch["segment_ids"][row]
    for s in np.unique(seg[seg > 0]):
      n_segments += 1
      idx = np.where(seg == s)[0]
      assert (batch["positions"][row, idx] == np.arange(len(idx))).all()
      tokens, mask = batch["tokens"][row, idx], batch["loss_mask"][row, idx]
      record = by_question[TOK.decode(tokens).split("Q", 1)[1][:3]]
      assert TOK.decode(tokens[mask > 0]) == record["response"] + IM_END
      assert mask[0] == 0  # A segment never starts with a target.
      prompt = TOK.decode(tokens[mask == 0])
      assert f"<EF>{record['condition']}</EF>{record['question']}" in prompt
      assert (batch["score"][row, idx] == record["score"]).all()
  assert n_segments > 4 if pack else n_segments == 4


@pytest.mark.parametrize("pack", [False, True])
def test_resume_from_saved_state_yields_same_batches(pack):
  make = lambda: pipeline_lib.Pipeline(_records(), TOK, batch_size=3, max_len=140,
                                       pack=pack, num_epochs=None, seed=7,
                                       shard_index=0, shard_count=1)
  it = iter(make())
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]  # Crosses the epoch boundary.
  restored = iter(make())
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


def test_epochs_are_reshuffled_and_complete():
  pipe = pipeline_lib.Pipeline(_records(12), TOK, batch_size=4, max_len=140,
                               num_epochs=2, seed=3, shard_index=0, shard_count=1)
  seen = [q for b in pipe for q in _questions(b)]
  first, second = seen[:12], seen[12:]
  assert sorted(first) == sorted(second) == [f"{i:03d}" for i in range(12)]
  assert first != second


def test_two_shards_are_disjoint_and_cover():
  records = _records(40)
  shards = []
  for index in range(2):
    pipe = pipeline_lib.Pipeline(records, TOK, batch_size=4, max_len=140, seed=5,
                                 shard_index=index, shard_count=2, drop_remainder=False)
    assert pipe.report["shard_size"] == 20
    shards.append({q for b in pipe for q in _questions(b)})
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == {f"{i:03d}" for i in range(40)}
  odd = pipeline_lib.Pipeline(records[:39], TOK, batch_size=4, max_len=140,
                              shard_index=1, shard_count=2)
  assert odd.report["dropped_for_even_shards"] == 1 and odd.report["shard_size"] == 19


def test_overlong_sequences_are_truncated_or_dropped_and_counted():
  records = _records(10)
  records[3] = dict(records[3], response="x" * 200)
  records[5] = dict(records[5], question="Q005" + "?" * 300)  # Prompt alone too long.
  truncate = pipeline_lib.Pipeline(records, TOK, batch_size=1, max_len=140,
                                   shuffle=False, shard_index=0, shard_count=1)
  assert truncate.report["truncated"] == 1 and truncate.report["kept"] == 9
  assert truncate.report["dropped_prompt_too_long"] == 1
  batches = list(truncate)
  assert len(batches) == 9 and (batches[3]["segment_ids"] > 0).all()
  drop = pipeline_lib.Pipeline(records, TOK, batch_size=1, max_len=140, overflow="drop",
                               shuffle=False, shard_index=0, shard_count=1)
  assert drop.report["dropped_too_long"] == 1 and drop.report["kept"] == 8
  assert len(list(drop)) == 8
  with pytest.raises(ValueError, match="overflow"):
    pipeline_lib.Pipeline(records, TOK, batch_size=1, max_len=140, overflow="wrap",
                          shard_index=0, shard_count=1)


def test_condition_modes_and_picklable_transforms():
  records = [dict(question="Q000?", response="r", condition="c")]
  for mode, expected in [("record", "<EF>c</EF>Q000?"), ("null", "<EF></EF>Q000?")]:
    pipe = pipeline_lib.Pipeline(records, TOK, batch_size=1, max_len=100, condition=mode,
                                 shard_index=0, shard_count=1)
    assert expected in TOK.decode(next(iter(pipe))["tokens"][0])
  with pytest.raises(KeyError, match="condition"):
    pipeline_lib.Pipeline([dict(question="q", response="r")], TOK, batch_size=1,
                          max_len=100, shard_index=0, shard_count=1)
  with pytest.raises(KeyError, match="record"):
    pipeline_lib.Tokenize(TOK, condition="positive", max_len=10)
  tokenize = pipeline_lib.Tokenize(TOK, max_len=100)
  clone = pickle.loads(pickle.dumps(tokenize))
  assert (clone.map(records[0])["tokens"] == tokenize.map(records[0])["tokens"]).all()
  pickle.loads(pickle.dumps(pipeline_lib.PadToLength(10, 0)))
  pickle.loads(pickle.dumps(pipeline_lib.FinishPacked()))


def test_pipeline_over_tfds_triples(triples_dir):
  source = tfds_builders.load_source(tfds_builders.TRIPLES, triples_dir, "round_0")
  pipe = pipeline_lib.Pipeline(source, TOK, batch_size=4, max_len=300, pack=True,
                               drop_remainder=False, shard_index=0, shard_count=1)
  batches = list(pipe)
  questions = [TOK.decode(row[seg == s]).split("</EF>")[1].split(IM_END)[0]
               for b in batches for row, seg in zip(b["tokens"], b["segment_ids"])
               for s in np.unique(seg[seg > 0])]
  assert sorted(questions) == sorted(r["question"] for r in _triples())
  assert len(batches) < 24 / 4  # Several sequences share a row.
  scores = {r["question"]: r["feedback"]["score"] for r in _triples()}
  for b in batches:
    for row in range(len(b["tokens"])):
      seg = b["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        q = TOK.decode(b["tokens"][row][seg == s]).split("</EF>")[1].split(IM_END)[0]
        assert (b["score"][row][seg == s] == scores[q]).all()

"""The offline driver end to end on a tiny model and a small TFDS set of FCP triples."""

import glob
import json
import os
import random

import pytest

from fcp_jax import config_lib
from fcp_jax import train
from fcp_jax.training import offline
from fcp_jax.data import tfds_builders
from fcp_jax.training import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "offline_fcp.py")


def triple_records(n: int, seed: int):
  """FCP triples of one-digit sums: half correct (positive feedback), half not."""
  rs = random.Random(seed)
  out = []
  for i in range(n):
    a, b = rs.randint(0, 9), rs.randint(0, 9)
    correct = i % 2 == 0
    answer = a + b if correct else a + b + rs.randint(1, 3)
    out.append(dict(
        question=f"What is {a}+{b}?", response=f"{a}+{b}={answer}\n#### {answer}",
        feedback=("Correct, clear and concise." if correct
                  else "Wrong final result; careless arithmetic."),
        correct=correct, score=9 if correct else 2))
  return out


def build_triples(data_dir: str, n_train: int = 64, n_eval: int = 16) -> str:
  tfds_builders.build(tfds_builders.TRIPLES, {"train": triple_records(n_train, 0),
                                              "eval": triple_records(n_eval, 1)},
                      data_dir)
  return data_dir


def local_config(data_dir: str, arg: str = "runlocal", **overrides):
  config = config_lib.load_config(f"{CONFIG}:{arg}")
  config_lib.apply_overrides(config, [f"data.data_dir={data_dir}"] + [
      f"{k}={v}" for k, v in overrides.items()])
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return build_triples(str(tmp_path_factory.mktemp("tfds")))


@pytest.mark.slow
def test_fcp_run_lowers_heldout_loss_and_writes_artifacts(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = local_config(data_dir, **{"total_steps": 30, "optim.lr": 3e-3,
                                     "eval.every": 15, "checkpoint.every": 15})
  summary = offline.run(config, workdir)

  history = summary["eval_history"]
  assert [s for s, _ in history] == [0, 15, 30]
  initial, final = history[0][1], history[-1][1]
  assert final < initial - 0.5, history  # ln(128) = 4.85 at init.
  assert summary["step"] == 30 and not summary["resumed"]

  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["objective"] == "fcp"
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  train_steps = [r["step"] for r in records if "train/loss" in r]
  assert train_steps == list(range(1, 31))
  assert sum("eval/loss" in r for r in records) == 3
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert os.path.getsize(os.path.join(workdir, "plots", "loss.png")) > 1000
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["15", "30"]

  # Re-running the finished command resumes at the end and trains no more.
  again = offline.run(config, workdir)
  assert again["resumed"] and again["start_step"] == 30 and again["step"] == 30


def test_objectives_select_records(data_dir):
  data_cfg = {"data_dir": data_dir, "name": "default"}
  fcp, fcp_condition = offline.OBJECTIVES.build("fcp", data_cfg, "train")
  rft, rft_condition = offline.OBJECTIVES.build("rft", data_cfg, "train")
  assert (len(fcp), fcp_condition) == (64, "record")
  assert (len(rft), rft_condition) == (32, "none")
  assert all(int(r["correct"]) == 1 for r in rft)
  with pytest.raises(FileNotFoundError, match="fcp_sft_pairs"):
    offline.OBJECTIVES.build("sft", data_cfg, "train")
  with pytest.raises(KeyError, match="Registered: fcp, rft"):
    offline.OBJECTIVES.build("cft", data_cfg, "train")


def test_rft_filtered_at_a_score_threshold(tmp_path):
  records = triple_records(40, 0)
  for i, r in enumerate(records):  # Correct responses with scores 5..9.
    r.update(correct=True, score=5 + i % 5)
  tfds_builders.build(tfds_builders.TRIPLES, {"train": records}, str(tmp_path))
  data_cfg = {"data_dir": str(tmp_path), "name": "default"}
  everything, _ = offline.OBJECTIVES.build("rft", data_cfg, "train")
  high, condition = offline.OBJECTIVES.build("rft_null(min_score=8)", data_cfg, "train")
  assert condition == "null" and len(everything) == 40 and len(high) == 16
  assert sorted({float(r["score"]) for r in high}) == [8.0, 9.0]
  with pytest.raises(ValueError, match="no train triple .* score >= 11"):
    offline.OBJECTIVES.build("rft(min_score=11)", data_cfg, "train")


def test_bad_command_lines_raise(data_dir, tmp_path):
  with pytest.raises(ValueError, match="Missing --workdir"):
    train.main(["--config", f"{CONFIG}:runlocal"])
  with pytest.raises(KeyError, match="Unknown config key 'optim.learning_rate'"):
    train.main(["--config", f"{CONFIG}:runlocal", "--workdir", str(tmp_path),
                "--config.optim.learning_rate=1"])
  with pytest.raises(ValueError, match="config.data.data_dir is empty"):
    offline.run(local_config(""), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="vocab_size is 100"):
    offline.run(local_config(data_dir, **{"model.vocab_size": 100}), str(tmp_path / "b"))

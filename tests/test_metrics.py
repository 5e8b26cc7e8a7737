"""Metrics: NaN guard, JSONL/TensorBoard writer with resume, progress, plots."""

import glob
import json
import math
import os

import jax.numpy as jnp
import pytest

from fcp_jax.training import metrics


def test_check_finite_names_step_and_metric():
  metrics.check_finite(3, {"loss": 1.0, "grad_norm": 2.0})
  with pytest.raises(metrics.NonFiniteError, match=r"loss=nan at step 7") as e:
    metrics.check_finite(7, {"grad_norm": math.nan, "loss": math.nan, "lr": 1e-3})
  assert isinstance(e.value, FloatingPointError)
  assert (e.value.step, e.value.name) == (7, "loss")
  with pytest.raises(metrics.NonFiniteError, match=r"grad_norm=inf at step 2"):
    metrics.check_finite(2, {"grad_norm": math.inf, "loss": 0.5})


def test_pending_metrics_raise_at_first_bad_step():
  pending = metrics.PendingMetrics()
  pending.add(1, {"loss": jnp.float32(2.0)})
  pending.add(2, {"loss": jnp.float32(1.5)})
  assert [(s, m["loss"]) for s, m in pending.fetch()] == [(1, 2.0), (2, 1.5)]
  assert len(pending) == 0
  for step, value in ((3, 1.0), (4, jnp.nan), (5, jnp.nan)):
    pending.add(step, {"loss": jnp.float32(value)})
  with pytest.raises(metrics.NonFiniteError) as e:
    pending.fetch()
  assert e.value.step == 4


def test_writer_jsonl_tensorboard_and_resume_truncation(tmp_path):
  workdir = str(tmp_path)
  writer = metrics.MetricWriter(workdir, is_primary=True)
  for step in range(1, 6):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  assert glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert records[1]["train/loss"] == pytest.approx(0.5)

  # A killed run leaves a cut line and records after its last checkpoint (step 3).
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "train/lo')
  writer = metrics.MetricWriter(workdir, resume_step=3, is_primary=True)
  writer.write(4, {"train/loss": 0.3})
  writer.close()
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [(r["step"], r["train/loss"]) for r in records] == [
      (1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, pytest.approx(0.3))]


def test_non_primary_process_writes_nothing(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path / "w"), is_primary=False)
  writer.write(1, {"train/loss": 1.0})
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_plot_curves_writes_pngs(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(1, 11):
      record = {"step": step, "train/loss": 3.0 / step, "train/accuracy": step / 10}
      if step % 5 == 0:
        record["eval/loss"] = 3.5 / step
      f.write(json.dumps(record) + "\n")
  paths = metrics.plot_curves(workdir)
  assert sorted(os.path.basename(p) for p in paths) == ["accuracy.png", "loss.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert metrics.plot_curves(str(tmp_path / "empty")) == []


def test_progress_tokens_per_second_and_eta(monkeypatch):
  clock = iter([100.0, 102.0, 103.0])
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
  progress = metrics.Progress(total_steps=100, start_step=10)
  progress.add_tokens(1000)
  speed = progress.report(20)  # 10 steps, 1000 tokens in 2 s.
  assert speed["tokens_per_s"] == pytest.approx(500.0)
  assert speed["eta_s"] == pytest.approx(80 / 5.0)
  line = progress.line(20, {"loss": 1.23456, "accuracy": 0.5}, speed)
  assert line == "step 20/100 | loss 1.235 | accuracy 0.5 | 500 tok/s | ETA 0m16s"
  assert progress.report(20)["tokens_per_s"] == 0.0

"""Stage workers (``fcp_jax.stage_workers``): every stage runs once, in whichever process
reaches it first, and the experiment's results are those of one process."""

import json
import os
import threading
import time

import jax
import pytest

from fcp_jax import config_lib
from fcp_jax import experiment
from fcp_jax import stage_workers
from fcp_jax import stages as stages_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "arith_fcp.py")


def _steps(stages, calls, seconds):
  """Stages a (slow), b (reads a), c (slow), as ``run_steps`` takes them."""

  def step(name, upstream=()):
    def fn(folder):
      del folder
      calls.append((name, stages.worker))
      time.sleep(seconds)
      return dict(value=name)
    return name, lambda: stages.run(name, fn, settings={},
                                    inputs={u: stages.key(u) for u in upstream})

  return [step("a"), step("b", ("a",)), step("c")]


def test_two_workers_run_each_stage_once_the_first_they_reach(tmp_path):
  calls = []
  workers = [stages_lib.Stages(str(tmp_path / f"w{i}"), store=str(tmp_path / "store"),
                               worker=i) for i in (0, 1)]
  start = threading.Barrier(2)

  def work(stages):
    steps = _steps(stages, calls, seconds=1.0)
    start.wait()
    stage_workers.run_steps(stages, stage_workers.order(steps, [], stages.worker), 2)

  threads = [threading.Thread(target=work, args=(s,)) for s in workers]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  # Worker 0 walks a, b, c and worker 1 c, b, a: each takes the first free stage, skips
  # the one the other is running, and loads what the other finished.
  assert sorted(calls) == [("a", 0), ("b", 0), ("c", 1)] or sorted(calls) == [
      ("a", 0), ("b", 1), ("c", 1)]
  assert len({name for name, _ in calls}) == 3
  for name in "abc":
    records = [s.records[name] for s in workers]
    assert records[0] == records[1] and records[0]["value"] == name
    assert records[0]["worker"] == dict((n, w) for n, w in calls)[name]
  assert workers[0].keys == workers[1].keys and workers[0].wait and workers[1].wait


def test_busy_stage_raises_without_wait_and_blocks_with_it(tmp_path):
  holder = stages_lib.Stages(str(tmp_path / "w0"), store=str(tmp_path / "store"))
  other = stages_lib.Stages(str(tmp_path / "w1"), store=str(tmp_path / "store"), worker=1)
  inside, release = threading.Event(), threading.Event()

  def slow(folder):
    del folder
    inside.set()
    release.wait(10)
    return {}

  thread = threading.Thread(target=holder.run, args=("s", slow), kwargs=dict(settings={}))
  thread.start()
  assert inside.wait(10)
  other.wait = False
  with pytest.raises(stages_lib.StageBusy, match="Stage s is running"):
    other.run("s", lambda folder: pytest.fail("ran a busy stage"), settings={})
  release.set()
  thread.join()
  assert other.run("s", lambda folder: pytest.fail("ran a done stage"),
                   settings={})["worker"] == 0
  with pytest.raises(stages_lib.StageNotReady):
    other.path("never")


def test_steps_waiting_for_a_stage_none_will_run_raise(tmp_path):
  stages = stages_lib.Stages(str(tmp_path), store=str(tmp_path / "store"))
  steps = [("b", lambda: stages.run("b", lambda f: {}, settings={},
                                     inputs={"a": stages.key("a")}))]
  with pytest.raises(RuntimeError, match="b for a"):
    stage_workers.run_steps(stages, steps, 2)
  assert stages.wait
  with pytest.raises(stages_lib.StageNotReady):  # Alone: in order, nothing to wait for.
    stage_workers.run_steps(stages, steps, 1)


def test_resolve_counts_and_refusals(monkeypatch):
  assert jax.default_backend() == "cpu"
  monkeypatch.setattr(os, "cpu_count", lambda: 2)
  assert stage_workers.resolve(0) == 2 and stage_workers.resolve(3) == 3
  monkeypatch.setattr(os, "cpu_count", lambda: 1)
  assert stage_workers.resolve(0) == 1 and stage_workers.resolve(1) == 1
  for bad in (-1, "2", 1.5, True):
    with pytest.raises(ValueError, match="config.stage_workers"):
      stage_workers.resolve(bad)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert stage_workers.resolve(0) == 1
  with pytest.raises(ValueError, match=r"config.stage_workers=2 .* on gpu"):
    stage_workers.resolve(2)


@pytest.mark.slow
def test_pipeline_with_two_workers_equals_one(tmp_path):
  """The tiny pipeline (three methods) in two processes: the same stage keys and the
  same evaluations, bitwise, as in one; the helper exits cleanly."""
  out = {}
  for workers in (1, 2):
    config = config_lib.load_config(f"{CONFIG}:runlocal")
    config_lib.apply_overrides(config, [f"stage_workers={workers}",
                                        "methods=('warmup', 'offline_fcp', 'grpo')"])
    out[workers] = experiment.run(config, str(tmp_path / f"w{workers}"))
  one, two = out[1], out[2]
  assert two["stage_workers"] == dict(count=2, exit_codes=[0])
  assert one["stage_workers"] == dict(count=1, exit_codes=[])
  assert two["stage_keys"] == one["stage_keys"] and two["eval"] == one["eval"]
  ran_by = {}
  for stage in one["stage_keys"]:
    with open(tmp_path / "w2" / stage / stages_lib.DONE) as f:
      ran_by[stage] = json.load(f)["worker"]
  assert set(ran_by.values()) <= {0, 1} and ran_by["data"] == 0
  for stage in ("offline_fcp", "grpo"):  # Training curves too, value for value.
    curves = [(tmp_path / f"w{w}" / stage / "metrics.jsonl").read_text().splitlines()
              for w in (1, 2)]
    strip = lambda lines: [{k: v for k, v in json.loads(l).items()
                            if not k.startswith(("time/", "speed/"))} for l in lines]
    assert strip(curves[0]) == strip(curves[1]), stage

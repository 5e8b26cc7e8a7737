"""The pipeline on two processes (jax.distributed over loopback) equals one process.

Fast: the row split every process applies to a global batch (``distributed.local_rows``).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from fcp_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The float model: a cross-process reduction sums in another order than one process
# does, and the ternary quantizer can turn such last-bit differences into flipped codes.
CONFIG = "configs/arith_fcp.py:runlocal,ternary=False"
STAGES = ("warmup", "offline_fcp", "fcp_bootstrap", "rft", "grpo")

# Imported at start-up by every subprocess (PYTHONPATH): logs each file the process
# opens for writing under FCP_AUDIT_ROOT, once, to FCP_AUDIT_LOG.
SITECUSTOMIZE = """
import os, sys
_root, _log = os.environ.get("FCP_AUDIT_ROOT"), os.environ.get("FCP_AUDIT_LOG")
if _root and _log:
  _seen = set()
  def _hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes)):
      return
    mode, flags = args[1], args[2]
    if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)):
      path = os.path.abspath(os.fsdecode(args[0]))
      if path.startswith(_root) and path not in _seen:
        _seen.add(path)
        with open(_log, "a") as f:
          f.write(path + "\\n")
  sys.addaudithook(_hook)
"""


def _env(tmp_path, devices, **extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(tmp_path / "site"),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **extra)
  return env


def _pipeline(workdir, *flags):
  return [sys.executable, "-m", "fcp_jax.pipeline", "--config", CONFIG, "--workdir",
          str(workdir), "--config.warmup.plots=False", *flags]


def _metrics(workdir, stage):
  with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items()
             if not k.startswith(("speed/", "time/"))} for line in f]


def test_each_process_feeds_its_contiguous_slice_of_the_global_batch(monkeypatch):
  batch = {"tokens": np.arange(12).reshape(6, 2), "mask": np.arange(6)}
  one = distributed.local_rows(batch)  # One process: the whole batch.
  assert one.keys() == batch.keys() and all(one[k] is batch[k] for k in batch)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  slices = []
  for i in range(3):
    monkeypatch.setattr(jax, "process_index", lambda i=i: i)
    assert distributed.is_primary() == (i == 0)
    slices.append(distributed.local_rows(batch))
  np.testing.assert_array_equal(slices[1]["tokens"], [[4, 5], [6, 7]])
  np.testing.assert_array_equal(slices[2]["mask"], [4, 5])
  for k in batch:  # The global batch is the concatenation of the slices, in order.
    np.testing.assert_array_equal(np.concatenate([s[k] for s in slices]), batch[k])
  monkeypatch.setattr(jax, "process_count", lambda: 4)
  with pytest.raises(ValueError, match="6 rows does not split over 4 processes"):
    distributed.local_rows(batch)


@pytest.mark.slow
def test_two_process_pipeline_equals_one_process(tmp_path):
  (tmp_path / "site").mkdir()
  (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
  one, two = tmp_path / "one", tmp_path / "two"
  out = subprocess.run(_pipeline(one), env=_env(tmp_path, 8), cwd=REPO,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      _pipeline(two, "--config.parallel.distributed=True",
                f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"),
      env=_env(tmp_path, 4, FCP_AUDIT_ROOT=str(two), FCP_AUDIT_LOG=str(tmp_path / f"w{i}")),
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"p{i}.log", "w"))
           for i in range(2)]
  for i, p in enumerate(procs):
    assert p.wait(timeout=900) == 0, (tmp_path / f"p{i}.log").read_text()[-4000:]

  # The same stages, the same table.
  a = json.loads((one / "results.json").read_text())
  b = json.loads((two / "results.json").read_text())
  assert a["stage_keys"] == b["stage_keys"]  # The process layout is not part of a key.
  assert a["eval"] == b["eval"]
  for budget in (a["budget"], b["budget"]):  # Wall seconds differ; the rest may not.
    for method in budget["methods"].values():
      method.pop("seconds")
  assert a["budget"] == b["budget"]
  # The same global batches: every logged loss, reward and count agrees.
  for stage in STAGES:
    ma, mb = _metrics(one, stage), _metrics(two, stage)
    assert [r["step"] for r in ma] == [r["step"] for r in mb], stage
    for ra, rb in zip(ma, mb):
      assert ra.keys() == rb.keys(), stage
      np.testing.assert_allclose([ra[k] for k in ra], [rb[k] for k in ra], rtol=1e-5,
                                 atol=1e-5, err_msg=stage)

  # Each question asked once, by process 0: one cache line per question, as on one
  # process.
  def keys(run):
    with open(run / "stages" / "feedback_cache.jsonl") as f:
      return [json.loads(line)["key"] for line in f]
  assert len(keys(two)) == len(set(keys(two)))
  assert set(keys(two)) == set(keys(one))

  # No file written by two processes; process 1 writes only its own checkpoint shards.
  written = [set((tmp_path / f"w{i}").read_text().split()) for i in range(2)]
  assert not written[0] & written[1]
  assert written[1] and all("/checkpoints/" in p and "process_1" in p for p in written[1])
  for name in ("results.md", "results.json.tmp", "config.json.tmp"):
    assert str(two / name) in written[0]

"""Checkpoints whose newest step is damaged: fall back to the previous readable step with
one warning, or fail with one clear error; no flood of asyncio tracebacks."""

import gc
import glob
import logging
import os
import time

import jax
import numpy as np
import pytest

from fcp_jax.training import checkpoint

STEPS = (2, 4, 6)
N_LEAVES = 24  # Enough arrays that a failed read leaves many orbax reads in flight.


class CountingIterator:
  """A data iterator with grain's get_state/set_state protocol."""

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


def _state(step):
  """A TrainState-like dict whose every value depends on ``step``."""
  params = {f"w{i}": jax.random.normal(jax.random.PRNGKey(i), (64, 32)) + 100 * step
            for i in range(N_LEAVES)}
  return {"params": params, "opt": {"mu": jax.tree.map(lambda p: p * 0.5, params)},
          "step": np.int32(step)}


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if np.ndim(x) == 0
                                     else x.dtype,
                                     sharding=getattr(x, "sharding", None)), tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a, b)


def _save_run(directory):
  ckpt = checkpoint.Checkpointer(str(directory), every=2, keep=None, async_save=False)
  it = CountingIterator()
  for step in STEPS:
    it.position = step
    assert ckpt.save(step, _state(step), data_iter=it, extra={"online": {"step": step}})
  ckpt.close()


def _truncate(path):
  size = os.path.getsize(path)
  assert size > 1
  with open(path, "r+b") as f:
    f.truncate(size // 2)


def _truncate_array_files(step_dir):
  """Halves every ocdbt data file of the step's state. (Damaging only one is not enough:
  which arrays share a file depends on orbax's write threads, so a params-only read can
  miss a single damaged file.)"""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                                recursive=True) if os.path.isfile(f)]
  assert files, os.listdir(os.path.join(step_dir, "state"))
  for f in files:
    _truncate(f)


# How a step's files get damaged: half-written array chunks (ocdbt data files), a
# truncated or missing state metadata json, a missing JSON item file, a missing iterator
# file.
DAMAGE = {
    "truncated_array_files": _truncate_array_files,
    "truncated_state_metadata": lambda d: _truncate(os.path.join(d, "state", "_METADATA")),
    "missing_state_metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "missing_json_item": lambda d: os.remove(os.path.join(d, "online", "metadata")),
    "missing_iterator_file": lambda d: os.remove(
        os.path.join(d, "data", "process_0-of-1.json")),
}


def _unreadable_warnings(caplog):
  return [r.getMessage() for r in caplog.records
          if r.levelno == logging.WARNING and "unreadable" in r.getMessage()]


def _settle():
  """Lets the echoes of a failed read (other threads, collected coroutines) arrive."""
  time.sleep(0.3)
  gc.collect()


@pytest.fixture(name="run_dir")
def fixture_run_dir(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_run(directory)
  return directory


def test_intact_latest_restores_newest_without_warning(run_dir, caplog):
  caplog.set_level(logging.WARNING)
  ckpt = checkpoint.Checkpointer(str(run_dir))
  it = CountingIterator()
  restored = ckpt.restore_latest(_abstract(_state(0)), data_iter=it, extra=("online",))
  ckpt.close()
  assert restored.step == 6 and it.position == 6
  assert restored.extra == {"online": {"step": 6}}
  _assert_trees_equal(restored.state, _state(6))
  assert not _unreadable_warnings(caplog)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_to_previous_step(run_dir, damage, caplog, capfd):
  DAMAGE[damage](str(run_dir / "6"))
  caplog.set_level(logging.WARNING)
  ckpt = checkpoint.Checkpointer(str(run_dir), every=2)
  it = CountingIterator()
  restored = ckpt.restore_latest(_abstract(_state(0)), data_iter=it, extra=("online",))
  _settle()

  # State, iterator and extra items all come from step 4.
  assert restored.step == 4 and it.position == 4
  assert restored.extra == {"online": {"step": 4}}
  _assert_trees_equal(restored.state, _state(4))
  warnings = _unreadable_warnings(caplog)
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f"Checkpoint step 6 in {run_dir} is unreadable (")
  assert warnings[0].endswith("falling back to step 4.")
  assert "\n" not in warnings[0]
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Exception ignored" not in err, err[-3000:]

  # The damaged step is moved aside, so the resumed run writes step 6 afresh.
  assert ckpt.all_steps() == [2, 4]
  assert os.path.isdir(run_dir / "6.corrupt")
  it.position = 66
  assert ckpt.save(6, _state(66), data_iter=it, extra={"online": {"step": 66}})
  ckpt.wait()
  again = ckpt.restore_latest(_abstract(_state(0)), data_iter=CountingIterator(),
                              extra=("online",))
  ckpt.close()
  assert again.step == 6 and again.extra == {"online": {"step": 66}}
  _assert_trees_equal(again.state, _state(66))


def test_missing_checkpoint_metadata_is_not_damage(run_dir, caplog):
  """orbax reads a step without its ``_CHECKPOINT_METADATA`` (it only warns): no fallback."""
  os.remove(run_dir / "6" / "_CHECKPOINT_METADATA")
  caplog.set_level(logging.WARNING)
  ckpt = checkpoint.Checkpointer(str(run_dir))
  restored = ckpt.restore_latest(_abstract(_state(0)), data_iter=CountingIterator())
  ckpt.close()
  assert restored.step == 6
  _assert_trees_equal(restored.state, _state(6))
  assert not _unreadable_warnings(caplog)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_all_steps_damaged_is_one_clear_error(run_dir, caplog, capfd):
  for step in STEPS:
    DAMAGE["truncated_array_files"](str(run_dir / str(step)))
  caplog.set_level(logging.WARNING)
  ckpt = checkpoint.Checkpointer(str(run_dir))
  it = CountingIterator()
  with pytest.raises(checkpoint.CorruptCheckpointError) as e:
    ckpt.restore_latest(_abstract(_state(0)), data_iter=it)
  ckpt.close()
  _settle()
  assert isinstance(e.value, RuntimeError)
  message = str(e.value)
  assert f"No readable checkpoint in {run_dir}: tried step(s) [6, 4, 2]" in message
  assert all(f"step {s}: " in message for s in STEPS)
  assert [s for s, _ in e.value.failures] == [6, 4, 2]
  assert it.position == 0  # Never set from a step that failed.
  assert sorted(os.listdir(run_dir)) == ["2", "4", "6"]  # Nothing moved aside.
  warnings = _unreadable_warnings(caplog)
  assert len(warnings) == 3 and warnings[-1].endswith("no older step left.")
  err = capfd.readouterr().err
  assert "Event loop is closed" not in err and "Exception ignored" not in err, err[-3000:]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncated_array_files", "missing_state_metadata"])
def test_restore_params_falls_back_too(tmp_path, damage, caplog):
  workdir = tmp_path / "other_run"
  _save_run(workdir / "checkpoints")
  DAMAGE[damage](str(workdir / "checkpoints" / "6"))
  abstract = _abstract(_state(0)["params"])
  caplog.set_level(logging.WARNING)
  params = checkpoint.restore_params(str(workdir), abstract)
  _settle()
  _assert_trees_equal(params, _state(4)["params"])
  warnings = _unreadable_warnings(caplog)
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f"init_from: checkpoint step 6 in {workdir / 'checkpoints'}")
  assert warnings[0].endswith("falling back to step 4.")
  # Only params are read, on purpose: no orbax warning about the other items.
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
  # Another run's folder is only read: nothing is moved aside.
  assert os.path.isdir(workdir / "checkpoints" / "6")

  # An explicit step does not fall back.
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"tried step\(s\) \[6\]"):
    checkpoint.restore_params(f"{workdir}:6", abstract)
  _assert_trees_equal(checkpoint.restore_params(f"{workdir}:2", abstract),
                      _state(2)["params"])
  for step in (2, 4):
    DAMAGE["truncated_state_metadata"](str(workdir / "checkpoints" / str(step)))
  with pytest.raises(checkpoint.CorruptCheckpointError, match=r"\[6, 4, 2\]"):
    checkpoint.restore_params(str(workdir), abstract)
  _settle()

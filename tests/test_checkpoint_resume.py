"""Checkpoints: orbax round trip with iterator/extra items, half-written steps, init_from,
SIGKILL + rerun bitwise equal to an uninterrupted run, and the NaN guard."""

import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fcp_jax.training import offline as train
from fcp_jax.training import checkpoint
from fcp_jax.training import metrics
from fcp_jax.training import optim
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib
from test_train_driver import CONFIG, REPO, build_triples, local_config  # pylint: disable=g-bad-import-order


class CountingIterator:
  """A data iterator with grain's get_state/set_state protocol."""

  def __init__(self, raw: bool = False):
    self.position, self.raw = 0, raw

  def __next__(self):
    self.position += 1
    return self.position

  def get_state(self):
    return (b"pos=%d" % self.position) if self.raw else {"position": self.position}

  def set_state(self, state):
    self.position = int(state[4:]) if self.raw else state["position"]


@pytest.fixture(scope="module")
def tiny():
  model, model_cfg = state_lib.build_model({"variant": "tiny"})
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(lr=1e-3, weight_decay=0.1)),
                             total_steps=10, model_cfg=model_cfg)
  init_fn = state_lib.make_init_fn(model, opt.tx)
  par = sharding.build({"mode": "mesh", "mesh_shape": (2, 2, 2)})
  specs = state_lib.state_logical_specs(model, opt.tx)
  abstract = sharding.abstract_with_shardings(
      jax.eval_shape(init_fn, jax.random.PRNGKey(0)), par.shardings(specs))
  state = par.create_state(init_fn, jax.random.PRNGKey(1), specs)
  return dict(state=state, abstract=abstract)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a, b)


@pytest.mark.parametrize("raw", [False, True])
def test_round_trip_state_iterator_and_extra(tiny, tmp_path, raw):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=2, keep=2)
  it = CountingIterator(raw)
  for step in range(1, 8):
    next(it)
    state = tiny["state"].replace(step=jnp.int32(step))
    ckpt.save(step, state, data_iter=it, extra={"online": {"cursor": step, "pool": "p"}})
  ckpt.save(7, state, data_iter=it, force=True, extra={"online": {"cursor": 7}})
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]  # every=2 plus the forced save, keep=2.

  fresh = CountingIterator(raw)
  restored = ckpt.restore(6, tiny["abstract"], data_iter=fresh, extra=("online",))
  assert fresh.position == 6 and restored.extra["online"] == {"cursor": 6, "pool": "p"}
  assert int(restored.state.step) == 6
  _assert_trees_equal(restored.state.params, tiny["state"].params)
  # Restored with the abstract target: optax types and shardings come back.
  assert type(restored.state.opt_state) is type(tiny["state"].opt_state)
  kernel = restored.state.params["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding == tiny["state"].params["layers_0"]["mlp"]["up_proj"][
      "kernel"].sharding
  with pytest.raises(ValueError, match="reserved"):
    ckpt.save(8, state, extra={"state": {}})
  ckpt.close()


def test_half_written_step_is_ignored(tiny, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, async_save=False)
  ckpt.save(3, tiny["state"], data_iter=CountingIterator())
  # What a process killed while writing step 9 leaves: a temporary directory.
  shutil.copytree(tmp_path / "3", tmp_path / "9.orbax-checkpoint-tmp-1234")
  os.remove(tmp_path / "9.orbax-checkpoint-tmp-1234" / "commit_success.txt")
  assert ckpt.latest_step() == 3
  it = CountingIterator()
  assert ckpt.restore_latest(tiny["abstract"], data_iter=it).step == 3
  ckpt.close()
  assert checkpoint.Checkpointer(str(tmp_path / "empty")).restore_latest(
      tiny["abstract"]) is None


def test_init_from_reads_only_params(tiny, tmp_path):
  workdir = tmp_path / "other_run"
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), every=1, async_save=False)
  for step in (4, 5):
    params = jax.tree.map(lambda p: p + step, tiny["state"].params)  # pylint: disable=cell-var-from-loop
    ckpt.save(step, tiny["state"].replace(params=params))
  ckpt.close()
  latest = checkpoint.restore_params(str(workdir), tiny["abstract"].params)
  chosen = checkpoint.restore_params(f"{workdir}:4", tiny["abstract"].params)
  _assert_trees_equal(latest, jax.tree.map(lambda p: p + 5, tiny["state"].params))
  _assert_trees_equal(chosen, jax.tree.map(lambda p: p + 4, tiny["state"].params))
  with pytest.raises(FileNotFoundError, match="init_from"):
    checkpoint.restore_params(str(tmp_path / "missing"), tiny["abstract"].params)


# ---------------------------------------------------------------------------------------
# The driver: kill and resume, NaN guard.
# ---------------------------------------------------------------------------------------

TOTAL, EVERY, HANG = 12, 3, 5  # Killed at step 5: last checkpoint 3; 12 steps > 1 epoch.


def _command(workdir, data_dir, kill_at_step=None):
  driver = (["fcp_jax.train"] if kill_at_step is None else
            ["fcp_jax.testing", "fcp_jax.training.offline:run", "step", str(kill_at_step)])
  return [sys.executable, "-m", *driver, "--config", f"{CONFIG}:runlocal",
          "--workdir", workdir, f"--config.data.data_dir={data_dir}",
          f"--config.total_steps={TOTAL}", f"--config.checkpoint.every={EVERY}",
          "--config.log_every=1", "--config.eval.every=4", "--config.plots=False"]


def _env(cache_dir, **extra):
  """Subprocess environment; the three runs share a persistent compilation cache."""
  env = dict(os.environ)
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
  return env


def _final_state(workdir, abstract):
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ckpt.restore(TOTAL, abstract)
  ckpt.close()
  return jax.device_get(restored.state)


def _train_losses(workdir):
  records = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]


@pytest.mark.slow
def test_sigkill_and_rerun_is_bitwise_equal_to_uninterrupted(tmp_path):
  data_dir = build_triples(str(tmp_path / "tfds"))
  cache = str(tmp_path / "jax_cache")
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(_command(straight, data_dir), env=_env(cache), check=True,
                 capture_output=True, timeout=600, cwd=REPO)

  proc = subprocess.run(_command(killed, data_dir, kill_at_step=HANG), env=_env(cache),
                        capture_output=True, timeout=600, cwd=REPO)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert checkpoint.Checkpointer(os.path.join(killed, "checkpoints")).latest_step() == 3
  assert [s for s, _ in _train_losses(killed)] == list(range(1, HANG + 1))

  subprocess.run(_command(killed, data_dir), env=_env(cache), check=True,
                 capture_output=True, timeout=600, cwd=REPO)

  config = local_config(data_dir)
  model, model_cfg = state_lib.build_model(config.model)
  opt = optim.make_optimizer(config.optim, total_steps=TOTAL, model_cfg=model_cfg)
  init_fn = state_lib.make_init_fn(model, opt.tx)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  a, b = _final_state(straight, abstract), _final_state(killed, abstract)
  assert int(a.step) == int(b.step) == TOTAL
  _assert_trees_equal(a.params, b.params)
  _assert_trees_equal(a.opt_state, b.opt_state)
  _assert_trees_equal(a.rng, b.rng)
  # Same batches in the same order: every step's loss is identical.
  assert _train_losses(straight) == _train_losses(killed)
  assert [s for s, _ in _train_losses(killed)] == list(range(1, TOTAL + 1))


@optim.SCHEDULES.register("nan_from")
def _nan_from(progress, *, step: int, total: int):
  """Test-only lr shape: NaN from update number ``step`` (1-based) of ``total`` on."""
  return jnp.where(progress * total >= step - 1 - 1e-3, jnp.nan, 1.0)


@pytest.mark.slow
def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
  data_dir = build_triples(str(tmp_path / "tfds"), n_train=32, n_eval=8)
  workdir = str(tmp_path / "run")
  # The learning rate turns NaN for the update to step 5 (a test-only schedule).
  config = local_config(data_dir, **{"optim.schedule": "nan_from(step=5, total=20)",
                                     "optim.warmup_frac": 0.0, "checkpoint.every": 2,
                                     "eval.every": 0, "log_every": 10})
  with pytest.raises(metrics.NonFiniteError, match=r"=nan at step 5") as e:
    train.run(config, workdir)
  assert e.value.step == 5
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_steps() == [2, 4]  # keep=2; nothing saved at or after step 5.
  model, model_cfg = state_lib.build_model(config.model)
  opt = optim.make_optimizer(config.optim, total_steps=config.total_steps,
                             model_cfg=model_cfg)
  abstract = jax.eval_shape(state_lib.make_init_fn(model, opt.tx), jax.random.PRNGKey(0))
  restored = ckpt.restore_latest(abstract)
  ckpt.close()
  assert restored.step == 4 and int(restored.state.step) == 4
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(restored.state.params))

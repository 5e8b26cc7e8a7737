"""Orbax checkpoints of a run: train state, data-iterator state and extra JSON items.

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), every=100, keep=3)
    restored = ckpt.restore_latest(abstract_state, data_iter=it)   # None on a fresh run
    ...
    ckpt.save(step, state, data_iter=it, extra={"online": {...}})
    ckpt.save(final_step, state, data_iter=it, force=True)
    ckpt.close()

One orbax step directory holds, through ``ocp.args.Composite``:

* ``state``: the ``TrainState`` (``StandardSave``; restored with an abstract target via
  ``StandardRestore`` so optax states keep their types and arrays land with the
  target's shardings);
* ``data``: each process's iterator state (``get_state()``; dict or bytes, as grain's
  iterators return) in ``process_{i}-of-{n}.json``, snapshotted when ``save`` is called;
* any ``extra`` named JSON items (the online loop's step, prompt cursor, RNG, pool
  path...).

A step that was being written when the process died has no commit marker and is
ignored by ``latest_step``; orbax cleans it on the next save. ``restore_params`` reads
only the parameters of another run (``config.init_from``).
"""

import base64
import dataclasses
import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

STATE = "state"
DATA = "data"
RESERVED = (STATE, DATA)


class IteratorStateHandler(ocp.CheckpointHandler):
  """Per-process JSON of a data iterator's ``get_state()`` (dict or bytes)."""

  def _path(self, directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "IteratorSave"):
    state = args.state
    if isinstance(state, bytes):
      record = {"bytes": base64.b64encode(state).decode("ascii")}
    else:
      record = {"json": state}
    self._path(directory).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: "IteratorRestore" = None) -> Any:
    del args
    path = self._path(directory)
    if not path.exists():
      raise FileNotFoundError(
          f"No data-iterator state for process {jax.process_index()} of "
          f"{jax.process_count()} at {path}; was the run saved with another number "
          "of processes?")
    record = json.loads(path.read_text())
    return base64.b64decode(record["bytes"]) if "bytes" in record else record["json"]

  def metadata(self, directory: epath.Path):
    del directory
    return None

  def finalize(self, directory: epath.Path):
    del directory

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  pass


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  extra: Dict[str, Any]


class Checkpointer:
  """One ``ocp.CheckpointManager`` for a run's checkpoints directory.

  Args:
    directory: where the step directories live (created if missing).
    every: save at steps that are multiples of this (0: only ``force=True`` saves).
    keep: how many recent checkpoints to keep (``None`` keeps all).
    async_save: write in a background thread (arrays are copied to host first).
  """

  def __init__(self, directory: str, *, every: int = 1, keep: Optional[int] = 3,
               async_save: bool = True):
    if every < 0:
      raise ValueError(f"Checkpointer: every must be >= 0 (0 = only forced saves), "
                       f"got {every}.")
    self.directory = os.path.abspath(directory)
    self.every = int(every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    """The newest fully written step, or ``None``."""
    self._manager.reload()
    return self._manager.latest_step()

  def all_steps(self) -> Sequence[int]:
    self._manager.reload()
    return self._manager.all_steps()

  def save(self, step: int, state: Any, *, data_iter: Any = None,
           extra: Optional[Mapping[str, Any]] = None, force: bool = False) -> bool:
    """Saves if ``step`` is due (or ``force``); returns whether it saved."""
    if not (force or (self.every and step % self.every == 0)):
      return False
    if step in self._manager.all_steps():
      return False  # Already saved (e.g. a forced final save on an interval step).
    items = {STATE: ocp.args.StandardSave(state)}
    if data_iter is not None:
      items[DATA] = IteratorSave(data_iter.get_state())
    for name, value in (extra or {}).items():
      if name in RESERVED:
        raise ValueError(f"Checkpoint extra item name {name!r} is reserved ({RESERVED}).")
      items[name] = ocp.args.JsonSave(value)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      logging.info("Saving checkpoint at step %d to %s.", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None,
              extra: Sequence[str] = ()) -> Restored:
    """Restores ``step``: state (into ``abstract_state``), iterator, extra items."""
    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items[DATA] = IteratorRestore()
    for name in extra:
      items[name] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    if data_iter is not None:
      data_iter.set_state(out[DATA])
    logging.info("Restored checkpoint of step %d from %s.", step, self.directory)
    return Restored(step=step, state=out[STATE],
                    extra={name: out[name] for name in extra})

  def restore_latest(self, abstract_state: Any, **kwargs) -> Optional[Restored]:
    """``restore(latest_step)``, or ``None`` when there is no complete checkpoint."""
    step = self.latest_step()
    return None if step is None else self.restore(step, abstract_state, **kwargs)

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_checkpoint_dir(path: str) -> str:
  """A run's workdir or its ``checkpoints/`` folder -> the checkpoints folder."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def restore_params(path: str, abstract_params: Any, step: Optional[int] = None) -> Any:
  """Only the parameters of another run's checkpoint (``init_from``).

  Args:
    path: the other run's workdir or checkpoints directory; ``path:STEP`` picks a step.
    abstract_params: ``ShapeDtypeStruct`` tree (with shardings) of this model's params.
    step: the step to read (default: ``STEP`` from the path, else the latest).
  """
  if step is None and ":" in path and path.rsplit(":", 1)[1].isdigit():
    path, step = path.rsplit(":", 1)[0], int(path.rsplit(":", 1)[1])
  directory = resolve_checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from: checkpoint directory {directory!r} not found.")
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"init_from: no complete checkpoint in {directory!r}.")
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    out = manager.restore(step, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                      partial_restore=True)}))
  finally:
    manager.close()
  logging.info("init_from: read params of step %d from %s.", step, directory)
  return out[STATE]["params"]

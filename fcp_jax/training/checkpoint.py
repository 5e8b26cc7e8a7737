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
ignored by ``latest_step``; orbax cleans it on the next save. A committed step that
cannot be read (a truncated array or metadata file, a missing item file) is skipped
with one warning: ``restore_latest`` and ``restore_params`` fall back to the newest
readable step, and raise ``CorruptCheckpointError`` (listing each step tried and its
error) rather than start from scratch when none is readable. ``restore_latest`` moves
the unreadable steps newer than the one it restored aside (``<step>.corrupt``, which
orbax ignores) so the resumed run saves those steps afresh. ``restore_params`` reads
only the parameters of another run (``config.init_from``); ``save_params`` writes a
params-only checkpoint it can read (e.g. a pretrained model imported once). Parameters
the model has and the checkpoint lacks are an error, except the ternary-only ones
(``ternary.QUANT_PARAM_NAMES``: extra-RMSNorm gains, learned scales), which a caller's
``fill_missing`` initialises when a float checkpoint starts a ternary model.
"""

import base64
import contextlib
import dataclasses
import json
import logging as std_logging
import os
import sys
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fcp_jax.models import ternary

STATE = "state"
DATA = "data"
RESERVED = (STATE, DATA)
Path = Tuple[str, ...]  # A parameter's keys, e.g. ("layers", "attn", "q_proj", "kernel").
CORRUPT_SUFFIX = ".corrupt"  # Unreadable steps moved aside: "<step>.corrupt[.<n>]".


class CorruptCheckpointError(RuntimeError):
  """No checkpoint step in a directory could be read.

  Attributes:
    directory: the checkpoints directory.
    failures: ``[(step, error), ...]`` newest first, one per step tried.
  """

  def __init__(self, directory: str, failures: Sequence[Tuple[int, BaseException]],
               what: str = "checkpoint"):
    self.directory = directory
    self.failures = list(failures)
    tried = "; ".join(f"step {step}: {_first_line(e)}" for step, e in self.failures)
    super().__init__(
        f"No readable {what} in {directory}: tried step(s) "
        f"{[step for step, _ in self.failures]}, all failed ({tried}). The files are "
        "truncated, missing or incompatible with this model; restore them or remove "
        "the directory to start afresh.")


def _first_line(error: BaseException, limit: int = 400) -> str:
  """``"Type: first line of the message"`` (and that of its root cause), without the
  TensorStore specs orbax and tensorstore append."""

  def line(e):
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    for cut in (" [tensorstore_spec=", " See full TensorStore details"):
      text = text.split(cut, 1)[0]
    if len(text) > limit:
      text = text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__

  root, seen = error, {id(error)}
  while root.__cause__ is not None and id(root.__cause__) not in seen:
    root = root.__cause__
    seen.add(id(root))
  return line(error) if root is error else f"{line(error)} <- {line(root)}"


# When an orbax read fails, orbax's ``asyncio_utils.run_sync`` closes its private event
# loop while the other reads of that ``asyncio.gather`` are still in flight, and two
# kinds of echoes of the one real error follow, both through ``sys.unraisablehook``:
#
# * each tensorstore read that completes later calls the closed loop's
#   ``call_soon_threadsafe`` from tensorstore's thread: ``RuntimeError('Event loop is
#   closed')``, one bare traceback per read;
# * each abandoned orbax coroutine (``_read_array_index_and_device_put``...) is closed
#   when collected, and orbax's ``except BaseException`` turns the ``GeneratorExit`` into
#   "Encountered error while reading array index" with a full TensorStore spec -- ~60
#   lines per array.
#
# The hook below drops exactly these (counted in ``suppressed_restore_echoes``) and hands
# every other unraisable exception to the hook it wraps. It is (re)installed at every
# checkpoint read, since the echoes arrive on other threads or at garbage collection after
# the read has failed; it is a no-op when nothing fails.
suppressed_restore_echoes = 0


def _is_restore_echo(unraisable) -> bool:
  error = getattr(unraisable, "exc_value", None)
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    tb = getattr(unraisable, "exc_traceback", None) or error.__traceback__
    while tb is not None:
      if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
        return True
      tb = tb.tb_next
    return False
  obj = getattr(unraisable, "object", None)
  code = getattr(obj, "cr_code", None)  # A coroutine collected while pending.
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_restore_echoes():
  """Wraps ``sys.unraisablehook`` to drop the echoes of a failed orbax read (above)."""
  if getattr(sys.unraisablehook, "_fcp_quiet_restore_echoes", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    global suppressed_restore_echoes
    if _is_restore_echo(unraisable):
      suppressed_restore_echoes += 1
      return
    previous(unraisable)

  hook._fcp_quiet_restore_echoes = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


class _UnreadItemsFilter(std_logging.Filter):
  """Drops orbax's "Item X was found in the checkpoint, but could not be restored"
  warnings: ``restore_params`` reads the state item alone on purpose, and orbax warns
  about every other item (the iterator, the JSON extras) when it lists the step's
  metadata."""

  def filter(self, record):
    return "was found in the checkpoint, but could not be restored" not in (
        record.getMessage())


@contextlib.contextmanager
def _other_items_unread():
  logger, quiet = std_logging.getLogger("absl"), _UnreadItemsFilter()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _all_agree(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (a step unreadable on one host is skipped by
  all, so that every host resumes from the same step)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _warn_unreadable(step: int, directory: str, error: BaseException,
                     next_step: Optional[int], what: str = "Checkpoint"):
  then = (f"falling back to step {next_step}." if next_step is not None
          else "no older step left.")
  logging.warning("%s step %d in %s is unreadable (%s); %s", what, step, directory,
                  _first_line(error), then)


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
    """Restores ``step``: state (into ``abstract_state``), iterator, extra items.

    All items of the step are read together (one ``Composite`` restore); the iterator's
    state is set only once they all have been read, so it always matches the state.
    """
    _quiet_restore_echoes()
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
    """The newest readable step (``restore``), or ``None`` when there is no checkpoint.

    Steps are tried newest first. A step whose files cannot be read (any error while
    restoring it) is reported in one warning and the previous step is tried; the
    unreadable steps newer than the one restored are then moved aside
    (``<step>.corrupt``) so that the resumed run writes them afresh.

    Raises:
      CorruptCheckpointError: there are committed steps but none could be read.
    """
    steps = sorted(self.all_steps(), reverse=True)
    failures: List[Tuple[int, BaseException]] = []
    for i, step in enumerate(steps):
      error = None
      try:
        restored = self.restore(step, abstract_state, **kwargs)
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
      if _all_agree(error is None):
        self._quarantine([s for s, _ in failures])
        return restored
      if error is None:
        error = RuntimeError("unreadable on another process")
      failures.append((step, error))
      _warn_unreadable(step, self.directory, error,
                       steps[i + 1] if i + 1 < len(steps) else None)
    if failures:
      raise CorruptCheckpointError(self.directory, failures) from failures[0][1]
    return None

  def _quarantine(self, steps: Sequence[int]):
    """Renames the unreadable ``steps`` to ``<step>.corrupt`` (ignored by orbax)."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        source = os.path.join(self.directory, str(step))
        target, n = source + CORRUPT_SUFFIX, 0
        while os.path.exists(target):
          n += 1
          target = f"{source}{CORRUPT_SUFFIX}.{n}"
        try:
          os.rename(source, target)
          logging.info("Moved the damaged checkpoint step %d aside to %s.", step, target)
        except OSError as e:
          logging.warning("Could not move the damaged checkpoint step %d aside (%s).",
                          step, _first_line(e))
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("fcp_jax_checkpoint_quarantine")
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def resolve_checkpoint_dir(path: str) -> str:
  """A run's workdir or its ``checkpoints/`` folder -> the checkpoints folder."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def _fmt(path: Path) -> str:
  return "/".join(path)


def _leaves(tree: Any, prefix: Path = ()) -> Dict[Path, Any]:
  """``{path: leaf}`` of a tree of nested mappings (any leaf type)."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_leaves(v, prefix + (str(k),)))
    return out
  return {prefix: tree}


def _without(tree: Mapping[str, Any], drop: Sequence[Path]) -> Dict[str, Any]:
  """A copy of nested mappings ``tree`` without the leaves at ``drop``."""
  drop_here = {p[0] for p in drop if len(p) == 1}
  out = {}
  for k, v in tree.items():
    if k in drop_here:
      continue
    below = [p[1:] for p in drop if len(p) > 1 and p[0] == k]
    out[k] = _without(v, below) if below else v
  return out


def save_params(path: str, params: Any, step: int = 0) -> str:
  """Writes ``params`` as run ``path``'s checkpoint ``step`` (read by ``restore_params``).

  The layout is that of a training run (``path/checkpoints/<step>/state/params``), so
  ``config.init_from=path`` starts a run from these parameters. Returns the
  checkpoints directory.
  """
  ckpt = Checkpointer(os.path.join(path, "checkpoints"), every=0, keep=1,
                      async_save=False)
  try:
    ckpt.save(step, {"params": params}, force=True)
  finally:
    ckpt.close()
  return ckpt.directory


def _stored_params(meta: Any, step: int, directory: str) -> Dict[Path, Any]:
  """``{path: ArrayMetadata}`` of the params in checkpoint ``step``'s item metadata."""
  tree = getattr(meta[STATE], "tree", None) if meta is not None else None
  if not isinstance(tree, Mapping) or "params" not in tree:
    raise ValueError(f"init_from: checkpoint {step} in {directory!r} holds no 'params' "
                     "(not a training run's checkpoint?).")
  return _leaves(tree["params"])


def restore_params(path: str, abstract_params: Any, step: Optional[int] = None, *,
                   fill_missing: Optional[Callable[[Any], Any]] = None) -> Any:
  """Only the parameters of another run's checkpoint (``init_from``).

  Args:
    path: the other run's workdir or checkpoints directory; ``path:STEP`` picks a step.
    abstract_params: ``ShapeDtypeStruct`` tree (with shardings) of this model's params.
    step: the step to read (default: ``STEP`` from the path, else the latest).
    fill_missing: ``params -> params`` completing a tree that lacks only ternary-only
      parameters (``ternary.QUANT_PARAM_NAMES``), e.g.
      ``ternary_training.fill_quant_params`` when a float checkpoint starts an
      extra-RMSNorm ternary model. Its output is placed with ``abstract_params``'
      shardings.

  Raises:
    FileNotFoundError: no such directory or no complete checkpoint in it.
    ValueError: a parameter's stored shape differs from the model's, or the model has
      parameters the checkpoint lacks (other than ternary-only ones with
      ``fill_missing``). Parameters the checkpoint has and the model lacks (a ternary
      checkpoint read by a float model) are ignored.
    CorruptCheckpointError: no step could be read. Without an explicit step, an
      unreadable newest step (truncated or missing files) is skipped with one warning
      and the previous one is read, as ``Checkpointer.restore_latest`` does.
  """
  if step is None and ":" in path and path.rsplit(":", 1)[1].isdigit():
    path, step = path.rsplit(":", 1)[0], int(path.rsplit(":", 1)[1])
  directory = resolve_checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from: checkpoint directory {directory!r} not found.")
  _quiet_restore_echoes()
  manager = ocp.CheckpointManager(os.path.abspath(directory),
                                  item_handlers={STATE: ocp.PyTreeCheckpointHandler()})
  wanted = _leaves(abstract_params)
  failures: List[Tuple[int, BaseException]] = []
  try:
    if step is None:
      steps = sorted(manager.all_steps(), reverse=True)
      if not steps:
        raise FileNotFoundError(f"init_from: no complete checkpoint in {directory!r}.")
    else:
      steps = [step]
    for i, step in enumerate(steps):
      # Reading a step's metadata or arrays may fail (truncated or missing files): then
      # the previous step is tried. A readable step whose params do not fit the model
      # is an error straight away.
      error, meta = None, None
      try:
        with _other_items_unread():
          meta = manager.item_metadata(step)
        item_dir = os.path.join(directory, str(step), STATE)
        if (meta is None or STATE not in meta or meta[STATE] is None) and os.path.isdir(
            item_dir):  # orbax gives None for an item whose metadata file is missing.
          raise FileNotFoundError(f"No readable metadata in {item_dir}.")
      except Exception as e:  # pylint: disable=broad-exception-caught
        error = e
      if error is None:
        stored = _stored_params(meta, step, directory)
        bad = [f"{_fmt(p)}: checkpoint {tuple(stored[p].shape)}, model {tuple(w.shape)}"
               for p, w in wanted.items()
               if p in stored and tuple(stored[p].shape) != tuple(w.shape)]
        if bad:
          raise ValueError(f"init_from: {len(bad)} parameter shapes of {directory!r} "
                           f"(step {step}) differ from the model's: {bad[:6]}.")
        missing = sorted(p for p in wanted if p not in stored)
        others = [_fmt(p) for p in missing if p[-1] not in ternary.QUANT_PARAM_NAMES]
        if others or (missing and fill_missing is None):
          raise ValueError(
              f"init_from: checkpoint {directory!r} (step {step}) lacks {len(missing)} "
              f"parameters of the model, e.g. "
              f"{(others or [_fmt(p) for p in missing])[:6]}"
              + ("" if others else "; these are ternary-only parameters, which a caller "
                 "fills with fill_missing "
                 "(e.g. ternary_training.fill_quant_params)") + ".")
        target = {"params": _without(abstract_params, missing)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
          out = manager.restore(step, args=ocp.args.Composite(**{
              STATE: ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                            partial_restore=True)}))
        except Exception as e:  # pylint: disable=broad-exception-caught
          error = e
      if _all_agree(error is None):
        break
      failures.append((step, error or RuntimeError("unreadable on another process")))
      _warn_unreadable(step, directory, failures[-1][1],
                       steps[i + 1] if i + 1 < len(steps) else None,
                       what="init_from: checkpoint")
    else:
      raise CorruptCheckpointError(directory, failures, what="init_from checkpoint"
                                   ) from failures[0][1]
  finally:
    manager.close()
  logging.info("init_from: read params of step %d from %s.", step, directory)
  params = out[STATE]["params"]
  if not missing:
    return params
  params = fill_missing(params)
  filled = _leaves(params)
  if set(filled) != set(wanted):
    raise ValueError(f"init_from: fill_missing returned a different tree; differs at "
                     f"{[_fmt(p) for p in sorted(set(filled) ^ set(wanted))][:6]}.")
  params = jax.tree.map(
      lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), getattr(a, "sharding", None)),
      params, abstract_params)
  logging.info("init_from: %d parameters absent from the checkpoint were initialised "
               "by fill_missing (ternary-only: %s).", len(missing),
               sorted({p[-1] for p in missing}))
  return params

"""Stages of an experiment, keyed by what they consumed.

A stage's key is the sha256 of its name, its settings (the resolved config it ran
with, as JSON, minus ``NON_SEMANTIC`` keys) and its inputs (the keys of the stages it
reads, digests of the data it reads). Its outputs live in ``<store>/<name>/<key>/``,
and ``<workdir>/<name>`` is a link to the folder of the key that the workdir's current
config resolves to. So:

* a re-run with the same config finds each stage's ``stage_done.json`` and skips it;
  an interrupted stage resumes in its own folder (from its checkpoints);
* a changed setting changes the key of every stage that reads it and, through their
  inputs, of every stage downstream: those run anew in folders of their own, while the
  stages upstream of the change are reused;
* stages of equal keys are shared: workdirs that point at one store (a sweep's arms)
  reuse each other's warm-up and collection. A lock file serialises two processes that
  reach the same stage at once; with ``wait=False`` the second raises ``StageBusy``
  instead of waiting (``fcp_jax.stage_workers`` then runs another stage first).

``on_change="refuse"`` raises ``StaleStageError`` instead of recomputing, listing the
settings and inputs that changed since the workdir's link was made.

Keys leave the code out (a changed docstring would recompute every stage), so each
record names the code that computed it: ``code``, a digest of the package's Python
sources (``code_version``). Loading a stage computed by other code logs a warning
naming both digests; ``results.json`` lists every stage's ``code``. Delete the stage's
folder (or use a new store) to recompute it with the current code.

On several processes every process runs each stage's function (its computations are
collective) and process 0 alone writes the stage's records and links, between barriers;
the store must be on a file system that every process sees.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional

from absl import logging
import numpy as np

from fcp_jax import distributed

DONE = "stage_done.json"
SPEC = "stage.json"
ON_CHANGE = ("recompute", "refuse")
# What ``Stages.run`` adds to every record: the stage's key, its seconds, the stage
# worker (process) that ran it and the code that computed it.
RUN_FIELDS = ("key", "seconds", "worker", "code")
# Settings, at any depth, that change how a stage reports, saves or is launched, not
# what it computes (the parallel section's process layout included).
NON_SEMANTIC = ("log_every", "plots", "checkpoint", "distributed", "coordinator_address",
                "num_processes", "process_id")


class StaleStageError(RuntimeError):
  """A finished stage's key changed and ``on_change="refuse"`` was asked for."""


class StageBusy(RuntimeError):
  """Another process holds the stage's lock (it is running it) and ``wait=False``."""


class StageNotReady(KeyError):
  """A stage was asked for an upstream stage this ``Stages`` has not run or loaded."""


def jsonable(x: Any) -> Any:
  """``x`` with numpy scalars, tuples and other objects made JSON-friendly."""
  if hasattr(x, "to_dict"):  # ConfigDict, Feedback.
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def write_json(path: str, obj: Any):
  """Writes ``obj`` as JSON atomically (temporary file, then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(obj), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def file_digest(*paths: str) -> str:
  """sha256 of the bytes of ``paths`` (in order)."""
  h = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_version() -> str:
  """The first 12 hex digits of the sha256 of the package's Python sources (paths and
  bytes, in path order): which code computed a stage."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for folder, subfolders, files in os.walk(root):
    subfolders.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      h.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
      with open(path, "rb") as f:
        h.update(f.read())
  return h.hexdigest()[:12]


def _flat(tree: Any, prefix: str = "") -> Dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _semantic(settings: Any) -> Any:
  if isinstance(settings, Mapping) or hasattr(settings, "to_dict"):
    return {k: _semantic(v) for k, v in jsonable(settings).items()
            if k not in NON_SEMANTIC}
  return jsonable(settings)


def stage_key(name: str, settings: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
  payload = json.dumps(dict(stage=name, settings=_semantic(settings),
                            inputs=jsonable(inputs)), sort_keys=True)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
  """``"key: old -> new"`` for every flattened key whose value differs."""
  a, b = _flat(old), _flat(new)
  return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


class Stages:
  """Runs each stage of a workdir once per key (see the module docstring).

  Args:
    workdir: the experiment's folder; ``<workdir>/<name>`` links to each stage.
    store: where stage folders live (default ``<workdir>/stages``); sweeps share one.
    on_change: ``"recompute"`` or ``"refuse"`` (``StaleStageError``).
    worker: which of the experiment's stage workers this process is (0: the main one);
      recorded in each stage it runs.
  """

  def __init__(self, workdir: str, *, store: Optional[str] = None,
               on_change: str = "recompute", worker: int = 0):
    if on_change not in ON_CHANGE:
      raise ValueError(f"on_change={on_change!r}; expected one of {ON_CHANGE}.")
    self.workdir = os.path.abspath(workdir)
    self.store = os.path.abspath(store or os.path.join(workdir, "stages"))
    self.on_change = on_change
    self.worker = worker
    self.wait = True  # False: a stage another process is running raises StageBusy.
    self.records: Dict[str, Dict[str, Any]] = {}
    self.keys: Dict[str, str] = {}
    self.folders: Dict[str, str] = {}

  def path(self, name: str) -> str:
    """The folder of stage ``name`` (known once it ran or was found done)."""
    if name not in self.folders:
      raise StageNotReady(name)
    return self.folders[name]

  def key(self, name: str) -> str:
    """The key of stage ``name`` (known once it ran or was found done)."""
    if name not in self.keys:
      raise StageNotReady(name)
    return self.keys[name]

  def run(self, name: str, fn: Callable[[str], Mapping[str, Any]], *,
          settings: Mapping[str, Any], inputs: Mapping[str, str] = ()) -> Dict[str, Any]:
    """Returns the record of stage ``name``, running ``fn(folder)`` unless it is done.

    ``settings`` are what the stage computes from (a resolved config as a dict);
    ``inputs`` maps what it reads (an upstream stage's name, a data file) to that
    input's key or digest.
    """
    inputs = dict(inputs)
    key = stage_key(name, settings, inputs)
    folder = os.path.join(self.store, name, key)
    link = os.path.join(self.workdir, name)
    distributed.barrier(f"stage {name} {key}")  # Nobody writes this stage's files yet.
    self._check_link(name, link, folder, settings, inputs)
    primary = distributed.is_primary()
    if primary:
      os.makedirs(folder, exist_ok=True)
    lock = _locked(os.path.join(folder, ".lock"), name, wait=self.wait)
    with lock if primary else contextlib.nullcontext():
      done = os.path.join(folder, DONE)
      if distributed.broadcast_json(os.path.exists(done)):  # Process 0 decides.
        with open(done) as f:
          record = json.load(f)
        logging.info("Stage %s (%s): complete, skipped.", name, key)
        if record.get("code") != code_version():
          logging.warning(
              "Stage %s (%s) was computed by other code (%s; this is %s): its outputs are "
              "reused as they are; delete %s to recompute it.", name, key,
              record.get("code", "unrecorded"), code_version(), folder)
      else:
        logging.info("Stage %s (%s): running in %s.", name, key, folder)
        if primary:
          write_json(os.path.join(folder, SPEC), dict(
              stage=name, key=key, settings=_semantic(settings), inputs=inputs))
        t0 = time.perf_counter()
        record = dict(jsonable(fn(folder)), key=key, seconds=time.perf_counter() - t0,
                      worker=self.worker, code=code_version())
        if primary:
          write_json(done, record)
    if primary:
      self._link(link, folder)
    distributed.barrier(f"stage {name} {key} done")
    self.records[name], self.keys[name], self.folders[name] = record, key, folder
    return record

  def _check_link(self, name, link, folder, settings, inputs):
    if os.path.lexists(link) and not os.path.islink(link):
      raise RuntimeError(f"{link} is a folder, not a link to a stage: this workdir was "
                         "written by an older layout of fcp_jax; use a new workdir.")
    if self.on_change != "refuse" or not os.path.islink(link):
      return
    old = os.path.realpath(link)
    if old == os.path.realpath(folder) or not os.path.exists(os.path.join(old, DONE)):
      return
    with open(os.path.join(old, SPEC)) as f:
      spec = json.load(f)
    diff = changes(spec["settings"], _semantic(settings)) + [
        f"input {k}: {spec['inputs'].get(k)} -> {v}" for k, v in inputs.items()
        if spec["inputs"].get(k) != v]
    raise StaleStageError(
        f"Stage {name!r} in {self.workdir} was computed with other settings (on_change="
        f"'refuse'); changed:\n  " + "\n  ".join(diff or ["(settings outside the key)"]))

  def _link(self, link: str, folder: str):
    os.makedirs(os.path.dirname(link), exist_ok=True)
    target = os.path.relpath(folder, os.path.dirname(link))
    if os.path.islink(link) and os.readlink(link) == target:
      return
    tmp = f"{link}.{os.getpid()}.tmp"
    os.symlink(target, tmp)
    os.replace(tmp, link)


@contextlib.contextmanager
def _locked(path: str, name: str, *, wait: bool):
  with open(path, "w") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise StageBusy(f"Stage {name} is running in another process ({path}).") from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)

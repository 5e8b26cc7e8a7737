"""Running on several processes: who writes, barriers, host values shared by process 0.

Every process of a multi-process run (``jax.distributed``, one process per host of a TPU
pod or per GPU node) runs the same program. The rules the experiment layer follows:

* host work that must happen once (asking the feedback env:
  ``feedback.cache.PrimaryFeedbackEnv``; writing stage records, caches, pools,
  datasets, results) runs on process 0 (``is_primary``); its outcome reaches the others
  through ``broadcast_json``, its files after a ``barrier``;
* rows are global: every process builds the same rows (the same prompts, a global
  data order), and each feeds its own slice of every global batch to the step
  (``local_rows``), so the global batch is the concatenation of the slices, no copies;
  the sampler splits its prompt rows over every process's devices the same way
  (``Sampler(parallel=...)``) and ``fetch`` gathers the samples back to every process.

With one process every helper is a no-op.
"""

import json
from typing import Any, Dict, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np


def is_primary() -> bool:
  """Whether this process writes the run's shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str):
  """Waits until every process reached the barrier ``name``."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def broadcast_json(obj: Any = None) -> Any:
  """Process 0's JSON-able ``obj``, on every process (others pass anything)."""
  if jax.process_count() == 1:
    return obj
  data = (np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8) if is_primary()
          else np.zeros((0,), np.uint8))
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data))))
  buf = np.zeros((size,), np.uint8)
  if is_primary():
    buf[:] = data
  return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))))


def local_rows(batch: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """This process's contiguous slice of a global batch's rows ([B, ...] -> [B/P, ...])."""
  count = jax.process_count()
  if count == 1:
    return dict(batch)
  rows = len(next(iter(batch.values())))
  if rows % count:
    raise ValueError(f"A global batch of {rows} rows does not split over {count} "
                     "processes.")
  per = rows // count
  start = jax.process_index() * per
  return {k: v[start:start + per] for k, v in batch.items()}


def fetch(tree: Any) -> Any:
  """``jax.device_get`` that also gathers arrays spanning other processes' devices."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and (
        not x.is_fully_replicated):
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)

  return jax.tree.map(get, tree)

"""A fix for TFDS's parquet writer, applied explicitly before a dataset is written.

TFDS 4.9.10 writes a parquet split (``ParquetFileAdapter.write_examples``) in batches of
100 examples cut by the private ``file_adapters._batched(iterator, n)``, which calls
``itertools.islice(iterator, i, i + n)`` on one live iterator while ``i`` grows by ``n``:
each batch after the first skips ``i`` more examples. A split of more than 100 examples
is written short without any error (found when the end-to-end pipeline was first built,
commit 497854a: 659 examples were stored as 300 rows; 500 come back as 200).
``tfds_builders`` writes parquet, the one format that TFDS builds without TensorFlow and
that serves both ``tfds.data_source`` and ``as_dataset`` (array_record's writer does not
batch, but its adapter has no ``as_dataset``). ``ensure_parquet_writer`` replaces
``_batched`` with a correct batcher; ``tfds_builders.build`` calls it before it writes,
so importing the package patches nothing.

Replacing a private function is safe only where it is the function we think it is:
``VERIFIED_VERSIONS`` lists the TFDS versions the fix was checked on (the pinned one,
``requirements.lock``). On any version the function must exist with the signature
``(iterator, n)``, otherwise ``ensure_parquet_writer`` raises, naming the installed
version, instead of writing datasets that may be truncated; on an unverified version with
the same signature it applies the fix (correct batching is harmless if TFDS fixed the
bug) and logs a warning. The regression test is ``tests/test_tfds_compat.py``.
"""

import inspect
import itertools

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core import file_adapters

VERIFIED_VERSIONS = ("4.9.10",)
_PATCHED = "_batched"
_SIGNATURE = ("iterator", "n")


def _batched(iterator, n: int):
  """Lists of up to ``n`` consecutive items of ``iterator`` (``itertools.batched``, 3.12)."""
  it = iter(iterator)
  while True:
    batch = list(itertools.islice(it, n))
    if not batch:
      return
    yield batch


def ensure_parquet_writer() -> None:
  """Makes TFDS's parquet writer keep every example (idempotent; see the module doc)."""
  current = getattr(file_adapters, _PATCHED, None)
  if current is _batched:
    return
  version = tfds.__version__
  if current is None or not callable(current):
    raise RuntimeError(
        f"tensorflow_datasets {version} has no file_adapters.{_PATCHED}, which "
        f"fcp_jax.data.tfds_compat replaces (verified on {', '.join(VERIFIED_VERSIONS)}). "
        "Install a verified version (requirements.lock) or re-check the fix.")
  try:
    params = tuple(inspect.signature(current).parameters)
  except (TypeError, ValueError):
    params = None
  if params != _SIGNATURE:
    raise RuntimeError(
        f"tensorflow_datasets {version}: file_adapters.{_PATCHED} takes {params}, not "
        f"{_SIGNATURE}, so fcp_jax.data.tfds_compat cannot replace it safely (verified "
        f"on {', '.join(VERIFIED_VERSIONS)}). Install a verified version "
        "(requirements.lock) or re-check the fix.")
  if version not in VERIFIED_VERSIONS:
    logging.warning("tensorflow_datasets %s is not one of the versions the parquet-writer "
                    "fix was verified on (%s); applying it.", version,
                    ", ".join(VERIFIED_VERSIONS))
  setattr(file_adapters, _PATCHED, _batched)

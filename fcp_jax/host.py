"""Host malloc settings that keep XLA:CPU's per-call scratch buffer mapped.

Every call of a compiled XLA:CPU executable allocates its scratch buffer ("preallocated
temp": ~100 MB for the default experiment's train step) with ``malloc`` on a worker
thread and frees it when the call ends. glibc serves a request that large with a fresh
``mmap`` (a thread arena's heap holds at most 64 MB) and gives it back with ``munmap`` on
``free``, so every step faults in and zeroes ~25,000 new pages. On 2 CPU cores that is
~20% of a train step (system time 22 s of 146 s over 200 warm-up steps).

``tune_malloc`` asks glibc (``mallopt``) to serve every thread from the main heap
(``M_ARENA_MAX=1``), never with ``mmap`` (``M_MMAP_MAX=0``), and to keep up to 2 GiB of
freed memory at the top of the heap (``M_TRIM_THRESHOLD``), so the scratch pages are
reused from one call to the next. Train steps of the default experiment run 13-20%
faster with bitwise the same numbers; compiles run ~25% slower, as every thread now
takes the one arena's lock. The process keeps its peak heap instead of returning it.

``import fcp_jax`` changes nothing: an entry point applies it as its first action, before
the first JAX computation starts XLA's worker threads (a thread keeps the arena it first
allocated from). ``config_lib.driver_main`` does, so every driver (``python -m
fcp_jax.pipeline``, ``.train``, ``.bootstrap``, ``.evaluate``) runs tuned, as do the
benchmarks in ``experiments/benchmarks/``; a script or notebook that wants it calls
``tune_malloc()`` before its first computation. Checked with jax 0.10.2 on Linux: after
importing the drivers' modules (numpy, jax, flax, tensorflow_datasets, ...) glibc still
has its main arena only and no JAX thread runs (numpy's OpenBLAS starts its thread pool
at import, with no arena of its own yet); XLA's threads start when the first
computation initialises the backend (2 threads before it, 17 after, on 2 cores).

``FCP_JAX_MALLOC=system`` makes ``tune_malloc`` a no-op (glibc's defaults, e.g. to compare
against them); ``FCP_JAX_MALLOC=tuned`` is the default. Other C libraries and systems are
left alone.
"""

import ctypes
import ctypes.util
import os
import sys

ENV = "FCP_JAX_MALLOC"
# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_FREED_BYTES = 2**31 - 1  # The most mallopt takes (an int): up to 2 GiB stay.


def tune_malloc() -> bool:
  """Applies the settings above; True when glibc accepted all of them."""
  mode = os.environ.get(ENV, "tuned")
  if mode not in ("tuned", "system"):
    raise ValueError(f"{ENV}={mode!r}: expected 'tuned' or 'system'.")
  if mode == "system" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version  # Only glibc has these semantics (musl has no arenas).
  except (OSError, AttributeError):
    return False
  libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREED_BYTES)))

"""A persistent XLA compilation cache shared by stages, drivers and re-runs.

Every stage of a pipeline builds its own jitted train step, sampler and evaluator, so the
same programs (same model, same shapes) are compiled again and again: within one run
(the evaluation of each method, the online stages' samplers) and across runs (a re-run,
a sweep's arms, ``make demo`` twice). JAX's persistent cache stores each compiled
executable on disk under a key of the program, the compile options, the backend and
jax/jaxlib versions, so a later compile of the same program loads it instead. A loaded
executable is the one that was compiled, so results are bitwise those of a fresh compile
(on the runlocal pipeline: the same results table; CPU time 130 s, then 41 s on a re-run).

``enable`` turns it on for the process; ``config_lib.driver_main`` calls it before
the first computation, so every driver (and ``experiments/sweep.py``) uses it. Importing
``fcp_jax`` changes nothing. The directory:

* ``$FCP_JAX_COMPILE_CACHE`` when set; ``off`` (or ``0``, ``none``, empty) disables it;
* else ``$FCP_JAX_CACHE/xla`` (``~/.cache/fcp_jax/xla``), next to the ternary kernel's
  build;
* a directory set already (``jax.config.update("jax_compilation_cache_dir", ...)`` or
  ``JAX_COMPILATION_CACHE_DIR``) is kept.

Every program is cached, however fast it compiled (on 2 CPU cores most stage programs
compile in under a second each, and there are many); the cache is an LRU of
``MAX_BYTES`` whose writes take a file lock, so concurrent processes (a sweep's parallel
arms, a pod's hosts on a shared disk) can share one directory.
"""

import os
from typing import Optional

ENV = "FCP_JAX_COMPILE_CACHE"
OFF = ("off", "0", "none", "")
MAX_BYTES = 4 * 2**30


def cache_root() -> str:
  """Where fcp_jax keeps its build products: ``$FCP_JAX_CACHE`` or ``~/.cache/fcp_jax``."""
  return os.environ.get("FCP_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "fcp_jax"))


def directory() -> Optional[str]:
  """The cache directory the environment asks for; ``None`` when disabled."""
  value = os.environ.get(ENV)
  if value is None:
    return os.path.join(cache_root(), "xla")
  return None if value.strip().lower() in OFF else os.path.expanduser(value)


def enable() -> Optional[str]:
  """Turns the persistent cache on (see the module docstring); returns its directory."""
  import jax  # pylint: disable=g-import-not-at-top
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  path = directory()
  if path is None:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path

"""fcp_jax.host: glibc keeps a large buffer freed by a worker thread mapped for reuse.

The settings are applied by the drivers' entry point (``config_lib.driver_main``), never
by importing the package.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from fcp_jax import host

BUFFER_PAGES = (100 << 20) // 4096  # Larger than glibc's per-thread heap (64 MB).

# ``measure()`` allocates, fills and frees the buffer five times on a new thread (as
# XLA:CPU does with its scratch buffer on every call) and prints the page faults that
# took. Each child appends what to do before (and around) it.
MEASURE = textwrap.dedent("""
    import ctypes, resource, threading
    def measure(*unused):
      libc = ctypes.CDLL("libc.so.6")
      libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
      libc.free.argtypes = (ctypes.c_void_p,)
      size = 100 << 20
      def work():
        for _ in range(5):
          p = libc.malloc(size)
          ctypes.memset(p, 1, size)
          libc.free(p)
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      thread = threading.Thread(target=work)
      thread.start()
      thread.join()
      print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")


def _run(code: str, mode: str = "tuned", cwd=None):
  return subprocess.run([sys.executable, "-c", MEASURE + textwrap.dedent(code)],
                        check=True, capture_output=True, text=True, cwd=cwd,
                        env={**os.environ, host.ENV: mode}).stdout.split()


def _faults(mode: str):
  out = _run("""
      from fcp_jax import host
      print(host.tune_malloc())
      measure()
  """, mode)
  return out[0] == "True", int(out[1])


@glibc_only
def test_tuned_malloc_reuses_a_freed_buffer_across_calls():
  applied, faults = _faults("tuned")
  assert applied
  assert faults < 1.5 * BUFFER_PAGES  # Faulted in once, then reused.
  applied, faults = _faults("system")
  assert not applied
  assert faults > 4 * BUFFER_PAGES  # A fresh mmap every time.


@glibc_only
def test_importing_the_package_and_its_drivers_leaves_malloc_alone():
  out = _run("""
      import fcp_jax
      from fcp_jax import pipeline, train, bootstrap, evaluate, config_lib
      measure()
  """)
  assert int(out[0]) > 4 * BUFFER_PAGES  # glibc's defaults: a fresh mmap every time.


@glibc_only
def test_driver_main_tunes_malloc_first(tmp_path):
  (tmp_path / "trivial.py").write_text(textwrap.dedent("""
      import ml_collections
      def get_config(arg=None):
        return ml_collections.ConfigDict({"seed": 0})
  """))
  code = """
      from fcp_jax import config_lib
      config_lib.driver_main(["--config", "trivial.py", "--workdir", "wd"], measure)
  """
  assert int(_run(code, cwd=tmp_path)[0]) < 1.5 * BUFFER_PAGES
  assert int(_run(code, "system", cwd=tmp_path)[0]) > 4 * BUFFER_PAGES


def test_unknown_mode_is_an_error(monkeypatch):
  monkeypatch.setenv(host.ENV, "fast")
  with pytest.raises(ValueError, match="FCP_JAX_MALLOC='fast'"):
    host.tune_malloc()

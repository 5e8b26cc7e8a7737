"""fcp_jax.host: glibc keeps a large buffer freed by a worker thread mapped for reuse."""

import os
import subprocess
import sys
import textwrap

import pytest

from fcp_jax import host

BUFFER_PAGES = (100 << 20) // 4096  # Larger than glibc's per-thread heap (64 MB).

# Allocates, fills and frees the buffer five times on a new thread (as XLA:CPU does with
# its scratch buffer on every call) and prints the page faults that took.
CHILD = textwrap.dedent("""
    import ctypes, resource, sys, threading
    from fcp_jax import host
    print(host.tune_malloc())
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


def _faults(mode: str):
  out = subprocess.run([sys.executable, "-c", CHILD], check=True, capture_output=True,
                       text=True, env={**os.environ, host.ENV: mode}).stdout.split()
  return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_reuses_a_freed_buffer_across_calls():
  applied, faults = _faults("tuned")
  assert applied
  assert faults < 1.5 * BUFFER_PAGES  # Faulted in once, then reused.
  applied, faults = _faults("system")
  assert not applied
  assert faults > 4 * BUFFER_PAGES  # A fresh mmap every time.


def test_unknown_mode_is_an_error(monkeypatch):
  monkeypatch.setenv(host.ENV, "fast")
  with pytest.raises(ValueError, match="FCP_JAX_MALLOC='fast'"):
    host.tune_malloc()

"""Ternary matmul on 2-bit codes: a compiled XLA:CPU kernel, XLA elsewhere.

The prepared inference form of a ternary kernel (``packing.prepare_for_inference``)::

    codes_u32   uint32 [..., ceil(N/16), ceil(K/16), 16]   word [t, q, j] bits 2f..2f+1
                                                          hold T[16q + f, 16t + j] + 1;
                                                          padding holds 1 (weight 0)
    scale_rows  f32 [..., A, 16·ceil(N/16)]                W[k, n] = scale_rows[k // (K/A), n]
                                                          · T[k, n] (A = 1: tensor/channel)

still 2 bits per weight. ``matmul(x, codes_u32, scale_rows, n)`` computes ``x @ W`` for
x [M, K] f32:

- on CPU, when the groups hold a multiple of 16 inputs, in ``ternary_kernel.cc`` through
  ``jax.ffi``: each 16-column tile's words are decoded in registers and multiplied into
  8 rows of x at a time, so no weight matrix is ever written; on 2 cores of an AMD
  EPYC it beats XLA's f32 dot at every M measured, 1 to 1024 rows
  (``docs/ternary_methods.md`` §3.1);
- otherwise in XLA: the words are unpacked to int8 codes, converted inside the dot, and
  the scale applied to each group's output (accelerators, groups of other sizes, and
  ``FCP_JAX_TERNARY_KERNEL=0``).

The kernel is compiled with the host's C++ compiler (``$CXX``, else ``g++``;
``-O3 -march=native``) on first use into ``$FCP_JAX_CACHE`` (default
``~/.cache/fcp_jax``), keyed by the source, the compiler, jaxlib and the CPU; when that
fails ``available()`` is False, a warning says why, and everything runs in XLA. A
custom call is not partitioned: under a sharded jit its operands are gathered.
"""

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from fcp_jax import compile_cache

Array = jax.Array
FIELDS = 16  # 2-bit codes per uint32 word, consecutive along K.
LANES = 16  # Columns per tile.
TARGET = "fcp_ternary_matmul"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ternary_kernel.cc")
ENV = "FCP_JAX_TERNARY_KERNEL"


# ---------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------


def pack_words(codes) -> np.ndarray:
  """int codes [..., K, N] in {-1, 0, 1} -> uint32 [..., ceil(N/16), ceil(K/16), 16]."""
  codes = np.asarray(codes)
  *lead, k, n = codes.shape
  q, t = -(-k // FIELDS), -(-n // LANES)
  pad = [(0, 0)] * len(lead) + [(0, FIELDS * q - k), (0, LANES * t - n)]
  u = (np.pad(codes.astype(np.int8), pad) + 1).astype(np.uint32)  # [..., 16Q, 16T]
  u = u.reshape(*lead, q, FIELDS, t, LANES)  # [..., Q, F, T, L]
  words = np.zeros((*lead, q, t, LANES), np.uint32)
  for f in range(FIELDS):
    words |= u[..., f, :, :] << np.uint32(2 * f)
  return np.ascontiguousarray(np.swapaxes(words, -3, -2))  # [..., T, Q, L]


def unpack_words(words: Array, k: int, n: int) -> Array:
  """uint32 [..., T, Q, 16] -> int8 codes [..., K, N] (the inverse of ``pack_words``)."""
  *lead, t, q, lanes = words.shape
  shifts = jnp.arange(0, 2 * FIELDS, 2, dtype=jnp.uint32)[:, None]  # [F, 1]
  fields = (words[..., None, :] >> shifts) & 3  # [..., T, Q, F, L]
  fields = jnp.moveaxis(fields, -4, -2)  # [..., Q, F, T, L]
  codes = fields.reshape(*lead, q * FIELDS, t * lanes)[..., :k, :n]
  return codes.astype(jnp.int8) - 1


def scale_rows(scale, n: int, num_lead: int = 0) -> np.ndarray:
  """A packed ``scale`` [*lead] / [*lead, N] / [*lead, A, N] -> f32 [*lead, A, 16·ceil(N/16)].

  ``num_lead`` counts the stacked leading axes (a scanned model's [L]); the rank after
  them tells per tensor (0), per channel (1) and per group (2) apart.
  """
  scale = np.asarray(scale, np.float32)
  lead = scale.shape[:num_lead]
  compact = {0: (1, 1), 1: (1, n), 2: scale.shape[num_lead:]}[scale.ndim - num_lead]
  rows = np.broadcast_to(scale.reshape(*lead, *compact), (*lead, compact[0], n))
  pad = [(0, 0)] * (rows.ndim - 1) + [(0, -n % LANES)]
  return np.ascontiguousarray(np.pad(rows, pad))


# ---------------------------------------------------------------------------------------
# Building and registering the kernel.
# ---------------------------------------------------------------------------------------


def _cpu_id() -> str:
  """The CPU's model and feature flags (the build uses -march=native)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [line for line in f.read().splitlines()
               if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _build() -> str:
  """Compiles ``ternary_kernel.cc`` (once per source/compiler/jaxlib/CPU); its path."""
  cxx = os.environ.get("CXX", "g++")
  with open(SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                           check=True).stdout
  key = hashlib.sha256(b"\0".join(
      [source, version.encode(), jaxlib.__version__.encode(), _cpu_id().encode()])
  ).hexdigest()[:16]
  out = os.path.join(compile_cache.cache_root(), f"ternary_kernel-{key}.so")
  if os.path.exists(out):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(out))
  os.close(fd)
  base = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w",
          f"-I{jax.ffi.include_dir()}", SOURCE, "-o", tmp]
  try:
    try:
      subprocess.run(base[:2] + ["-march=native"] + base[2:], capture_output=True,
                     text=True, check=True, timeout=600)
    except subprocess.CalledProcessError:
      subprocess.run(base, capture_output=True, text=True, check=True, timeout=600)
    os.replace(tmp, out)  # Atomic: concurrent builders write the same file.
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the CPU kernel is built and registered (False when disabled or it fails)."""
  if os.environ.get(ENV, "1").lower() in ("0", "false", "off"):
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(_build())
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FcpTernaryMatmul),
                                platform="cpu")
    return True
  except (OSError, subprocess.SubprocessError, AttributeError) as e:
    detail = getattr(e, "stderr", "") or e
    warnings.warn(f"Ternary CPU kernel unavailable ({detail}); packed layers run in XLA.")
    return False


# ---------------------------------------------------------------------------------------
# The matmul.
# ---------------------------------------------------------------------------------------


def xla_matmul(x: Array, codes_u32: Array, scale: Array, n: int,
               precision: Any = None) -> Array:
  """``x @ W`` in XLA: int8 codes converted inside the dot, the scale on its output.

  x [M, K]; codes_u32 [T, Q, 16]; scale [A, 16T]. One dot per scale group, batched.
  """
  k = x.shape[-1]
  a = scale.shape[0]
  codes = unpack_words(codes_u32, k, n).astype(jnp.float32)  # [K, N]
  partial = jax.lax.dot_general(
      x.reshape(-1, a, k // a), codes.reshape(a, k // a, n),
      (((2,), (1,)), ((1,), (0,))), precision=precision)  # [A, M, N]
  return jnp.sum(partial * scale[:, None, :n], axis=0)  # [M, N]


def kernel_fits(k: int, groups: int) -> bool:
  """Whether the CPU kernel takes ``groups`` scale groups along K (else XLA does)."""
  return groups == 1 or (k // groups) % FIELDS == 0


def matmul(x: Array, codes_u32: Array, scale: Array, n: int, kernel: bool = True,
           precision: Any = None) -> Array:
  """``x @ W`` [M, N] f32 for x [M, K]; W from ``codes_u32`` and ``scale_rows``.

  On CPU the kernel runs where it fits and is available (f32 FMAs); ``kernel=False``
  forces XLA, whose dot takes ``precision``.
  """
  x = x.astype(jnp.float32)
  scale = scale.astype(jnp.float32)
  if not (kernel and kernel_fits(x.shape[1], scale.shape[0]) and available()):
    return xla_matmul(x, codes_u32, scale, n, precision)

  def cpu(x, w, s):
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")(x, w, s)

  return jax.lax.platform_dependent(
      x, codes_u32, scale, cpu=cpu,
      default=lambda x, w, s: xla_matmul(x, w, s, n, precision))

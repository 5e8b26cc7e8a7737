"""Compression of the data-parallel gradient reduction (``config.grad_compression``).

    reduce = grad_compression.build("terngrad(clip=2.5)", num_replicas=8)
    grads = reduce(grads, axis_name, rng)   # per replica: the sum over ``axis_name``

``none`` (the default) is ``lax.psum`` of the float gradients, today's step. ``terngrad``
is TernGrad (Wen et al., NeurIPS 2017): per replica and tensor, clip at ``clip``·σ
(σ: the replica's std of the tensor), share the scale s = max|g| over replicas
(``pmax``), round stochastically to codes sign(g)·b with b ~ Bernoulli(|g| / s) in
int8, and reduce the codes: ``psum(codes)·s`` (unbiased: E[s·sign(g)·b] = g clipped).
The codes are summed in int8 while the replica count is at most 127 (|sum| <= R, so
the sum is exact and int8 is what goes over the wire), else in int32. Tensors with
fewer than ``min_size`` elements (norms, biases) are reduced in float.

A compressing reducer needs per-replica gradients (``per_replica``): ``pmap`` has
them; the ``mesh`` mode runs the step under ``shard_map`` (``sharding.py``). See
``docs/ternary_methods.md`` §2.5.
"""

import dataclasses
from typing import Any, ClassVar, Tuple

from absl import logging
import jax
import jax.numpy as jnp

from fcp_jax.registry import Registry

GRAD_COMPRESSION = Registry("gradient compression")
_KEY_SALT = 0x7e6  # Keeps the rounding noise independent of the step's dropout key.


@GRAD_COMPRESSION.register("none")
class NoCompression:
  """``lax.psum`` of the float gradients."""
  per_replica: ClassVar[bool] = False

  def __call__(self, grads: Any, axis_name: Any, rng: jax.Array) -> Any:
    del rng
    return jax.lax.psum(grads, axis_name)


@GRAD_COMPRESSION.register("terngrad")
@dataclasses.dataclass(frozen=True)
class TernGrad:
  """Ternary gradients with a shared scale; see the module docstring.

  Attributes:
    clip: clip each tensor at ``clip``·σ before rounding (0: no clipping).
    min_size: tensors with fewer elements are reduced in float.
  """
  clip: float = 2.5
  min_size: int = 1024
  per_replica: ClassVar[bool] = True

  def __post_init__(self):
    if self.clip < 0 or self.min_size < 1:
      raise ValueError(f"terngrad: clip must be >= 0 and min_size >= 1, got {self}.")

  def compresses(self, x: Any) -> bool:
    return x.size >= self.min_size

  def quantize(self, g: jax.Array, key: jax.Array, axis_name: Any
               ) -> Tuple[jax.Array, jax.Array]:
    """One replica's tensor -> (int8 codes in {-1, 0, 1}, same shape; f32 scale [])."""
    g = g.astype(jnp.float32)
    if self.clip:
      bound = self.clip * jnp.std(g)
      g = jnp.clip(g, -bound, bound)
    scale = jax.lax.pmax(jnp.max(jnp.abs(g)), axis_name)  # [] shared by all replicas
    keep = jax.random.uniform(key, g.shape) * scale < jnp.abs(g)  # Bernoulli(|g| / s)
    return jnp.where(keep, jnp.sign(g), 0.0).astype(jnp.int8), scale

  def reduce_tensor(self, g: jax.Array, key: jax.Array, axis_name: Any) -> jax.Array:
    """One tensor summed over replicas: ``psum(codes)·s``, or in float if small."""
    if not self.compresses(g):
      return jax.lax.psum(g, axis_name)
    codes, scale = self.quantize(g, key, axis_name)
    sum_dtype = jnp.int8 if jax.lax.axis_size(axis_name) <= 127 else jnp.int32
    total = jax.lax.psum(codes.astype(sum_dtype), axis_name)  # the communicated codes
    return (total.astype(jnp.float32) * scale).astype(g.dtype)

  def __call__(self, grads: Any, axis_name: Any, rng: jax.Array) -> Any:
    leaves, treedef = jax.tree.flatten(grads)
    key = jax.random.fold_in(jax.random.fold_in(rng, _KEY_SALT),
                             jax.lax.axis_index(axis_name))  # per replica (and step)
    keys = jax.random.split(key, max(len(leaves), 1))
    return treedef.unflatten([self.reduce_tensor(g, k, axis_name)
                              for g, k in zip(leaves, keys)])


def build(spec: str, *, num_replicas: int) -> Any:
  """The reducer named by ``spec``; a compressing one over 1 replica is ``none``.

  With one replica nothing is communicated, so compression is skipped (logged).
  """
  try:
    reducer = GRAD_COMPRESSION.build(spec)
  except KeyError as e:
    raise KeyError(f"config.grad_compression: {e.args[0]}") from None
  if reducer.per_replica and num_replicas == 1:
    logging.warning("config.grad_compression=%r: 1 data-parallel replica, nothing to "
                    "communicate; reducing uncompressed.", spec)
    return NoCompression()
  return reducer

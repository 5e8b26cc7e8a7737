"""Parallelism: a GSPMD ``Mesh`` mode and a ``pmap`` mode behind one small interface.

    par = build(config.parallel)                       # parallel.mode: "mesh" | "pmap"
    state = par.create_state(init_fn, rng, specs)      # specs: state.state_logical_specs
    train = par.jit_train_step(train_step_fn, specs)   # (state, batch) -> (state, metrics)
    evaluate = par.jit_eval_step(eval_step_fn, specs)  # (params, batch, step) -> metrics
    batch = par.put_batch(numpy_batch)                 # this process's rows -> devices
    par.sample_sharding                                # the sampler's global prompt rows

``mesh``: a ``jax.sharding.Mesh`` with axes ``("data", "fsdp", "tensor")`` and **Auto**
axis types (``jax.make_mesh`` defaults to Explicit in JAX 0.10, which breaks
``with_sharding_constraint``). Logical axis names of parameters and activations map to
mesh axes through ``config.parallel.rules``; the state is created already sharded (jit
with ``out_shardings`` from the logical specs) and the batch is split over
``data x fsdp``. Calls run inside ``jax.set_mesh`` and ``nn.logical_axis_rules`` so the
model's ``with_logical_constraint``s apply.

With ``per_replica=True`` (a compressed gradient reduction, ``grad_compression``) the
mesh mode runs the train step once per batch shard under ``jax.shard_map`` with the
state replicated and collectives over ``("data", "fsdp")``, like ``pmap``: pure data
parallelism, so it needs ``mesh_shape`` (R, 1, 1).

``frozen_specs`` (distillation's teacher params, ``distill.py``): the train step takes a
third argument, never donated or updated, placed by its own logical specs (replicated
in the per-replica and pmap modes): ``train(state, batch, teacher_params)``.

``pmap``: replicated state (``in_axes=None``/``out_axes=None``: the state stays one
logical array, so checkpoints are the same in both modes), per-device slices of the
batch and ``lax.psum`` inside the step (``axis_name="batch"``).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize`` when the
config or the environment asks; each process feeds its own rows (``put_batch`` takes
process-local data; in mesh mode it builds global arrays). In pmap mode the reduction
spans every process's devices and the state comes back replicated over this process's
devices.
"""

import contextlib
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fcp_jax.registry import Registry

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
PMAP_AXIS = "batch"
PARALLEL = Registry("parallel mode")
# Environment variables that mean "this is one process of a multi-host job".
DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")

DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("length", None),
)


def initialize_distributed(parallel_cfg: Mapping[str, Any]) -> bool:
  """``jax.distributed.initialize`` when asked by config or environment; idempotent."""
  cfg = dict(parallel_cfg)
  asked = bool(cfg.get("distributed", False)) or any(v in os.environ
                                                      for v in DISTRIBUTED_ENV)
  if not asked or jax.distributed.is_initialized():
    return False
  kwargs = {}
  if cfg.get("coordinator_address"):
    kwargs["coordinator_address"] = cfg["coordinator_address"]
  if int(cfg.get("num_processes", 0) or 0) > 0:
    kwargs["num_processes"] = int(cfg["num_processes"])
  if int(cfg.get("process_id", -1)) >= 0:
    kwargs["process_id"] = int(cfg["process_id"])
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d.", jax.process_index(),
               jax.process_count())
  return True


def mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
  """Resolves one ``-1`` entry of ``(data, fsdp, tensor)`` and checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"parallel.mesh_shape must have {len(MESH_AXES)} entries "
                     f"{MESH_AXES}, got {shape}.")
  if shape.count(-1) > 1:
    raise ValueError(f"parallel.mesh_shape {shape}: at most one entry may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"parallel.mesh_shape {shape} does not divide {num_devices} "
                       "devices.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"parallel.mesh_shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available.")
  return shape


def make_mesh(shape: Sequence[int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A ``("data", "fsdp", "tensor")`` mesh with Auto axis types."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules: Any) -> Tuple[Tuple[str, Any], ...]:
  """Normalises config rules (JSON turns tuples into lists) to Flax's format."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"parallel.rules entry {item!r} must be (logical, mesh axes).")
    name, axes = item
    if isinstance(axes, list):
      axes = tuple(axes)
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"parallel.rules: {name!r} maps to unknown mesh axis {a!r}; "
                         f"mesh axes are {MESH_AXES}.")
    out.append((name, axes))
  return tuple(out)


def _process_rows(batch: Mapping[str, Any]) -> int:
  sizes = {k: np.shape(v)[0] for k, v in batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f"Batch fields have different leading sizes: {sizes}.")
  return next(iter(sizes.values()))


@PARALLEL.register("mesh")
class MeshParallel:
  """GSPMD data/FSDP/tensor parallelism with ``jax.jit`` shardings."""
  axis_name = None
  replica_axis = BATCH_AXES  # Collectives of a per-replica (shard_map) train step.

  def __init__(self, parallel_cfg: Mapping[str, Any],
               devices: Optional[Sequence[Any]] = None):
    cfg = dict(parallel_cfg)
    self.mesh = make_mesh(cfg.get("mesh_shape", (-1, 1, 1)), devices)
    self.rules = logical_rules(cfg.get("rules", DEFAULT_RULES))
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.sample_sharding = self.batch_sharding  # Global prompt rows of the sampler.
    self.replicated = NamedSharding(self.mesh, P())

  @property
  def num_batch_shards(self) -> int:
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def num_replicas(self) -> int:
    return self.num_batch_shards

  @contextlib.contextmanager
  def context(self):
    """The mesh and logical-rules context every traced call of this mode runs in."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def shardings(self, logical_specs: Any) -> Any:
    """``NamedSharding`` tree from a tree of logical ``PartitionSpec``s."""
    return nn.logical_to_mesh_sharding(logical_specs, self.mesh, self.rules)

  def create_state(self, init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                   logical_specs: Any) -> Any:
    with self.context():
      return jax.jit(init_fn, out_shardings=self.shardings(logical_specs))(rng)

  def jit_train_step(self, train_step: Callable, logical_specs: Any,
                     per_replica: bool = False, frozen_specs: Any = None) -> Callable:
    frozen = () if frozen_specs is None else (self.shardings(frozen_specs),)
    if per_replica:
      train_step = self._per_replica(train_step, len(frozen))
    state_sh = self.shardings(logical_specs)
    jitted = jax.jit(train_step, in_shardings=(state_sh, self.batch_sharding) + frozen,
                     out_shardings=(state_sh, self.replicated), donate_argnums=(0,))

    def run(state, batch, *frozen_args):
      with self.context():
        return jitted(state, batch, *frozen_args)

    run.jitted = jitted
    return run

  def _per_replica(self, train_step: Callable, num_frozen: int = 0) -> Callable:
    """``train_step`` once per batch shard (``shard_map``; axis ``replica_axis``)."""
    if self.mesh.shape["fsdp"] * self.mesh.shape["tensor"] != 1:
      raise ValueError("A per-replica train step (grad_compression) is pure data "
                       "parallelism: it needs parallel.mesh_shape (-1, 1, 1), got "
                       f"{dict(self.mesh.shape)}. Use fsdp = tensor = 1 or pmap mode.")

    def body(state, batch, *frozen):
      with nn.logical_axis_rules(()):  # Per-device code: no sharding constraints.
        return train_step(state, batch, *frozen)

    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(P(), P(BATCH_AXES)) + (P(),) * num_frozen,
                         out_specs=(P(), P()), check_vma=False)

  def jit_eval_step(self, eval_step: Callable, logical_specs: Any) -> Callable:
    param_sh = self.shardings(logical_specs.params)
    jitted = jax.jit(eval_step, in_shardings=(param_sh, self.batch_sharding,
                                              self.replicated),
                     out_shardings=self.replicated)

    def run(params, batch, step=None):
      with self.context():
        return jitted(params, batch, step)

    return run

  def jit_replicated(self, fn: Callable) -> Callable:
    """``jax.jit(fn)`` with replicated outputs, traced under the mesh and rules."""
    jitted = jax.jit(fn, out_shardings=self.replicated)

    def run(*args):
      with self.context():
        return jitted(*args)

    return run

  def put_batch(self, batch: Mapping[str, Any]) -> dict:
    """Process-local rows -> global arrays sharded over ``data x fsdp``."""
    rows = _process_rows(batch) * jax.process_count()
    if rows % self.num_batch_shards:
      raise ValueError(f"Global batch size {rows} is not divisible by the "
                       f"{self.num_batch_shards} data x fsdp shards of mesh "
                       f"{dict(self.mesh.shape)}.")
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in batch.items()}


@PARALLEL.register("pmap")
class PmapParallel:
  """Data-parallel replicas with ``jax.pmap`` and ``lax.pmean`` of gradients."""
  axis_name = replica_axis = PMAP_AXIS

  def __init__(self, parallel_cfg: Mapping[str, Any] = None,
               devices: Optional[Sequence[Any]] = None):
    del parallel_cfg  # pmap needs no mesh shape or rules.
    if devices is not None:
      raise ValueError("pmap mode runs on all devices; it takes no device list.")
    self.local_devices = jax.local_devices()
    # pmap returns the state replicated over this process's devices; keep it that way.
    local = Mesh(np.asarray(self.local_devices), ("replica",))
    self.replicated = NamedSharding(local, P())
    # The sampler splits its rows over this process's devices (the params are there).
    self.sample_sharding = NamedSharding(local, P("replica"))

  @property
  def num_replicas(self) -> int:
    return jax.device_count()

  def context(self):
    """pmap needs no mesh or rules context (for callers written for both modes)."""
    return contextlib.nullcontext()

  def shardings(self, logical_specs: Any) -> Any:
    is_spec = lambda x: isinstance(x, P)
    return jax.tree.map(lambda _: self.replicated, logical_specs, is_leaf=is_spec)

  def create_state(self, init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                   logical_specs: Any) -> Any:
    return jax.jit(init_fn, out_shardings=self.shardings(logical_specs))(rng)

  def jit_train_step(self, train_step: Callable, logical_specs: Any,
                     per_replica: bool = True, frozen_specs: Any = None) -> Callable:
    del logical_specs, per_replica  # Always per replica.
    frozen = () if frozen_specs is None else (None,)  # Replicated, like the state.
    return jax.pmap(train_step, axis_name=self.axis_name, in_axes=(None, 0) + frozen,
                    out_axes=(None, None), donate_argnums=(0,))

  def jit_eval_step(self, eval_step: Callable, logical_specs: Any) -> Callable:
    del logical_specs
    pmapped = jax.pmap(eval_step, axis_name=self.axis_name, in_axes=(None, 0, None),
                       out_axes=None)
    return lambda params, batch, step=None: pmapped(params, batch, step)

  def jit_replicated(self, fn: Callable) -> Callable:
    """``jax.jit(fn)`` with replicated outputs (for small probes of the state)."""
    return jax.jit(fn, out_shardings=self.replicated)

  def put_batch(self, batch: Mapping[str, Any]) -> dict:
    """Process-local rows -> [local devices, rows / local devices, ...]."""
    n = len(self.local_devices)
    rows = _process_rows(batch)
    if rows % n:
      raise ValueError(f"Per-process batch size {rows} is not divisible by the {n} "
                       "local devices of pmap mode.")
    return {k: np.asarray(v).reshape((n, rows // n) + np.shape(v)[1:])
            for k, v in batch.items()}


def build(parallel_cfg: Mapping[str, Any], devices: Optional[Sequence[Any]] = None):
  """The parallel strategy named by ``parallel_cfg.mode``."""
  mode = dict(parallel_cfg).get("mode", "mesh")
  return PARALLEL.lookup(mode)(parallel_cfg, devices)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct`` tree carrying shardings (an orbax restore target)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)

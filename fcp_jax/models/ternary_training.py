"""Training-side helpers for ternary models: λ schedules, weight-decay masks, metrics.

The layer itself (``TernaryDense``, the quantizers, the straight-through estimator) is
``fcp_jax.models.ternary``; this module holds what the training code builds around it:
the per-layer λ warm-up (``lambda_schedule``), the optimizer's weight-decay mask, the
float ↔ ternary parameter conversions of checkpoints (``strip_quant_params``,
``fill_quant_params``), the data-dependent init of elastic steps (``init_act_alphas``),
the flattening of the sown monitoring values (``quant_metrics``) and the code flip rate
between two parameter trees (``flip_rates``), or, in a training loop, since the last
logged step (``FlipRate``, on device). ``docs/ternary_methods.md`` §2.4 describes the
schedule and mask.
"""

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fcp_jax.models import packing
from fcp_jax.models import ternary
from fcp_jax.models.ternary import QUANT_PARAM_NAMES

Array = jax.Array


def lambda_schedule(step: Any, *, num_layers: int, start: float = 0, ramp: float = 0,
                    stagger: float = 0) -> Array:
  """λ per layer [L] at ``step``: clip((step - start - ℓ·stagger) / ramp, 0, 1).

  ``stagger=0`` is the global warm-up ramp (Hugging Face "warmup quantization");
  ``stagger>0`` ramps layer ℓ (counted from the input) ``ℓ·stagger`` steps later.
  ``ramp=0`` switches each layer to λ=1 at its start step. Jittable in ``step``.
  """
  if ramp < 0 or stagger < 0 or num_layers < 1:
    raise ValueError(f"lambda_schedule: need ramp >= 0, stagger >= 0, num_layers >= 1; "
                     f"got ramp={ramp}, stagger={stagger}, num_layers={num_layers}.")
  t = jnp.asarray(step, jnp.float32)
  begin = start + stagger * jnp.arange(num_layers, dtype=jnp.float32)  # [L]
  if ramp == 0:
    return (t >= begin).astype(jnp.float32)
  return jnp.clip((t - begin) / ramp, 0.0, 1.0)


def _leaf_name(path) -> str:
  keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else ""


def weight_decay_mask(params: Any) -> Any:
  """True on latent ``kernel``s of dense layers only (no scales, shifts, norms, biases,
  embeddings). Works on boxed (``nn.Partitioned``) and plain trees."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) == "kernel", params)


def strip_quant_params(params: Any) -> Any:
  """Drops the ternary-only parameters: a ternary checkpoint → a float one."""
  if not isinstance(params, dict) and not hasattr(params, "items"):
    return params
  return {k: strip_quant_params(v) for k, v in params.items()
          if k not in QUANT_PARAM_NAMES}


def fill_quant_params(model: nn.Module, params: Any, tokens: Array,
                      rng: Optional[Array] = None) -> Any:
  """Adds the ternary-only parameters a float checkpoint lacks.

  Runs ``model`` (ternary config) on ``tokens`` with ``params`` mutable, so each missing
  parameter is initialised from the *loaded* kernel (SEQ's α = max|W|, DLT's TWN
  scale) or from the activations of ``tokens`` (elastic ``a_alpha``); norms start at 1.
  A plain (unboxed) ``params`` gives a plain tree back.
  """
  rng = jax.random.key(0) if rng is None else rng
  fill = jax.jit(lambda p, t, r: model.apply({"params": p}, t, rngs={"params": r},
                                             mutable=["params"])[1])
  variables = fill(params, tokens, rng)
  boxed = any(isinstance(x, nn.Partitioned) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned)))
  return variables["params"] if boxed else nn.unbox(variables["params"])


def _select(tree: Any, keep) -> Any:
  """The nested dicts of ``tree`` with only the leaves whose name passes ``keep``."""
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      sub = _select(v, keep)
      if sub:
        out[k] = sub
    elif keep(k):
      out[k] = v
  return out


def _merge(tree: Any, update: Any) -> Any:
  """``tree`` with the leaves of ``update`` (a sub-tree of the same nesting) replaced."""
  return {k: (_merge(v, update[k]) if hasattr(v, "items") else update[k])
          if k in update else v for k, v in tree.items()}


def has_act_alphas(params: Any) -> bool:
  """Whether ``params`` holds elastic activation steps (``a_alpha``)."""
  return bool(_select(params, lambda k: k == "a_alpha"))


def init_act_alphas(model: nn.Module, params: Any, tokens: Array, *,
                    jit: Callable = jax.jit, **inputs) -> Any:
  """``params`` with every elastic ``a_alpha`` initialised from the batch ``tokens``.

  ``model.init`` sees dummy all-zero tokens; TBT initialises each layer's step from the
  first real batch. This drops the ``a_alpha`` leaves and runs ``model`` on ``tokens``
  (``inputs``: ``positions``, ``segment_ids``, ``qlambda``), so each is created again,
  in layer order, from the input its layer gets (``Elastic.init_params``). Every other
  leaf is returned unchanged. ``params`` is a plain (unboxed) tree; without elastic
  layers it is returned as is, with nothing run. ``jit``: e.g. a parallel mode's
  ``jit_replicated``.
  """
  if not has_act_alphas(params):
    return params
  stripped = _select(params, lambda k: k != "a_alpha")

  def alphas(p, t, kw):
    _, variables = model.apply({"params": p}, t, **kw, rngs={"params": jax.random.key(0)},
                               mutable=["params"])
    return _select(nn.unbox(variables["params"]), lambda k: k == "a_alpha")

  return _merge(params, jit(alphas)(stripped, tokens, inputs))


def _codes(weight_quant: str, shard_axis: int, num_lead: int):
  """``(kernel, qparams) -> codes [..., K, N]`` (vmapped over ``num_lead`` axes)."""
  wq = ternary.weight_quantizer(weight_quant, shard_axis)
  codes = lambda w, qp: wq.quantize(w.astype(jnp.float32), qp).codes
  for _ in range(num_lead):
    codes = jax.vmap(codes)
  return codes


@functools.lru_cache(maxsize=None)
def _codes_fn(weight_quant: str, shard_axis: int, num_lead: int):
  """Jitted ``_codes``."""
  return jax.jit(_codes(weight_quant, shard_axis, num_lead))


def _quantized_layers(cfg: Any) -> Dict[Tuple[str, ...], Any]:
  """``packing.ternary_layers`` of ``cfg`` whose weights are quantized."""
  return {path: info for path, info in packing.ternary_layers(cfg).items()
          if info.weight_quant != "none"}


def _layer_codes(info: Any, layer: Dict[str, Array]) -> Array:
  """Codes [..., K, N] of one TernaryDense's params (its own scales, if learned)."""
  fn = _codes(info.weight_quant, ternary.shard_axis_of(info.kernel_axes),
              layer["kernel"].ndim - 2)
  return fn(layer["kernel"], {n: layer[n] for n in ("w_alpha", "w_shift") if n in layer})


def flip_rates(old_params: Any, new_params: Any, cfg: Any,
               prefix: str = "quant") -> Dict[str, float]:
  """Fraction of ternary codes that changed from ``old_params`` to ``new_params``.

  Both are latent trees of ``Transformer(cfg)`` (boxed or plain). Returns
  ``{prefix}/{layer path}/flip_rate`` per ternary kernel (scanned layers together) and
  the overall ``{prefix}/flip_rate`` (flips / codes over all kernels).
  """
  trees = nn.unbox(old_params), nn.unbox(new_params)
  out: Dict[str, float] = {}
  flips = total = 0
  for path, info in _quantized_layers(cfg).items():
    old, new = (functools.reduce(lambda t, p: t[p], path, tree) for tree in trees)
    fn = _codes_fn(info.weight_quant, ternary.shard_axis_of(info.kernel_axes),
                   old["kernel"].ndim - 2)
    codes = lambda l: fn(l["kernel"], {n: l[n] for n in ("w_alpha", "w_shift") if n in l})
    changed = int(jnp.sum(codes(old) != codes(new)))
    size = old["kernel"].size
    out["/".join([prefix, *path, "flip_rate"])] = changed / size
    flips, total = flips + changed, total + size
  if total:
    out[f"{prefix}/flip_rate"] = flips / total
  return out


def flip_rate(old_params: Any, new_params: Any, cfg: Any) -> float:
  """Overall fraction of ternary codes that changed (see ``flip_rates``)."""
  return flip_rates(old_params, new_params, cfg, prefix="quant").get("quant/flip_rate", 0.0)


class FlipRate:
  """Fraction of ternary codes that changed since the previous call, on device.

      flips = FlipRate(cfg, state.params)   # keeps the codes of these params
      metrics = flips(state.params)         # after some updates; keeps the new codes

  Keeps the codes of every quantized kernel (int8, one byte per weight, each sharded
  as its kernel) instead of a copy of the params: the train step donates its state.
  One jitted call per step computes the new codes and the changed counts per kernel
  (and per scanned layer, in int32), replicated, so every process of a multi-process
  run gets the same numbers without gathering a sharded array. Returns
  ``{prefix}/flip_rate`` over all kernels and ``{prefix}/{kind}/flip_rate`` per
  projection kind (``q_proj``, ..., summed over layers): ``flip_rates``' totals.
  ``params``: a plain (unboxed) tree of ``Transformer(cfg)``, e.g. ``state.params``.
  """

  def __init__(self, cfg: Any, params: Any, prefix: str = "quant"):
    self.prefix = prefix
    self.layers = _quantized_layers(cfg)
    if not self.layers:
      raise ValueError("FlipRate: the model has no ternary weights.")
    kernels = [functools.reduce(lambda t, p: t[p], path, params)["kernel"]
               for path in self.layers]
    # Counts per kernel's leading (scanned layer) index: int32 never overflows.
    self._sizes = [np.prod(k.shape[-2:]) for k in kernels]
    self._slices = np.cumsum([0] + [int(np.prod(k.shape[:-2])) for k in kernels])
    shardings = [k.sharding if isinstance(getattr(k, "sharding", None), NamedSharding)
                 else None for k in kernels]
    mesh = next((s.mesh for s in shardings if s is not None), None)
    replicated = NamedSharding(mesh, P()) if mesh is not None else None
    codes_fn = lambda p: [_layer_codes(info, functools.reduce(lambda t, k: t[k], path, p))
                          .astype(jnp.int8) for path, info in self.layers.items()]

    def update(old_codes, p):
      new_codes = codes_fn(p)  # [..., K, N] int8 each
      changed = [jnp.sum(o != n, axis=(-2, -1), dtype=jnp.int32).reshape(-1)
                 for o, n in zip(old_codes, new_codes)]
      return new_codes, jnp.concatenate(changed)  # [sum of lead sizes]

    self._init = jax.jit(codes_fn, out_shardings=shardings)
    self._update = jax.jit(update, out_shardings=(shardings, replicated),
                           donate_argnums=(0,))  # The old codes.
    self._codes = self._init(params)

  def __call__(self, params: Any) -> Dict[str, float]:
    self._codes, changed = self._update(self._codes, params)
    changed = np.asarray(jax.device_get(changed), np.int64)
    flips: Dict[str, int] = {}
    sizes: Dict[str, int] = {}
    for i, path in enumerate(self.layers):
      part = changed[self._slices[i]:self._slices[i + 1]]
      kind = path[-1]
      flips[kind] = flips.get(kind, 0) + int(part.sum())
      sizes[kind] = sizes.get(kind, 0) + int(self._sizes[i]) * len(part)
    out = {f"{self.prefix}/flip_rate": sum(flips.values()) / sum(sizes.values())}
    out.update({f"{self.prefix}/{kind}/flip_rate": flips[kind] / sizes[kind]
                for kind in sorted(flips)})
    return out


def quant_metrics(intermediates: Any, prefix: str = "quant") -> Dict[str, float]:
  """Flattens sown monitoring values into ``{"quant/layers_0/attn/q_proj/zero_frac": …}``.

  The code histogram becomes ``…/code_hist/neg``, ``…/zero`` and ``…/pos`` (counts).

  Scanned models (values stacked along a leading layer axis under ``layers``) are
  split into ``layers_{i}``. Also returns the mean zero fraction as ``{prefix}/zero_frac``.
  """
  out: Dict[str, float] = {}
  zero_fracs = []
  base_ndim = {"zero_frac": 0, "scale": 0, "code_hist": 1}

  def emit(names, leaf_name, value):
    name = "/".join([prefix, *names, leaf_name])
    if leaf_name == "code_hist":
      # Codes -1, 0, +1 (names TensorBoard accepts).
      for label, v in zip(("neg", "zero", "pos"), value):
        out[f"{name}/{label}"] = float(v)
    else:
      out[name] = float(value)
      if leaf_name == "zero_frac":
        zero_fracs.append(float(value))

  def visit(node, names):
    for key, value in node.items():
      if key in base_ndim:
        value = np.mean(np.stack([np.asarray(v) for v in value]), axis=0)
        lead = value.shape[:value.ndim - base_ndim[key]]
        for idx in np.ndindex(*lead):
          layer_names = list(names)
          for i in idx:  # Stacked along a scan axis: name each slice.
            pos = layer_names.index("layers") if "layers" in layer_names else None
            if pos is None:
              layer_names.append(str(i))
            else:
              layer_names[pos] = f"layers_{i}"
          emit(layer_names, key, value[idx])
      elif hasattr(value, "items"):
        visit(value, [*names, str(key)])

  visit(intermediates, [])
  if zero_fracs:
    out[f"{prefix}/zero_frac"] = float(np.mean(zero_fracs))
  return out

"""Training-side helpers for ternary models: λ schedules, weight-decay masks, metrics.

The layer itself (``TernaryDense``, the quantizers, the straight-through estimator) is
``fcp_jax.models.ternary``; this module holds what the training code builds around it:
the per-layer λ warm-up (``lambda_schedule``), the optimizer's weight-decay mask, the
float ↔ ternary parameter conversions of checkpoints (``strip_quant_params``,
``fill_quant_params``) and the flattening of the sown monitoring values
(``quant_metrics``). ``docs/ternary_methods.md`` §2.4 describes the schedule and mask.
"""

from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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

"""Optimizer from config: AdamW with warm-up + decay, clipping, masks and two stages.

    opt = make_optimizer(config.optim, total_steps=1000, model_cfg=model_cfg)
    opt.tx                 # optax.GradientTransformation
    opt.lr(step)           # learning rate used by the update at ``step``
    opt.weight_decay(step)

The learning-rate shape is a registry string (``SCHEDULES``): ``"cosine"``,
``"cosine(end_factor=0.1)"``, ``"linear"``, ``"constant"``. A linear warm-up of
``warmup_steps`` (or ``warmup_frac`` of training) precedes it.

Two-stage training (BitNet b1.58): at ``stage2_at`` (a fraction of ``total_steps``; 0 is
off) the learning rate is multiplied by ``stage2_lr_factor`` and the weight decay
becomes ``stage2_weight_decay`` (0 in BitNet). LR and WD go through
``optax.inject_hyperparams`` so the schedules live in the optimizer state and never
recompile.

The weight-decay shape is ``weight_decay_schedule``, a ``SCHEDULES`` string too, over
stage 1 only: the peak ``weight_decay`` through the warm-up, then the shape of
``p = (step - warmup) / (stage 2 step - warmup)`` (to the end of training without a
stage 2); stage 2 sets ``stage2_weight_decay``. Unset it is ``"constant"`` (no key is
added, so older configs keep their schedules and stage keys). ``"cosine"`` is BitNet
b1.58 2B4T's (``docs/ternary_methods.md`` §1.1), which the report describes only as a
cosine that peaks at 0.1 in stage 1 and is 0 in stage 2; here it peaks with the LR:

    wd(step) = weight_decay * 0.5 * (1 + cos(pi * clip(p, 0, 1)))   # step < stage 2
    wd(step) = stage2_weight_decay                                  # step >= stage 2

The whole 2B4T schedule (cosine LR halved at mid-training; WD 0.1 → 0 by cosine over
the first half, 0 in the second) is ``configs/common.py``'s
``optim(lr, **bitnet_2b4t())``, or in any config::

    config.optim.update(schedule="cosine", weight_decay=0.1, stage2_at=0.5,
                        weight_decay_schedule="cosine", stage2_lr_factor=0.5,
                        stage2_weight_decay=0.0)

Weight decay applies only where ``weight_decay_mask`` says so: for ternary models
``ternary_training.weight_decay_mask`` (latent dense kernels only), otherwise every
``kernel`` leaf (dense layers and the untied LM head; never embeddings, norm gains or
biases).
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fcp_jax.registry import Registry

Schedule = Callable[[jax.Array], jax.Array]
SCHEDULES = Registry("lr schedule")


@SCHEDULES.register("constant")
def constant(progress: jax.Array) -> jax.Array:
  """Multiplier 1 after warm-up."""
  return jnp.ones_like(progress)


@SCHEDULES.register("cosine")
def cosine(progress: jax.Array, *, end_factor: float = 0.0) -> jax.Array:
  """Half cosine from 1 to ``end_factor`` over the post-warm-up steps."""
  return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))


@SCHEDULES.register("linear")
def linear(progress: jax.Array, *, end_factor: float = 0.0) -> jax.Array:
  """Straight line from 1 to ``end_factor`` over the post-warm-up steps."""
  return 1.0 - (1.0 - end_factor) * progress


@dataclasses.dataclass(frozen=True)
class Optimizer:
  tx: optax.GradientTransformation
  lr: Schedule
  weight_decay: Schedule


def warmup_steps(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> int:
  if optim_cfg.get("warmup_steps", 0):
    return int(optim_cfg.warmup_steps)
  return int(round(optim_cfg.get("warmup_frac", 0.0) * total_steps))


def make_schedules(optim_cfg: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[Schedule, Schedule]:
  """(learning rate, weight decay) as functions of the update count."""
  if total_steps <= 0:
    raise ValueError(f"optim: total_steps must be positive, got {total_steps}.")
  shape = SCHEDULES.get(optim_cfg.get("schedule", "cosine"))
  warmup = warmup_steps(optim_cfg, total_steps)
  stage2_at = float(optim_cfg.get("stage2_at", 0.0))
  if not 0.0 <= stage2_at < 1.0:
    raise ValueError(f"optim.stage2_at must be a fraction in [0, 1), got {stage2_at}.")
  stage2_step = int(round(stage2_at * total_steps)) if stage2_at else None
  base_lr = float(optim_cfg.lr)
  base_wd = float(optim_cfg.get("weight_decay", 0.0))
  lr_factor2 = float(optim_cfg.get("stage2_lr_factor", 1.0))
  wd2 = float(optim_cfg.get("stage2_weight_decay", 0.0))
  # Unset: no key, so configs without it keep their schedules (and stage keys).
  wd_spec = optim_cfg.get("weight_decay_schedule", "constant")
  wd_shape = SCHEDULES.get(wd_spec)
  wd_end = stage2_step if stage2_step is not None else total_steps

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(1.0, (step + 1.0) / warmup) if warmup else 1.0
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    value = base_lr * ramp * shape(progress)
    if stage2_step is not None:
      value = jnp.where(step >= stage2_step, value * lr_factor2, value)
    return value

  def wd(step):
    value = jnp.full((), base_wd, jnp.float32)
    if wd_spec != "constant":  # Over stage 1: peak through the warm-up, then the shape.
      t = jnp.asarray(step, jnp.float32)
      value = value * wd_shape(jnp.clip((t - warmup) / max(wd_end - warmup, 1), 0.0, 1.0))
    if stage2_step is not None:
      value = jnp.where(jnp.asarray(step) >= stage2_step, wd2, value)
    return value

  return lr, wd


def kernels_only_mask(params: Any) -> Any:
  """True on every leaf named ``kernel`` (dense layers), False elsewhere."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, "key", getattr(last, "name", None)) == "kernel"
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def weight_decay_mask(model_cfg: Any) -> Callable[[Any], Any]:
  """The decay mask function for this model: ternary-aware when it quantizes."""
  if getattr(model_cfg, "weight_quant", "none") != "none":
    from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
    return ternary_training.weight_decay_mask
  return kernels_only_mask


def make_optimizer(optim_cfg: ml_collections.ConfigDict, *, total_steps: int,
                   model_cfg: Any = None) -> Optimizer:
  """AdamW with global-norm clipping, schedules and the weight-decay mask."""
  lr, wd = make_schedules(optim_cfg, total_steps)
  adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=lr, b1=float(optim_cfg.get("b1", 0.9)),
      b2=float(optim_cfg.get("b2", 0.999)), eps=float(optim_cfg.get("eps", 1e-8)),
      weight_decay=wd, mask=weight_decay_mask(model_cfg))
  parts = []
  clip = float(optim_cfg.get("clip_norm", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(adamw)
  return Optimizer(tx=optax.chain(*parts), lr=lr, weight_decay=wd)

"""Distillation from a frozen float teacher: logit KL plus hidden-state terms.

An offline run (any objective: fcp, sft, rft, warmup, ...) with ``config.distill``
whose ``teacher`` is set trains the student (its own model, e.g. under ternary QAT) on

    loss = ce_weight * task + kl_weight * KL_tau + feature_weight * sum_l F(h^S_l, h^T_l)

at every target (response) position, aggregated as the task loss (``config.loss``) is:
same mask, same denominator, so micro-batches and replicas combine exactly.

* ``task``: the run's loss (the masked NLL of SFT / RFT / FCP);
* ``KL_tau = tau^2 KL(softmax(z^T / tau) || softmax(z^S / tau))`` of the logits that
  predict each target (TBT's logit KD; the tau^2 keeps gradient sizes independent of
  the temperature, as in Hinton et al.);
* ``F`` (``FEATURE_LOSSES``, ``feature``) on the block outputs (residual stream) of the
  selected ``layers`` (all by default) at the same positions, summed over layers:
  ``off_cosine`` is ``1 - cos(h^S, h^T)`` (TernaryLLM's OFF: scale-invariant, so
  insensitive to outlier channels), ``mse`` the mean over features of
  ``(h^S - h^T)^2`` (TBT's hidden-state KD), ``none`` logits only.

The metrics add ``distill_ce`` (NLL), ``distill_kl`` and ``distill_feature``, each a mean
per target token.

``teacher`` is a run folder or checkpoint (``path[:STEP]``, as ``init_from``), or
``"init_from"``: the params the run starts from (the pipeline's ternary warm-up: the
float pretrained base). The teacher runs its own model config (the ``model`` of the
teacher run's ``config.json``, else the student's) with quantization off. Its params
are a third argument of the train step, placed with their own logical shardings
(replicated in pmap mode) and read once; they are never in the train state, so neither
the optimizer nor checkpoints see them, and the step uses them under ``stop_gradient``.

    config.distill = distill.section(teacher="init_from", feature="off_cosine",
                                     feature_weight=1.0)
"""

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fcp_jax import registry
from fcp_jax.models import transformer as transformer_lib
from fcp_jax.training import losses as losses_lib
from fcp_jax.training import sharding as sharding_lib
from fcp_jax.training import state as state_lib

Array = jax.Array
FEATURE_LOSSES = registry.Registry("distill feature loss")
INIT_FROM = "init_from"  # ``teacher``: the checkpoint the run starts from.
# The ``distill`` section's keys and defaults (``teacher`` None or "": off).
DEFAULTS = dict(teacher=None, ce_weight=1.0, kl_weight=1.0, temperature=1.0,
                feature="none", feature_weight=0.0, layers=())
FLOAT = dict(weight_quant="none", act_quant="none")  # The teacher runs unquantized.


# ---------------------------------------------------------------------------------------
# Feature losses: student, teacher [L, B, T, D] -> [L, B, T] per layer and position.
# ---------------------------------------------------------------------------------------


@FEATURE_LOSSES.register("none")
def no_feature(student: Array, teacher: Array) -> Array:
  """No hidden-state term (the step does not even collect hidden states)."""
  del teacher
  return jnp.zeros(student.shape[:-1], jnp.float32)


@FEATURE_LOSSES.register("off_cosine")
def off_cosine(student: Array, teacher: Array, *, eps: float = 1e-6) -> Array:
  """TernaryLLM's OFF: ``1 - cos(h^S, h^T)`` over the feature axis."""
  s, t = student.astype(jnp.float32), teacher.astype(jnp.float32)
  dot = jnp.sum(s * t, axis=-1)
  norms = jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1)
  return 1.0 - dot / jnp.maximum(norms, eps)


@FEATURE_LOSSES.register("mse")
def mse(student: Array, teacher: Array) -> Array:
  """TBT's hidden-state MSE: the mean over features of ``(h^S - h^T)^2``."""
  diff = student.astype(jnp.float32) - teacher.astype(jnp.float32)
  return jnp.mean(diff * diff, axis=-1)


def kl_divergence(teacher_logits: Array, student_logits: Array,
                  temperature: float = 1.0) -> Array:
  """``tau^2 KL(p_T || p_S)`` per position of [..., V] logits at temperature ``tau``."""
  log_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)  # [...]
  return kl * temperature**2


# ---------------------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------------------


def section(**overrides) -> ml_collections.ConfigDict:
  """A ``distill`` config section: ``DEFAULTS`` with ``overrides`` (checked)."""
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"distill: unknown keys {unknown}; valid keys {sorted(DEFAULTS)}.")
  return ml_collections.ConfigDict({**DEFAULTS, **overrides})


@dataclasses.dataclass(frozen=True)
class Settings:
  """A checked ``config.distill`` section (see the module docstring)."""
  teacher: str
  ce_weight: float
  kl_weight: float
  temperature: float
  feature: str
  feature_weight: float
  layers: Tuple[int, ...]


def _feature_name(spec: str) -> str:
  return registry.parse_spec(spec)[0]


def parse(distill_cfg: Optional[Mapping[str, Any]], init_from: str = ""
          ) -> Optional[Settings]:
  """``Settings`` of a ``config.distill`` section; ``None`` when absent or off.

  Raises ``ValueError`` naming the key for an unknown key or a bad value.
  """
  if distill_cfg is None:
    return None
  cfg = dict(distill_cfg)
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"config.distill has unknown keys {unknown}; valid keys: "
                     f"{sorted(DEFAULTS)}.")
  cfg = {**DEFAULTS, **cfg}
  if not cfg["teacher"]:
    return None
  teacher = str(cfg["teacher"])
  if teacher == INIT_FROM:
    if not init_from:
      raise ValueError("config.distill.teacher='init_from', but config.init_from is "
                       "empty: name the teacher's run folder or set init_from.")
    teacher = str(init_from)
  for key in ("ce_weight", "kl_weight", "feature_weight"):
    if not isinstance(cfg[key], (int, float)) or cfg[key] < 0:
      raise ValueError(f"config.distill.{key} must be a number >= 0, got {cfg[key]!r}.")
  if not isinstance(cfg["temperature"], (int, float)) or cfg["temperature"] <= 0:
    raise ValueError("config.distill.temperature must be a number > 0, got "
                     f"{cfg['temperature']!r}.")
  feature = cfg["feature"]
  try:  # Unknown kinds and bad arguments fail here, not in the train step.
    FEATURE_LOSSES.get(feature)(jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)))
  except (KeyError, ValueError, TypeError) as e:
    raise ValueError(f"config.distill.feature={feature!r}: {e}") from None
  has_feature = _feature_name(feature) != "none"
  if has_feature != (cfg["feature_weight"] > 0):
    raise ValueError(
        f"config.distill.feature={feature!r} with config.distill.feature_weight="
        f"{cfg['feature_weight']!r}: a feature loss needs a weight > 0, and "
        "feature='none' a weight of 0.")
  layers = cfg["layers"]
  if not isinstance(layers, (list, tuple)) or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in layers):
    raise ValueError("config.distill.layers must be a tuple of layer indices (() = all "
                     f"layers), got {layers!r}.")
  if not cfg["ce_weight"] and not cfg["kl_weight"] and not has_feature:
    raise ValueError("config.distill: ce_weight, kl_weight and feature_weight are all "
                     "0; nothing would be trained.")
  return Settings(teacher=teacher, ce_weight=float(cfg["ce_weight"]),
                  kl_weight=float(cfg["kl_weight"]),
                  temperature=float(cfg["temperature"]), feature=feature,
                  feature_weight=float(cfg["feature_weight"]), layers=tuple(layers))


def _run_folder(path: str) -> str:
  """The run folder of ``RUN``, ``RUN:STEP`` or ``RUN/checkpoints`` (``init_from``)."""
  if ":" in path and path.rsplit(":", 1)[1].isdigit():
    path = path.rsplit(":", 1)[0]
  path = path.rstrip(os.sep)
  return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def teacher_model_config(teacher: str, student_model: Mapping[str, Any]
                         ) -> transformer_lib.TransformerConfig:
  """The teacher's ``TransformerConfig``, float.

  The ``model`` section of the teacher run's ``config.json`` when it has one, else
  ``student_model`` (e.g. the pipeline's pretrained ``base/``, written for the
  student's architecture); quantization is off either way. A teacher run that trained
  quantized is an error: the teacher is the float model.
  """
  path = os.path.join(_run_folder(teacher), "config.json")
  model = dict(student_model)
  if os.path.isfile(path):
    with open(path) as f:
      model = json.load(f).get("model") or model
    if (model.get("weight_quant") or "none") != "none":
      raise ValueError(f"config.distill.teacher={teacher!r} trained a quantized model "
                       f"(weight_quant={model['weight_quant']!r} in {path}); the "
                       "teacher must be a float run.")
  return transformer_lib.from_config(model).replace(**FLOAT)


# ---------------------------------------------------------------------------------------
# The distillation loss terms.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distiller:
  """The distillation objective of one student model (``build``).

  Attributes:
    settings: the checked ``config.distill``.
    teacher_model: the float teacher ``Transformer``.
    layers: the block indices of the feature loss (empty without one).
  """
  settings: Settings
  teacher_model: transformer_lib.Transformer
  layers: Tuple[int, ...]

  @property
  def feature_fn(self) -> Optional[Callable[[Array, Array], Array]]:
    if not self.layers:
      return None
    return FEATURE_LOSSES.get(self.settings.feature)

  def _forward(self, model, params, tokens, inputs, qlambda, rngs):
    """Final hidden states [B, T, D] and the selected layers' [L', B, T, D] (or None)."""
    if self.feature_fn is None:
      hidden, _ = model.apply({"params": params}, tokens, **inputs, qlambda=qlambda,
                              return_hidden=True, rngs=rngs)
      return hidden, None
    (hidden, _), sown = model.apply({"params": params}, tokens, **inputs,
                                    qlambda=qlambda, return_hidden=True, rngs=rngs,
                                    mutable=[transformer_lib.HIDDEN])
    states = transformer_lib.layer_hidden(model.cfg, sown)  # [L, B, T, D]
    return hidden, states[jnp.asarray(self.layers)]  # [L', B, T, D]

  def terms(self, model, loss, params, teacher_params, batch: Mapping[str, Array],
            inputs: Mapping[str, Array], qlambda, rng) -> losses_lib.LossTerms:
    """The summed terms of one micro-batch: the task loss's, with the KL and feature
    sums added to its numerator (same mask and denominator) and reported.

    Args:
      model: the student ``Transformer``; ``params`` its params (differentiated).
      loss: the task loss (``losses.LOSSES``).
      teacher_params: the teacher's params (used under ``stop_gradient``).
      batch: the (prepared) micro-batch; ``inputs`` its model inputs (positions, ...).
      qlambda: the student's ternary λ; rng: its dropout key.
    """
    s = self.settings
    tokens = batch["tokens"]  # [B, T]
    teacher_params = jax.lax.stop_gradient(teacher_params)
    h_s, layers_s = self._forward(model, params, tokens, inputs, qlambda,
                                  {"dropout": rng})  # [B, T, D], [L', B, T, D]
    h_t, layers_t = jax.lax.stop_gradient(self._forward(
        self.teacher_model, teacher_params, tokens, inputs, None, None))
    project_s = lambda x: transformer_lib.project(model.cfg, params, x, qlambda)
    project_t = lambda x: transformer_lib.project(self.teacher_model.cfg, teacher_params,
                                                  x)

    def stats(xs):
      x_s, x_t, y = xs  # [B, C, D], [B, C, D], [B, C]
      z_s = project_s(x_s)  # [B, C, V] float32
      z_t = jax.lax.stop_gradient(project_t(x_t))  # [B, C, V]
      logp, correct = losses_lib.predictions(z_s, y)  # [B, C] each
      return logp, correct, kl_divergence(z_t, z_s, s.temperature)

    args = (h_s[:, :-1], h_t[:, :-1], tokens[:, 1:])
    chunk = model.cfg.loss_chunk
    logp, correct, kl = (losses_lib.map_chunks(stats, args, chunk) if chunk
                         else stats(args))  # [B, T-1] each
    terms = loss.from_logprobs(logp, correct, batch)
    mask = losses_lib.target_mask(batch)  # [B, T-1]
    kl_sum = jnp.sum(kl * mask)
    sums = dict(terms.token_sums, distill_ce=jnp.sum(-logp * mask), distill_kl=kl_sum)
    numerator = s.ce_weight * terms.numerator + s.kl_weight * kl_sum
    if self.feature_fn is not None:
      feature = self.feature_fn(layers_s[:, :, :-1], layers_t[:, :, :-1])  # [L', B, T-1]
      feature_sum = jnp.sum(jnp.sum(feature, axis=0) * mask)
      sums["distill_feature"] = feature_sum
      numerator = numerator + s.feature_weight * feature_sum
    return terms.replace(numerator=numerator, token_sums=sums)


def build(config: Mapping[str, Any], student_cfg: transformer_lib.TransformerConfig
          ) -> Optional[Distiller]:
  """The ``Distiller`` of a run config (``config.distill``), ``None`` when off."""
  settings = parse(config.get("distill"), config.get("init_from", ""))
  if settings is None:
    return None
  teacher_cfg = teacher_model_config(settings.teacher, config["model"])
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise ValueError(f"config.distill.teacher={settings.teacher!r}: the teacher's "
                     f"vocab_size {teacher_cfg.vocab_size} differs from the student's "
                     f"{student_cfg.vocab_size}; the KL needs one vocabulary.")
  layers: Tuple[int, ...] = ()
  if _feature_name(settings.feature) != "none":
    if (teacher_cfg.num_layers, teacher_cfg.embed_dim) != (student_cfg.num_layers,
                                                            student_cfg.embed_dim):
      raise ValueError(
          f"config.distill.feature={settings.feature!r} compares hidden states layer by "
          f"layer, but the teacher has {teacher_cfg.num_layers} layers of width "
          f"{teacher_cfg.embed_dim} and the student {student_cfg.num_layers} of width "
          f"{student_cfg.embed_dim}.")
    n = student_cfg.num_layers
    bad = [i for i in settings.layers if not -n <= i < n]
    if bad:
      raise ValueError(f"config.distill.layers has indices {bad} outside the "
                       f"{n} layers of the model.")
    layers = tuple(sorted({i % n for i in settings.layers})) or tuple(range(n))
  logging.info("Distillation from %s: %s; feature layers %s.", settings.teacher,
               settings, list(layers))
  return Distiller(settings=settings, teacher_model=transformer_lib.Transformer(
      teacher_cfg), layers=layers)


class TeacherParams:
  """The teacher's params with their shardings under ``par``, read on first use.

  Attributes:
    specs: logical ``PartitionSpec`` tree of the teacher's params.
    abstract: ``ShapeDtypeStruct`` tree with shardings (the restore target).
  """

  def __init__(self, distiller: Distiller, par: Any):
    self.path = distiller.settings.teacher
    model = distiller.teacher_model
    self.specs = state_lib.param_logical_specs(model)
    abstract = jax.eval_shape(lambda: nn.unbox(state_lib.init_boxed_params(
        model, jax.random.PRNGKey(0))))
    self.abstract = sharding_lib.abstract_with_shardings(abstract,
                                                         par.shardings(self.specs))
    self._params = None

  @property
  def params(self) -> Any:
    return self.load()

  def load(self) -> Any:
    """The params of ``path`` (its newest complete step, or ``path:STEP``'s), once."""
    if self._params is None:
      from fcp_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
      self._params = checkpoint.restore_params(self.path, self.abstract)
      logging.info("Distillation teacher: read %s.", self.path)
    return self._params

  def bind(self, train_step: Callable[..., Any]) -> Callable[..., Any]:
    """``(state, batch)`` -> ``train_step(state, batch, teacher params)``."""

    def run(state, batch):
      return train_step(state, batch, self.params)

    run.jitted = getattr(train_step, "jitted", None)  # Lowered with ``abstract``.
    return run

"""The pure training and evaluation steps (device code; jitted by ``sharding.py``).

``build_training(config, par, total_steps=...)`` assembles everything a driver needs
(model, optimizer, loss, specs, compiled steps) from a run config.

    qlambda_fn = make_qlambda_fn(model_cfg, config.quant)    # None for float models
    train_step = make_train_step(model, loss, optimizer, qlambda_fn=qlambda_fn,
                                 grad_accum=4)
    state, metrics = train_step(state, batch)      # pure; the caller donates ``state``
    eval_step = make_eval_step(model, loss, qlambda_fn=qlambda_fn)
    metrics = eval_step(params, batch)             # or eval_step(params, batch, step)

One loss function serves both parallel modes: under ``jax.jit`` with shardings
(``axis_name=None``) GSPMD inserts the reductions; under ``jax.pmap``
(``axis_name="batch"``) the gradients of the loss numerators, the normalisers and the
metric sums are ``lax.psum``-ed over replicas before the division, which is the
``pmean`` of per-replica gradients weighted by their share of the loss tokens (exactly
the single-device full-batch gradient).

``grad_reduce`` (``grad_compression``, from ``config.grad_compression``) does that
gradient ``psum``; a compressing reducer (TernGrad) needs per-replica gradients, so in
``mesh`` mode ``build_training`` then runs the step per data shard under ``shard_map``
(``sharding.MeshParallel.jit_train_step(per_replica=True)``).

Gradient accumulation splits the batch into ``grad_accum`` micro-batches (rows ``i,
i+k, i+2k, ...`` so every data shard contributes to every micro-batch) and runs them in
a ``lax.scan`` that sums the gradients of the loss *numerators*; dividing by the
full-batch denominator afterwards makes the update equal to the full-batch update.

The ternary blend ``qlambda`` [L] comes from ``ternary_training.lambda_schedule`` at
``state.step`` (a traced value: the schedule never recompiles); float models get
``None``. The step RNG is ``fold_in(state.rng, state.step)``.

Distillation (``config.distill``, ``distill.py``): ``make_train_step(..., distill=d)``
builds ``train_step(state, batch, teacher_params)``, whose loss terms add the KL to a
frozen float teacher (and a hidden-state term) to the task loss's; ``build_training``
binds the teacher's params (``Training.teacher``, read once), so drivers still call
``train_step(state, batch)``. Evaluation stays the task loss.
"""

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from fcp_jax.models import transformer as transformer_lib
from fcp_jax.training import distill as distill_lib
from fcp_jax.training import grad_compression
from fcp_jax.training import losses as losses_lib
from fcp_jax.training import optim as optim_lib
from fcp_jax.training.state import TrainState

Array = jax.Array
Metrics = Dict[str, Array]
QLambdaFn = Callable[[Array], Optional[Array]]
MODEL_INPUTS = ("positions", "segment_ids")


def make_qlambda_fn(model_cfg: Any, quant_cfg: Optional[Mapping[str, Any]] = None
                    ) -> QLambdaFn:
  """``step -> qlambda [L]`` for ternary models (``None`` for float models).

  ``quant_cfg`` holds ``lambda_start``, ``lambda_ramp`` and ``lambda_stagger`` (steps),
  the arguments of ``ternary_training.lambda_schedule``.
  """
  if getattr(model_cfg, "weight_quant", "none") == "none":
    return lambda step: None
  from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
  quant_cfg = dict(quant_cfg or {})
  kwargs = dict(start=int(quant_cfg.get("lambda_start", 0)),
                ramp=int(quant_cfg.get("lambda_ramp", 0)),
                stagger=int(quant_cfg.get("lambda_stagger", 0)))

  def qlambda(step):
    return ternary_training.lambda_schedule(step, num_layers=model_cfg.num_layers,
                                            **kwargs)

  return qlambda


def final_qlambda_step(quant_cfg: Optional[Mapping[str, Any]], num_layers: int) -> int:
  """A step at which every layer's λ has finished its ramp (λ = 1 everywhere)."""
  q = dict(quant_cfg or {})
  return (int(q.get("lambda_start", 0)) + int(q.get("lambda_ramp", 0))
          + int(q.get("lambda_stagger", 0)) * num_layers)


def split_microbatches(batch: Mapping[str, Array], k: int,
                       per_replica: bool = False) -> Dict[str, Array]:
  """[B, ...] -> [k, B/k, ...] taking rows ``i::k`` into micro-batch ``i``."""
  out = {}
  for name, x in batch.items():
    b = x.shape[0]
    if b % k:
      what = "per-replica batch size (pmap)" if per_replica else "batch size"
      raise ValueError(f"grad_accum={k} does not divide the {what} {b} "
                       f"(batch[{name!r}] has shape {x.shape}).")
    out[name] = jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return out


def _target_stats(model, params, batch, qlambda, rng) -> Tuple[Array, Array]:
  """Model forward: log-probs and argmax hits [B, T-1] of the batch's next tokens.

  With ``model.cfg.loss_chunk`` the output head runs ``loss_chunk`` positions at a time
  (``losses.chunked_target_stats``) instead of on all [B, T, V] at once.
  """
  inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
  chunk = model.cfg.loss_chunk
  out, _ = model.apply({"params": params}, batch["tokens"], **inputs, qlambda=qlambda,
                       return_hidden=bool(chunk),
                       rngs={"dropout": rng})  # [B, T, D] hidden or [B, T, V] logits
  if not chunk:
    return losses_lib.target_stats(out, batch["tokens"])
  project = lambda x: transformer_lib.project(model.cfg, params, x, qlambda)
  return losses_lib.chunked_target_stats(out, batch["tokens"], project, chunk)


def _forward_terms(model, loss, params, batch, qlambda, rng) -> losses_lib.LossTerms:
  """Model forward and the loss terms of one micro-batch."""
  return loss.from_logprobs(*_target_stats(model, params, batch, qlambda, rng), batch)


def _psum_terms(terms: losses_lib.LossTerms, axis_name: Optional[str]):
  return terms if axis_name is None else jax.lax.psum(terms, axis_name)


def make_train_step(model, loss, optimizer: optim_lib.Optimizer, *,
                    qlambda_fn: Optional[QLambdaFn] = None, grad_accum: int = 1,
                    axis_name: Optional[Any] = None,
                    grad_reduce: Optional[Callable[..., Any]] = None,
                    distill: Optional[distill_lib.Distiller] = None
                    ) -> Callable[..., Tuple[TrainState, Metrics]]:
  """Builds ``train_step(state, batch) -> (state, metrics)``.

  Args:
    model: the Linen ``Transformer``.
    loss: a loss object from ``losses.LOSSES``.
    optimizer: from ``optim.make_optimizer``.
    qlambda_fn: ``step -> qlambda`` (see ``make_qlambda_fn``); ``None`` for float.
    grad_accum: number of micro-batches per update.
    axis_name: the replica axis name(s) (pmap, shard_map), or ``None`` under GSPMD.
    grad_reduce: ``(grads, axis_name, rng) -> summed grads`` over replicas
      (``grad_compression``); default ``lax.psum``.
    distill: a ``distill.Distiller``: the step is then
      ``train_step(state, batch, teacher_params)`` (the teacher's params are read,
      never differentiated or updated).
  """
  if grad_accum < 1:
    raise ValueError(f"grad_accum must be >= 1, got {grad_accum}.")
  grad_reduce = grad_reduce or grad_compression.NoCompression()
  if axis_name is None and getattr(grad_reduce, "per_replica", False):
    raise ValueError(f"{grad_reduce} needs per-replica gradients: pass axis_name "
                     "(pmap, or the mesh mode's per_replica step).")
  qlambda_fn = qlambda_fn or (lambda step: None)
  tx = optimizer.tx

  def train_step(state: TrainState, batch: Mapping[str, Array], teacher_params=None):
    if (distill is None) != (teacher_params is None):
      raise ValueError("A distillation train step takes the teacher's params (and only "
                       "it): train_step(state, batch, teacher_params).")
    rng = jax.random.fold_in(state.rng, state.step)
    qlambda = qlambda_fn(state.step)
    batch = loss.prepare(dict(batch))

    def forward(p, micro, micro_rng) -> losses_lib.LossTerms:
      if distill is None:
        return _forward_terms(model, loss, p, micro, qlambda, micro_rng)
      inputs = {k: micro[k] for k in MODEL_INPUTS if k in micro}
      return distill.terms(model, loss, p, teacher_params, micro, inputs, qlambda,
                           micro_rng)

    def grad_terms(params, micro, micro_rng):
      def numerator(p):
        terms = forward(p, micro, micro_rng)
        return terms.numerator, terms
      return jax.grad(numerator, has_aux=True)(params)

    if grad_accum == 1:
      grads, terms = grad_terms(state.params, batch, rng)
    else:
      micro = split_microbatches(batch, grad_accum, per_replica=axis_name is not None)
      zero_grads = jax.tree.map(jnp.zeros_like, state.params)
      zero_terms = jax.eval_shape(
          lambda: grad_terms(state.params, jax.tree.map(lambda x: x[0], micro), rng)[1])
      zero_terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_terms)

      def body(carry, xs):
        i, mb = xs
        g, t = grad_terms(state.params, mb, jax.random.fold_in(rng, i))
        acc_g, acc_t = carry
        return (jax.tree.map(jnp.add, acc_g, g), losses_lib.add_terms(acc_t, t)), None

      (grads, terms), _ = jax.lax.scan(
          body, (zero_grads, zero_terms), (jnp.arange(grad_accum), micro))

    terms = _psum_terms(terms, axis_name)
    if axis_name is not None:
      grads = grad_reduce(grads, axis_name, rng)
    scale = 1.0 / jnp.maximum(terms.denominator, 1.0)
    grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = losses_lib.finalize_metrics(terms)
    if "segment_ids" in batch:  # Non-padding tokens the update read (budget accounting).
      inputs = jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32)
      metrics["input_tokens"] = (inputs if axis_name is None
                                 else jax.lax.psum(inputs, axis_name))
    metrics.update(grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params),
                   lr=optimizer.lr(state.step),
                   weight_decay=optimizer.weight_decay(state.step))
    if qlambda is not None:
      metrics["qlambda"] = jnp.mean(qlambda)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def _qlambda_at(qlambda_fn: QLambdaFn, step) -> Optional[Array]:
  """λ of training step ``step``; ``None`` (the model's λ = 1, as deployed) if no step."""
  return None if step is None else qlambda_fn(jnp.asarray(step, jnp.int32))


def make_eval_step(model, loss, *, qlambda_fn: Optional[QLambdaFn] = None,
                   axis_name: Optional[str] = None,
                   return_terms: bool = False) -> Callable[..., Any]:
  """Builds ``eval_step(params, batch, step=None) -> metrics`` (summed over replicas).

  ``step`` selects the ternary λ of that training step; ``None`` evaluates the fully
  quantized model (λ = 1, as it will be deployed). With
  ``return_terms`` the step returns the summed ``LossTerms`` instead, so a caller can
  add the terms of many batches and call ``losses.finalize_metrics`` once (the exact
  held-out loss, not a mean of batch means).
  """
  qlambda_fn = qlambda_fn or (lambda step: None)

  def eval_step(params, batch, step=None):
    batch = loss.prepare(dict(batch))
    terms = _forward_terms(model, loss, params, batch, _qlambda_at(qlambda_fn, step),
                           jax.random.PRNGKey(0))
    terms = _psum_terms(terms, axis_name)
    return terms if return_terms else losses_lib.finalize_metrics(terms)

  return eval_step


def make_logprob_step(model, *, qlambda_fn: Optional[QLambdaFn] = None
                      ) -> Callable[..., Array]:
  """Builds ``logprob_step(params, batch, step=None) -> [B, T]`` per-token log-probs.

  Entry ``t`` is ``log p(tokens[:, t] | tokens[:, :t])`` (0 at ``t = 0``): the layout of
  a GRPO batch's ``old_logprobs`` and ``ref_logprobs``. ``step`` selects λ as in
  ``make_eval_step``.
  """
  qlambda_fn = qlambda_fn or (lambda step: None)

  def logprob_step(params, batch, step=None):
    logp, _ = _target_stats(model, params, batch, _qlambda_at(qlambda_fn, step),
                            jax.random.PRNGKey(0))  # [B, T-1]
    return jnp.pad(logp, ((0, 0), (1, 0)))  # [B, T]

  return logprob_step


def make_quant_probe(model, *, qlambda_fn: Optional[QLambdaFn] = None,
                     seq_len: int = 8) -> Callable[..., Any]:
  """``probe(params, step=None) -> intermediates`` sown by the ternary layers.

  The monitored values (zero fraction, code histogram, mean scale of each quantized
  kernel) depend on the weights only, so the probe runs the model on a dummy batch of
  one row; ``ternary_training.quant_metrics`` turns the result into scalars on the host.
  """
  qlambda_fn = qlambda_fn or (lambda step: None)

  def probe(params, step=None):
    tokens = jnp.zeros((1, seq_len), jnp.int32)  # [1, T]
    _, variables = model.apply({"params": params}, tokens,
                               qlambda=_qlambda_at(qlambda_fn, step),
                               mutable=["intermediates"])
    return variables.get("intermediates", {})

  return probe


# ---------------------------------------------------------------------------------------
# Host-side assembly shared by the drivers (offline train.py, online bootstrap).
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Training:
  """One model config's training pieces, compiled for a parallel strategy.

  Attributes:
    model, model_cfg: the Linen ``Transformer`` and its ``TransformerConfig``.
    optimizer: from ``optim.make_optimizer``.
    loss: the loss object (``losses.LOSSES``).
    specs: ``TrainState`` of logical ``PartitionSpec``s.
    init_fn: ``rng -> TrainState`` at step 0.
    abstract_state: ``ShapeDtypeStruct`` tree with shardings (orbax restore target).
    qlambda_fn: ``step -> qlambda`` (``None`` for float models).
    train_step: compiled ``(state, batch) -> (state, metrics)``; donates ``state``.
    eval_step: compiled ``(params, batch, step) -> LossTerms`` (summed; add batches,
      then ``losses.finalize_metrics``).
    teacher: distillation's frozen teacher params (``distill.TeacherParams``: specs,
      abstract, params read on first use), bound into ``train_step``; ``None`` without
      ``config.distill``.
  """
  par: Any
  model: Any
  model_cfg: Any
  optimizer: optim_lib.Optimizer
  loss: Any
  specs: TrainState
  init_fn: Callable[[Array], TrainState]
  abstract_state: TrainState
  qlambda_fn: QLambdaFn
  train_step: Callable[..., Tuple[TrainState, Metrics]]
  eval_step: Callable[..., losses_lib.LossTerms]
  teacher: Optional[distill_lib.TeacherParams] = None

  def create_state(self, rng: Array) -> TrainState:
    """A fresh state, created directly with its shardings."""
    return self.par.create_state(self.init_fn, rng, self.specs)


def build_training(config: Mapping[str, Any], par: Any, *, total_steps: int) -> Training:
  """Builds model, optimizer, loss and the compiled steps from a run config.

  Reads ``config.model`` (variant + overrides), ``config.optim``, ``config.loss``,
  ``config.quant`` (λ schedule), ``config.grad_accum``, ``config.grad_compression`` and
  ``config.distill`` (absent or ``teacher`` None: off).
  """
  from fcp_jax.training import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from fcp_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  model, model_cfg = state_lib.build_model(config["model"])
  optimizer = optim_lib.make_optimizer(config["optim"], total_steps=total_steps,
                                       model_cfg=model_cfg)
  loss = losses_lib.build(config["loss"])
  specs = state_lib.state_logical_specs(model, optimizer.tx)
  init_fn = state_lib.make_init_fn(model, optimizer.tx)
  abstract = sharding_lib.abstract_with_shardings(
      jax.eval_shape(init_fn, jax.random.PRNGKey(0)), par.shardings(specs))
  qlambda_fn = make_qlambda_fn(model_cfg, config.get("quant"))
  reduce = grad_compression.build(config.get("grad_compression", "none"),
                                  num_replicas=par.num_replicas)
  distiller = distill_lib.build(config, model_cfg)
  teacher = None if distiller is None else distill_lib.TeacherParams(distiller, par)
  train_step = par.jit_train_step(make_train_step(
      model, loss, optimizer, qlambda_fn=qlambda_fn,
      grad_accum=int(config.get("grad_accum", 1)),
      axis_name=par.replica_axis if reduce.per_replica else par.axis_name,
      grad_reduce=reduce, distill=distiller), specs, per_replica=reduce.per_replica,
      frozen_specs=None if teacher is None else teacher.specs)
  if teacher is not None:
    train_step = teacher.bind(train_step)
  eval_step = par.jit_eval_step(make_eval_step(
      model, loss, qlambda_fn=qlambda_fn, axis_name=par.axis_name, return_terms=True),
                                specs)
  return Training(par=par, model=model, model_cfg=model_cfg, optimizer=optimizer,
                  loss=loss, specs=specs, init_fn=init_fn, abstract_state=abstract,
                  qlambda_fn=qlambda_fn, train_step=train_step, eval_step=eval_step,
                  teacher=teacher)

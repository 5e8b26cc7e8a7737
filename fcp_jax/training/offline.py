"""The offline learner: FCP, SFT or RFT by masked NLL, sharded, checkpointed, resumable.

``run(config, workdir)`` trains (or resumes) the run of a ``fcp_jax.train`` config; the
``fcp_jax.train`` driver and the pipeline's warm-up, offline FCP and RFT stages call it.

Objectives (``OBJECTIVES``) differ only in the data they feed the same NLL:

* ``fcp``: feedback triples, trained as ``log π(response | <EF>c</EF> question)``;
* ``rft``: the triples whose response is correct, trained without a condition
  (``rft(min_score=8)``: and scored at least 8 by the feedback);
* ``sft``: (question, reference response) pairs, without a condition;
* ``sft_null``, ``rft_null``: as ``sft`` and ``rft`` under the null condition
  ``<EF></EF>`` (``rft_null`` is the FCP pipeline's RFT baseline);
* ``warmup``: the FCP pipeline's warm-up rows (triples format: reference responses under
  the null condition, some under a feedback text drawn at random).

Calling ``run`` again on the same workdir resumes from the newest complete checkpoint in
``workdir/checkpoints`` (model, optimizer and data-iterator state), so the finished run
is bitwise the uninterrupted one, and ``metrics.jsonl`` keeps each step once (records
written after that checkpoint, or by a run that never checkpointed, are dropped). The
run writes ``config.json``, ``metrics.jsonl``, ``tb/``, ``checkpoints/`` and ``plots/``.

A fresh run starts from ``config.init_from``'s params when set: another run's workdir,
or a pretrained model written once by ``policy.write_pretrained_base`` (whose folder is
also a valid ``config.tokenizer``). A ternary model started from a float checkpoint gets
the ternary-only params it lacks (extra-RMSNorm gains, ...) from their initialisers,
and says so in the log; any other missing parameter is an error. Elastic activation
steps (``a_alpha``) initialised so (not loaded) are then set from the first train batch
(``config.quant.act_alpha_from_data``, default True; a no-op for other quantizers). At
each logged step a ternary run also writes ``quant/flip_rate``: the share of weight
codes changed since the previous logged step, overall and per projection kind
(``ternary_training.FlipRate``).

Any objective can distil from a frozen float teacher (``config.distill``,
``fcp_jax/training/distill.py``; absent or ``teacher`` None: off): the train loss adds
the KL between teacher and student logits over the response positions, and optionally
a hidden-state term (TernaryLLM's OFF cosine or an MSE), to the task loss, reported as
``train/distill_kl``, ``train/distill_feature`` and ``train/distill_ce``. Its
``teacher="init_from"`` is the checkpoint the run starts from (a ternary warm-up: the
float pretrained base). The held-out loss stays the task loss.

``callbacks``: functions called as ``callback("step", step)`` after each update is
logged and its checkpoint (if due) committed (tests use them to stop a run at a known
point).
"""

import os
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from fcp_jax import config_lib
from fcp_jax import distributed
from fcp_jax import policy as policy_lib
from fcp_jax.data import input_pipeline as pipeline_lib
from fcp_jax.data import tfds_builders
from fcp_jax.registry import Registry
from fcp_jax.training import checkpoint as checkpoint_lib
from fcp_jax.training import losses as losses_lib
from fcp_jax.training import memory_plan
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import sharding as sharding_lib
from fcp_jax.training import step as step_lib

OBJECTIVES = Registry("offline objective")
Callback = Callable[[str, int], None]


# ---------------------------------------------------------------------------------------
# Objectives: which records, and which prompt condition.
# ---------------------------------------------------------------------------------------


@OBJECTIVES.register("fcp")
def fcp_records(data_cfg: Mapping[str, Any], split: str) -> Tuple[Sequence[Any], str]:
  """Every feedback triple, conditioned on its feedback text."""
  return tfds_builders.load_source(tfds_builders.TRIPLES, data_cfg["data_dir"],
                                   data_cfg["name"], split), "record"


@OBJECTIVES.register("rft")
def rft_records(data_cfg: Mapping[str, Any], split: str, *, min_score: float = 0
                ) -> Tuple[Sequence[Any], str]:
  """Only the triples whose response is correct, without a condition.

  ``min_score`` > 0 keeps only those the feedback scored at least that (e.g. the c+
  pool's threshold, 8): RFT filtered as the positive conditions are.
  """
  source = tfds_builders.load_source(tfds_builders.TRIPLES, data_cfg["data_dir"],
                                     data_cfg["name"], split)
  kept = [r for r in source if int(r["correct"]) == 1
          and (min_score <= 0 or float(r["score"]) >= min_score)]
  logging.info("rft: kept %d of %d %s triples (correct%s).", len(kept), len(source),
               split, f", score >= {min_score}" if min_score > 0 else " only")
  if not kept:
    raise ValueError(f"rft: no {split} triple in {data_cfg['data_dir']} is correct"
                     + (f" with score >= {min_score}" if min_score > 0 else "") + ".")
  return kept, "none"


@OBJECTIVES.register("sft")
def sft_records(data_cfg: Mapping[str, Any], split: str) -> Tuple[Sequence[Any], str]:
  """(question, reference response) pairs, without a condition."""
  return tfds_builders.load_source(tfds_builders.SFT, data_cfg["data_dir"],
                                   data_cfg["name"], split), "none"


@OBJECTIVES.register("sft_null")
def sft_null_records(data_cfg: Mapping[str, Any], split: str
                     ) -> Tuple[Sequence[Any], str]:
  """SFT pairs under the null condition: ``<EF></EF>question -> reference``."""
  return sft_records(data_cfg, split)[0], "null"


@OBJECTIVES.register("warmup")
def warmup_records(data_cfg: Mapping[str, Any], split: str
                   ) -> Tuple[Sequence[Any], str]:
  """The pipeline's warm-up rows (triples format) under their own condition.

  That is the null condition ``""`` or, for ``data.warmup_conditions`` of them, a
  feedback text drawn at random, independent of the reference response.
  """
  return fcp_records(data_cfg, split)[0], "record"


@OBJECTIVES.register("rft_null")
def rft_null_records(data_cfg: Mapping[str, Any], split: str, *, min_score: float = 0
                     ) -> Tuple[Sequence[Any], str]:
  """Correct triples under the null condition: ``<EF></EF>question -> response``."""
  return rft_records(data_cfg, split, min_score=min_score)[0], "null"


def make_pipeline(config: ml_collections.ConfigDict, tok, split: str, *, batch_size: int,
                  train: bool) -> pipeline_lib.Pipeline:
  """The grain pipeline of ``split`` for ``config.objective``: global batches.

  Every process reads the same global batches (one seeded order of all the data,
  whatever the number of processes) and feeds its own rows of each
  (``distributed.local_rows``): the global batch, and so the run, is the same on one
  process or many.
  """
  data = config.data
  if not data.data_dir:
    raise ValueError("config.data.data_dir is empty: point it at the TFDS data dir "
                     "built with fcp_jax.data.tfds_builders.build(...).")
  records, condition = OBJECTIVES.build(config.objective, dict(data), split)
  if batch_size % jax.process_count():
    raise ValueError(f"Batch size {batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  return pipeline_lib.Pipeline(
      records, tok, batch_size=batch_size, max_len=data.max_len,
      condition=condition, system=data.system, pack=data.pack, overflow=data.overflow,
      shuffle=train, seed=config.seed, num_epochs=None if train else 1,
      drop_remainder=train, shard_index=0, shard_count=1,
      num_workers=data.num_workers if train else 0)


def pad_rows(batch: Mapping[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
  """Pads a final partial batch with empty rows (segment 0, no loss) up to ``rows``."""
  extra = rows - len(batch["tokens"])
  return {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _tokens_in(batch: Mapping[str, np.ndarray]) -> int:
  return int(np.count_nonzero(batch["segment_ids"]))


def steps_for_tokens(config: ml_collections.ConfigDict, tokens: float) -> int:
  """Train steps of ``config`` whose batches hold nearest ``tokens`` input tokens.

  Reads the run's own train batches (same seed, packing and order, no model), so the
  count is exact for a fresh run: at least 1 step.
  """
  tok = policy_lib.build_tokenizer(config.tokenizer)
  pipe = make_pipeline(config, tok, config.data.train_split,
                       batch_size=config.batch_size, train=True)
  done = steps = 0
  for batch in pipe:
    t = _tokens_in(batch)
    if steps and done + t - tokens > tokens - done:  # Nearer without this batch.
      break
    done, steps = done + t, steps + 1
    if done >= tokens:
      break
  return steps


def _act_alphas_from(tr, par, params, batch: Mapping[str, np.ndarray], step: int):
  """``params`` with the elastic ``a_alpha``s set from one device's share of ``batch``
  (``ternary_training.init_act_alphas``); unchanged, with nothing run, without them."""
  from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
  rows = max(1, len(batch["tokens"]) // jax.device_count())
  inputs = {k: batch[k][:rows] for k in step_lib.MODEL_INPUTS if k in batch}
  return ternary_training.init_act_alphas(
      tr.model, params, batch["tokens"][:rows], jit=par.jit_replicated,
      qlambda=tr.qlambda_fn(np.int32(step)), **inputs)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        callbacks: Sequence[Callback] = ()) -> Dict[str, Any]:
  """Trains (or resumes) the run in ``workdir``; returns a summary dict."""
  # -------------------------------------------------------------------------------------
  # Setup.
  # -------------------------------------------------------------------------------------
  sharding_lib.initialize_distributed(config.parallel)
  is_primary = jax.process_index() == 0
  if is_primary:
    config_lib.write_config(config, workdir)
  total_steps = int(config.total_steps)
  for key in ("total_steps", "log_every", "batch_size"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
  tok = policy_lib.build_tokenizer(config.tokenizer)

  # -------------------------------------------------------------------------------------
  # Mesh.
  # -------------------------------------------------------------------------------------
  par = sharding_lib.build(config.parallel)
  logging.info("Parallel mode %s over %d devices (%d processes).",
               config.parallel.mode, jax.device_count(), jax.process_count())

  # -------------------------------------------------------------------------------------
  # Data.
  # -------------------------------------------------------------------------------------
  train_pipe = make_pipeline(config, tok, config.data.train_split,
                             batch_size=config.batch_size, train=True)
  logging.info("Train data: %s", train_pipe.report)
  train_iter = iter(train_pipe)
  eval_batches: List[Dict[str, np.ndarray]] = []
  if config.eval.every and config.data.eval_split:
    eval_pipe = make_pipeline(config, tok, config.data.eval_split,
                              batch_size=config.eval.batch_size, train=False)
    for batch in eval_pipe:
      if len(eval_batches) >= config.eval.max_batches:
        break
      eval_batches.append(distributed.local_rows(pad_rows(batch, config.eval.batch_size)))
    if not eval_batches:
      raise ValueError(f"Eval split {config.data.eval_split!r} is empty: "
                       f"{eval_pipe.report}. Set config.eval.every=0 to skip evaluation.")
    logging.info("Eval data: %d batches; %s", len(eval_batches), eval_pipe.report)

  # -------------------------------------------------------------------------------------
  # Model and step.
  # -------------------------------------------------------------------------------------
  tr = step_lib.build_training(config, par, total_steps=total_steps)
  policy_lib.check_vocab(tok, tr.model_cfg)
  if tr.teacher is not None:  # Distillation: read the frozen teacher once, up front.
    tr.teacher.load()
  # On an accelerator: stop now if the step's memory plan exceeds the chip (not on CPU).
  memory_plan.check_before_training(config, par, rows=int(config.batch_size),
                                    seq_len=int(config.data.max_len), tr=tr)
  quant_probe = None
  if tr.model_cfg.weight_quant != "none":
    from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
    probe = par.jit_replicated(step_lib.make_quant_probe(tr.model,
                                                         qlambda_fn=tr.qlambda_fn))
    quant_probe = lambda params, step: ternary_training.quant_metrics(
        jax.device_get(probe(params, np.int32(step))))

  def evaluate(params, step: int) -> Dict[str, float]:
    terms = None
    for batch in eval_batches:
      t = tr.eval_step(params, par.put_batch(batch), np.int32(step))
      terms = t if terms is None else losses_lib.add_terms(terms, t)
    out = jax.device_get(losses_lib.finalize_metrics(terms))
    return {k: float(v) for k, v in out.items()}

  # -------------------------------------------------------------------------------------
  # Checkpoint: resume from the newest complete step, else start (or init_from).
  # -------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  restored = ckpt.restore_latest(tr.abstract_state, data_iter=train_iter)
  # Elastic activation steps (a_alpha) that were initialised here, from dummy tokens,
  # not loaded, are set again from the first train batch (TBT).
  from_data = config.get("quant", {}).get("act_alpha_from_data", True)
  alphas_from_data = restored is None and from_data and not config.init_from
  if restored is not None:
    state = restored.state
    logging.info("Resumed from step %d.", restored.step)
  else:
    state = tr.create_state(jax.random.PRNGKey(config.seed))
    if config.init_from:
      fill = policy_lib.fill_quant_params_fn(tr.model)

      def fill_missing(params):  # E.g. a float checkpoint: it lacks the steps.
        nonlocal alphas_from_data
        from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
        alphas_from_data = from_data and not ternary_training.has_act_alphas(params)
        return fill(params)

      state = state.replace(params=checkpoint_lib.restore_params(
          config.init_from, tr.abstract_state.params, fill_missing=fill_missing))
  start_step = int(jax.device_get(state.step))
  # Ternary code flips since the previous logged step (float models: none). Resumes
  # at a checkpoint, which is always a logged step: the same numbers as unresumed.
  flip_rate = None
  if tr.model_cfg.weight_quant != "none":
    from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
    flip_rate = ternary_training.FlipRate(tr.model_cfg, state.params)

  # -------------------------------------------------------------------------------------
  # Loop.
  # -------------------------------------------------------------------------------------
  # Records after the restored step (or all, starting afresh) are dropped: each once.
  writer = metrics_lib.MetricWriter(
      workdir, resume_step=start_step if restored is not None else -1,
      is_primary=is_primary)
  progress = metrics_lib.Progress(total_steps, start_step)
  pending = metrics_lib.PendingMetrics()
  eval_history: List[Tuple[int, float]] = []
  last_train: Dict[str, float] = {}

  def run_eval(step: int):
    if not eval_batches:
      return
    m = evaluate(state.params, step)
    metrics_lib.check_finite(step, {f"eval/{k}": v for k, v in m.items()})
    writer.write(step, {f"eval/{k}": v for k, v in m.items()})
    if quant_probe is not None:
      writer.write(step, quant_probe(state.params, step))
    eval_history.append((step, m["loss"]))
    logging.info("step %d eval: loss %.4f accuracy %.4f (%d tokens)", step, m["loss"],
                 m["accuracy"], m["tokens"])

  try:
    if restored is None:
      run_eval(start_step)
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      if alphas_from_data and step == start_step + 1:
        state = state.replace(params=_act_alphas_from(tr, par, state.params, batch,
                                                      start_step))
      state, step_metrics = tr.train_step(state, par.put_batch(
          distributed.local_rows(batch)))
      pending.add(step, step_metrics)
      progress.add_tokens(_tokens_in(batch))
      eval_due = bool(eval_batches) and step % config.eval.every == 0
      ckpt_due = config.checkpoint.every and step % config.checkpoint.every == 0
      if step % config.log_every == 0 or eval_due or ckpt_due or step == total_steps:
        for s, m in pending.fetch():  # NaN/Inf guard: raises before anything is saved.
          writer.write(s, {f"train/{k}": v for k, v in m.items()})
          last_train = m
        speed = progress.report(step)
        writer.write(step, {f"speed/{k}": v for k, v in speed.items()})
        if flip_rate is not None:  # Every process computes it (SPMD); process 0 writes.
          writer.write(step, flip_rate(state.params))
        logging.info("%s", progress.line(step, last_train, speed))
      if eval_due or (step == total_steps and eval_batches):
        run_eval(step)
      ckpt.save(step, state, data_iter=train_iter, force=step == total_steps)
      writer.flush()
      if callbacks:
        ckpt.wait()  # Callbacks see every checkpoint due so far committed.
      for callback in callbacks:
        callback("step", step)
  finally:
    ckpt.close()
    writer.close()

  # -------------------------------------------------------------------------------------
  # Summary.
  # -------------------------------------------------------------------------------------
  plots = metrics_lib.plot_curves(workdir) if (config.plots and is_primary) else []
  summary = dict(
      workdir=workdir, step=int(jax.device_get(state.step)), start_step=start_step,
      resumed=restored is not None, train=last_train, eval_history=eval_history,
      eval_loss=eval_history[-1][1] if eval_history else None, plots=plots,
      train_data=train_pipe.report)
  logging.info("Done: %s", {k: summary[k] for k in ("step", "eval_loss")})
  return summary

"""Config helpers shared by the experiment configs (big_vision style: one module).

Builders of the ConfigDicts that ``configs/arith_fcp.py``, ``configs/gsm8k_smollm2.py``
and ``configs/offline_fcp.py`` have in common: the optimizer, an offline
(``fcp_jax.train``) stage, an online (``fcp_jax.bootstrap``) stage and the parallelism
settings. The defaults are ``arith_fcp``'s; a config that differs passes its own values
(e.g. binds them once with ``functools.partial``).

Config files are loaded by path (``config_lib.load_config``), as modules of a package of
their directory, so a config imports this module as ``from . import common``.
"""

from typing import Any, Dict, Optional

import ml_collections

from fcp_jax import config_lib
from fcp_jax.training import sharding


def optim(lr: Optional[float], *, schedule: str = "cosine(end_factor=0.1)",
          warmup_frac: float = 0.05, weight_decay: float = 0.0, b2: float = 0.95,
          stage2_at: float = 0.0, weight_decay_schedule: Optional[str] = None
          ) -> ml_collections.ConfigDict:
  """An ``optim`` section (``fcp_jax.training.optim``); stage 2 halves the lr if set.

  ``weight_decay_schedule`` (``optim.SCHEDULES``) is a key only when given: sections
  without it keep their stage keys (and the constant weight decay).
  """
  c = ml_collections.ConfigDict(dict(
      lr=lr, schedule=schedule, warmup_steps=0, warmup_frac=warmup_frac, b1=0.9,
      b2=b2, eps=1e-8, weight_decay=weight_decay, clip_norm=1.0, stage2_at=stage2_at,
      stage2_lr_factor=0.5 if stage2_at else 1.0, stage2_weight_decay=0.0))
  if weight_decay_schedule is not None:
    c.weight_decay_schedule = weight_decay_schedule
  return c


def subln(arg: str, ternary: bool) -> bool:
  """The configs' ``subln`` arg: BitNet b1.58's SubLN (an RMSNorm at the input of
  o_proj and down_proj). ``auto``: on for a ternary model trained from scratch, off for
  a float one; ``True`` / ``False`` force it."""
  if str(arg).strip().lower() == "auto":
    return bool(ternary)
  return config_lib.parse_bool(arg, "Config arg 'subln' (auto, True or False)")


def bitnet_2b4t(weight_decay: float = 0.1, stage2_at: float = 0.5) -> Dict[str, Any]:
  """``optim``'s arguments for BitNet b1.58 2B4T's two-stage schedule.

  Cosine LR, halved at ``stage2_at`` (the cooldown); weight decay a cosine from
  ``weight_decay`` (after the warm-up) to 0 at ``stage2_at``, and 0 in stage 2
  (``docs/ternary_methods.md`` §1.1). ``optim(lr, **bitnet_2b4t())``, or a stage's
  ``optim_args=bitnet_2b4t()``.
  """
  return dict(schedule="cosine", weight_decay=weight_decay,
              weight_decay_schedule="cosine", stage2_at=stage2_at)


def parallel() -> ml_collections.ConfigDict:
  """The ``parallel`` section: one data-parallel mesh over every device."""
  return ml_collections.ConfigDict(dict(
      mode="mesh", mesh_shape=(-1, 1, 1), rules=sharding.DEFAULT_RULES,
      distributed=False, coordinator_address="", num_processes=0, process_id=-1))


def offline_stage(*, objective: str, steps: int, batch: int, lr: float, max_len: int,
                  data_name: str, pack: bool = True, log_every: int = 20,
                  checkpoints: int = 5, keep: int = 2, evals: int = 2,
                  eval_batches: int = 2, optim_args: Optional[Dict[str, Any]] = None
                  ) -> ml_collections.ConfigDict:
  """A ``fcp_jax.train`` stage (the pipeline fills ``data.data_dir`` and init_from).

  With ``pack`` each of the ``batch`` rows holds as many whole sequences as fit in
  ``max_len`` (first fit). Checkpoints ``checkpoints`` times and evaluates ``evals``
  times (``eval_batches`` batches) per run, so a killed stage resumes. ``steps=0``: the
  pipeline derives them from ``budget.train_tokens``, and the cadences from those steps
  (``checkpoint.every`` / ``eval.every`` None; a number set over it is kept).
  ``optim_args``: ``optim``'s keyword arguments.
  """
  every = lambda times: max(steps // times, 1) if steps else None
  c = config_lib.stage_fields(log_every=log_every, checkpoint_every=every(checkpoints),
                              keep=keep)
  c.objective = objective
  c.total_steps = steps
  c.batch_size = batch
  c.grad_accum = 1
  c.grad_compression = "none"  # grad_compression.GRAD_COMPRESSION, e.g. "terngrad"
  c.loss = "nll(aggregation='token-mean')"
  c.optim = optim(lr, **(optim_args or {}))
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", name=data_name, train_split="train", eval_split="eval",
      max_len=max_len, pack=pack, overflow="truncate", num_workers=0))
  c.eval = ml_collections.ConfigDict(dict(every=every(evals), batch_size=batch,
                                          max_batches=eval_batches))
  return c


def online_stage(*, objective: str, loss: str, rounds: int, prompts: int, samples: int,
                 mini_batch: int, lr: Optional[float], max_len: int, max_new: int,
                 task_size: int, log_every: int = 5, checkpoint_every: int = 5,
                 keep: int = 2, optim_args: Optional[Dict[str, Any]] = None
                 ) -> ml_collections.ConfigDict:
  """A ``fcp_jax.bootstrap`` stage (the pipeline fills init_from and the pool).

  The optimizer is ``optim``'s with a constant schedule and no warm-up, updated by
  ``optim_args``.
  """
  c = config_lib.stage_fields(log_every=log_every, checkpoint_every=checkpoint_every,
                              keep=keep)
  c.objective = objective
  c.loss = loss
  c.optim = optim(lr, **{"schedule": "constant", "warmup_frac": 0.0,
                         **(optim_args or {})})
  c.online = ml_collections.ConfigDict(dict(
      task_size=task_size, rounds=rounds, prompts_per_step=prompts, num_samples=samples,
      mini_batch=mini_batch, epochs=1.0, sampling="temperature(t=1.0)",
      max_new_tokens=max_new, max_len=max_len, prompt_bucket=64,
      fresh_cplus_per_rollout=False, pool=""))
  return c

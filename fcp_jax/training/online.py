"""The online learner: FCP bootstrapping (``docs/fcp_method.md`` §1.4) or GRPO.

``run(config, workdir)`` runs (or resumes) the rounds of a ``fcp_jax.bootstrap`` config;
the ``fcp_jax.bootstrap`` driver and the pipeline's bootstrap and GRPO stages call it.

One round (a "bootstrap step"):

1. take ``B`` prompts from a seeded permutation of the task's train prompts;
2. give each prompt its sampling condition (``ONLINE_OBJECTIVES``): FCP draws one ``c+``
   from the positive pool per prompt (``online.fresh_cplus_per_rollout``: one per
   rollout); GRPO uses the null prompt ``<EF></EF>``;
3. sample ``n`` responses per prompt at temperature 1 and ask the (JSONL-cached)
   feedback env about every response (``fcp_jax.rollout.generate``);
4. build the training rows: FCP re-templates every sample with its fresh feedback ``c'``
   of kind ``online.condition_kind`` keeping the response ids identical (loss on the
   response only); GRPO keeps the sampling prompt, sets the reward to ``score / 10``,
   group-normalises it into advantages and takes the old log-probs from the sampler.
   A response whose feedback failed (``Feedback.ok`` False) is never trained on: its
   row's loss mask is zero (FCP) and it takes no part in its group's advantages (GRPO);
   ``feedback/failed`` counts them per round;
5. train on the ``B * n`` rows in sequential mini-batches of ``online.mini_batch``
   sequences, one optimizer update each, for ``online.epochs`` passes (default 1; GRPO's
   clipped ratio stays relative to the sampler's log-probs), or, with
   ``online.train_tokens``, for as many updates as bring the input tokens trained on so
   far nearest ``rounds done x train_tokens / rounds`` (a training-token budget). No
   reference model, no KL for FCP; GRPO with ``kl_coef`` > 0 adds the k3 KL to the
   starting policy, whose log-probs are computed on the round's rows. Logged per
   round: the NLL of the round's rows before and after its updates
   (``rollout/batch_nll_before``, ``_after``), the share of correct rollouts and the
   mean feedback score; ``train/tokens``, ``train/input_tokens`` and ``train/updates``
   are the round's sums (``metrics.training_budget``); ternary models add the share of
   weight codes the round changed (``quant/flip_rate``, ``ternary_training.FlipRate``).

The round state (round, prompt cursor, RNG key, pool) is stored with the model in the
same orbax step (``Checkpointer`` extra item ``online``); every random choice is derived
from ``(seed, round)``, so a run killed at any point and re-run ends bitwise equal to an
uninterrupted one, and the feedback cache answers every question already asked.

``callbacks``: functions called as ``callback("feedback", round)`` once a round's
feedback is in (and cached), before its updates (tests use them to stop a run there).
"""

import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np

from fcp_jax import config_lib
from fcp_jax import distributed
from fcp_jax import policy as policy_lib
from fcp_jax import rollout as rollout_lib
from fcp_jax.data import chat
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.feedback import base as feedback_base
from fcp_jax.feedback import cache as cache_lib
from fcp_jax.feedback import critic as _critic  # pylint: disable=unused-import  (registers "critic")
from fcp_jax.feedback import pool as pool_lib
from fcp_jax.registry import Registry
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import checkpoint as checkpoint_lib
from fcp_jax.training import losses as losses_lib
from fcp_jax.training import memory_plan
from fcp_jax.training import metrics as metrics_lib
from fcp_jax.training import optim as optim_lib
from fcp_jax.training import sharding as sharding_lib
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib

ONLINE_OBJECTIVES = Registry("online objective")
FEEDBACK_CACHE = "feedback_cache.jsonl"
STATE_ITEM = "online"


# ---------------------------------------------------------------------------------------
# A round's rollouts and the objectives that turn them into training rows.
# ---------------------------------------------------------------------------------------


@ONLINE_OBJECTIVES.register("fcp")
class FcpObjective:
  """FCP bootstrapping: sample under ``c+``, train under the fresh ``c'`` by NLL."""
  needs_pool = True

  def __init__(self, online_cfg):
    self.kind = online_cfg.condition_kind
    self.fresh_per_rollout = bool(online_cfg.fresh_cplus_per_rollout)

  def sample_conditions(self, pool: pool_lib.ConditionPool, num_prompts: int, n: int,
                        rng: np.random.Generator) -> List[str]:
    """One ``c+`` per prompt (repeated ``n`` times), or one per rollout."""
    if self.fresh_per_rollout:
      return [pool.sample(rng) for _ in range(num_prompts * n)]
    return [c for c in (pool.sample(rng) for _ in range(num_prompts)) for _ in range(n)]

  def batch(self, tok, ro: rollout_lib.Rollouts, max_len: int
            ) -> Dict[str, np.ndarray]:
    conditions = [fb.condition(self.kind) for fb in ro.feedback]
    out = chat.retemplate_batch(tok, ro.prompts, ro.responses, conditions, max_len)
    out["loss_mask"] = out["loss_mask"] * ro.ok[:, None].astype(out["loss_mask"].dtype)
    return out


@ONLINE_OBJECTIVES.register("grpo")
class GrpoObjective:
  """GRPO: null-condition prompt, reward ``score / 10``, clipped surrogate."""
  needs_pool = False

  def __init__(self, online_cfg):
    del online_cfg

  def sample_conditions(self, pool, num_prompts: int, n: int,
                        rng: np.random.Generator) -> List[str]:
    del pool, rng
    return [""] * (num_prompts * n)

  def batch(self, tok, ro: rollout_lib.Rollouts, max_len: int
            ) -> Dict[str, np.ndarray]:
    rows = [(list(p) + list(r), [0] * len(p) + [1] * len(r))
            for p, r in zip(ro.prompts, ro.responses)]
    out = chat.pad_rows(rows, tok.pad_id, max_len)
    old = np.zeros_like(out["loss_mask"])  # [R, T]
    for i, (p, r) in enumerate(zip(ro.prompts, ro.responses)):
      n = max(0, min(len(r), max_len - len(p)))
      old[i, len(p):len(p) + n] = ro.logprobs[i, :n]
    scores = np.asarray([fb.score / 10.0 for fb in ro.feedback], np.float32)  # [R]
    ok = ro.ok  # [R] failed feedback: no reward, no loss.
    out["loss_mask"] = out["loss_mask"] * ok[:, None].astype(out["loss_mask"].dtype)
    out["old_logprobs"] = old
    out["advantages"] = np.asarray(losses_lib.grpo_advantages(
        scores, ro.group_size, valid=ok), np.float32)  # [R]
    return out


# ---------------------------------------------------------------------------------------
# Host helpers.
# ---------------------------------------------------------------------------------------


def round_prompts(num_prompts: int, batch: int, round_index: int, seed: int
                  ) -> Tuple[np.ndarray, int, int]:
  """Prompt indices of a round from per-epoch seeded permutations.

  Returns ``(indices [batch], cursor after the round, epoch of the first prompt)``.
  """
  cursor = round_index * batch
  out = []
  for c in range(cursor, cursor + batch):
    epoch, pos = divmod(c, num_prompts)
    perm = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    out.append(perm[pos])
  return np.asarray(out), cursor + batch, cursor // num_prompts


def load_prompts(online_cfg) -> List[tasks_lib.Example]:
  return tasks_lib.TASKS.build(online_cfg.task, split="train", size=online_cfg.task_size,
                               seed=online_cfg.task_seed)


def build_feedback_env(spec: str, workdir: str, cache_path: Optional[str] = None
                       ) -> cache_lib.PrimaryFeedbackEnv:
  """The env of ``spec`` behind its JSONL cache (``cache_path``, default in workdir).

  Process 0 asks it and appends to the cache; other processes receive its answers.
  """
  path = cache_path or os.path.join(workdir, FEEDBACK_CACHE)
  return cache_lib.PrimaryFeedbackEnv(feedback_base.FEEDBACK_ENVS.build(spec),
                                      lambda env: cache_lib.CachedFeedbackEnv(env, path))


def _split_rows(batch: Dict[str, np.ndarray], size: int) -> List[Dict[str, np.ndarray]]:
  rows = batch["tokens"].shape[0]
  if rows % size:
    raise ValueError(f"online.mini_batch={size} does not divide the {rows} rollouts of a "
                     "round (prompts_per_step * num_samples).")
  return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]


def updates_per_round(online_cfg) -> int:
  """Optimizer updates per round: ``online.epochs`` passes over its mini-batches.

  The mini-batch must divide the round's rollouts; a fractional ``epochs`` (rounded to
  whole updates, at least one) ends its last pass part-way. With ``online.train_tokens``
  the number varies by round (``updates_for_tokens``); this is then one pass.
  """
  rows = int(online_cfg.prompts_per_step) * int(online_cfg.num_samples)
  if int(online_cfg.mini_batch) < 1 or rows % int(online_cfg.mini_batch):
    raise ValueError(f"online.mini_batch={online_cfg.mini_batch} must divide the {rows} "
                     "rollouts of a round (prompts_per_step * num_samples).")
  epochs = float(online_cfg.get("epochs", 1.0))
  if not epochs > 0:
    raise ValueError(f"online.epochs must be > 0, got {epochs}.")
  return max(1, round(epochs * rows / int(online_cfg.mini_batch)))


def updates_for_tokens(mini_batch_tokens: Sequence[int], target: float) -> int:
  """Updates over the mini-batches, in passes, whose tokens come nearest ``target``."""
  done = updates = 0
  while True:
    t = mini_batch_tokens[updates % len(mini_batch_tokens)]
    if updates and done + t - target > target - done:
      return updates
    done, updates = done + t, updates + 1
    if done >= target:
      return updates


def check_token_budget(config: ml_collections.ConfigDict) -> float:
  """Tokens per round under ``online.train_tokens`` (0: off); checks what it excludes."""
  tokens = float(config.online.get("train_tokens", 0) or 0)
  if not tokens:
    return 0.0
  if float(config.online.get("epochs", 1.0)) != 1.0:
    raise ValueError("config.online.train_tokens and config.online.epochs are both set; "
                     "keep one (the token budget sets the passes per round).")
  if config.optim.schedule != "constant" or config.optim.warmup_frac or (
      config.optim.warmup_steps):
    raise ValueError("config.online.train_tokens makes the number of updates depend on "
                     "the rollouts; it needs optim.schedule='constant' without warm-up "
                     f"(got {config.optim.schedule!r}).")
  return tokens / int(config.online.rounds)


# ---------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, *,
        pool: Optional[pool_lib.ConditionPool] = None,
        feedback_cache: Optional[str] = None,
        callbacks: Sequence[Callable[[str, int], None]] = ()) -> Dict[str, Any]:
  """Runs (or resumes) ``config.online.rounds`` rounds in ``workdir``; returns a summary."""
  # -------------------------------------------------------------------------------------
  # Setup.
  # -------------------------------------------------------------------------------------
  on = config.online
  objective = ONLINE_OBJECTIVES.build(config.objective, on)
  is_primary = jax.process_index() == 0
  if is_primary:
    config_lib.write_config(config, workdir)
  rounds = int(on.rounds)
  n = int(on.num_samples)
  updates = updates_per_round(on)
  total_updates = rounds * updates
  round_tokens = check_token_budget(config)
  tok = policy_lib.build_tokenizer(config.tokenizer)
  system = on.system if on.system else None

  # -------------------------------------------------------------------------------------
  # Prompts, pool and feedback env.
  # -------------------------------------------------------------------------------------
  prompts = load_prompts(on)
  if objective.needs_pool and pool is None:
    if not on.pool:
      raise ValueError(f"objective {config.objective!r} needs a positive-condition pool: "
                       "set config.online.pool to a pool JSON file.")
    pool = pool_lib.ConditionPool.load(on.pool)
  if pool is not None and pool.kind != on.condition_kind:
    logging.warning("Pool kind %r differs from online.condition_kind %r.", pool.kind,
                    on.condition_kind)
  env = build_feedback_env(on.feedback, workdir, feedback_cache)
  logging.info("%d prompts, pool of %d, feedback %s, %d rounds x %d updates.",
               len(prompts), len(pool) if pool else 0, env.config_key(), rounds, updates)

  # -------------------------------------------------------------------------------------
  # Mesh, model, step.
  # -------------------------------------------------------------------------------------
  par = sharding_lib.build(config.parallel)
  model, model_cfg = state_lib.build_model(config.model)
  policy_lib.check_vocab(tok, model_cfg)
  optimizer = optim_lib.make_optimizer(config.optim, total_steps=total_updates,
                                       model_cfg=model_cfg)
  loss = losses_lib.build(config.loss)
  specs = state_lib.state_logical_specs(model, optimizer.tx)
  init_fn = state_lib.make_init_fn(model, optimizer.tx)
  qlambda_fn = step_lib.make_qlambda_fn(model_cfg, config.quant)
  train_step = par.jit_train_step(step_lib.make_train_step(
      model, loss, optimizer, qlambda_fn=qlambda_fn, axis_name=par.axis_name), specs)
  # On an accelerator: stop now if the update's memory plan exceeds the chip.
  memory_plan.check_before_training(config, par, rows=int(on.mini_batch),
                                    seq_len=int(on.max_len))
  sampler = sampler_lib.Sampler(model, tok, prompt_bucket=int(on.prompt_bucket),
                                parallel=par)  # Rows split like the train batches.
  qlambda_jit = jax.jit(qlambda_fn)
  # Diagnostics: the NLL of a round's rows before and after its updates.
  nll_step = par.jit_eval_step(step_lib.make_eval_step(
      model, losses_lib.build("nll"), qlambda_fn=qlambda_fn, axis_name=par.axis_name,
      return_terms=True), specs)
  # A KL penalty to the reference policy (the starting one) needs its log-probs.
  kl_coef = float(getattr(loss, "kl_coef", 0.0) or 0.0)
  ref_step = (par.jit_eval_step(step_lib.make_logprob_step(model, qlambda_fn=qlambda_fn),
                                specs) if kl_coef else None)

  # -------------------------------------------------------------------------------------
  # Checkpoint: resume, else start from init_from.
  # -------------------------------------------------------------------------------------
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.checkpoint.every,
      keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  abstract = sharding_lib.abstract_with_shardings(
      jax.eval_shape(init_fn, jax.random.PRNGKey(0)), par.shardings(specs))
  restored = ckpt.restore_latest(abstract, extra=(STATE_ITEM,))
  base_key = jax.random.PRNGKey(int(config.seed))
  if restored is not None:
    state = restored.state
    online_state = restored.extra[STATE_ITEM]
    start_round = int(online_state["round"])
    tokens_done = int(online_state.get("tokens_done", 0))
    if online_state.get("pool_conditions"):  # The pool the run started with.
      pool = pool_lib.ConditionPool(online_state["pool_conditions"],
                                    kind=pool.kind if pool else on.condition_kind)
    logging.info("Resumed at round %d (update %d).", start_round,
                 int(jax.device_get(state.step)))
  else:
    state = par.create_state(init_fn, base_key, specs)
    if config.init_from:
      state = state.replace(params=checkpoint_lib.restore_params(config.init_from,
                                                                 abstract.params))
    start_round = 0
    tokens_done = 0  # Input tokens trained on so far (the token budget's account).
  # Ternary code flips per round (float models: none); a resumed run starts from the
  # codes of its checkpoint, the end of the previous round.
  flip_rate = None
  if model_cfg.weight_quant != "none":
    from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top
    flip_rate = ternary_training.FlipRate(model_cfg, state.params)
  ref_params = None
  if kl_coef:  # The starting policy, the same on a resumed run.
    ref_params = (checkpoint_lib.restore_params(config.init_from, abstract.params)
                  if config.init_from else
                  par.create_state(init_fn, base_key, specs).params)

  def put(mb):
    return par.put_batch(distributed.local_rows(mb))

  def batch_nll(params, mbs, step) -> float:
    terms = None
    for mb in mbs:
      t = nll_step(params, put(mb), np.int32(step))
      terms = t if terms is None else losses_lib.add_terms(terms, t)
    return float(distributed.fetch(losses_lib.finalize_metrics(terms))["loss"])

  def ref_logprobs(mbs, step) -> np.ndarray:
    out = [np.asarray(distributed.fetch(ref_step(ref_params, put(mb), np.int32(step))))
           for mb in mbs]
    return np.concatenate([o.reshape(-1, o.shape[-1]) for o in out])  # [R, T]

  def online_state_at(r: int) -> Dict[str, Any]:
    _, cursor, epoch = round_prompts(len(prompts), int(on.prompts_per_step), r - 1,
                                     int(config.seed)) if r else (None, 0, 0)
    return dict(round=r, cursor=cursor, epoch=epoch, seed=int(config.seed),
                rng=[int(x) for x in np.asarray(jax.random.key_data(base_key))],
                pool=on.pool, pool_size=len(pool) if pool else 0,
                pool_conditions=list(pool.conditions) if pool else [],
                updates=int(jax.device_get(state.step)), tokens_done=tokens_done)

  # -------------------------------------------------------------------------------------
  # Loop.
  # -------------------------------------------------------------------------------------
  writer = metrics_lib.MetricWriter(
      workdir, resume_step=start_round if restored is not None else -1,
      is_primary=is_primary)
  progress = metrics_lib.Progress(rounds, start_round)
  history: List[Dict[str, float]] = []
  warned_cut = False
  failed = 0
  try:
    for r in range(start_round, rounds):
      t0 = time.perf_counter()
      # Prompts and sampling conditions of this round, from (seed, round) only.
      idx, _, _ = round_prompts(len(prompts), int(on.prompts_per_step), r,
                                int(config.seed))
      examples = [prompts[i] for i in idx]
      cond_rng = np.random.default_rng([int(config.seed), r, 1])
      conditions = objective.sample_conditions(pool, len(examples), n, cond_rng)  # [B n]
      if not (objective.needs_pool and on.fresh_cplus_per_rollout):
        conditions = conditions[::n]  # One per prompt, shared by its n samples.
      ro = rollout_lib.generate(
          sampler, state.params, examples, conditions, env=env,
          rng=jax.random.fold_in(base_key, r), num_samples=n, method=on.sampling,
          max_new_tokens=int(on.max_new_tokens), instruction=on.instruction,
          system=system, qlambda=qlambda_jit(state.step))
      feedback = ro.feedback
      if callbacks:
        ckpt.wait()  # Callbacks see every checkpoint due so far committed.
      for callback in callbacks:
        callback("feedback", r)

      # Sequential mini-batch updates on the re-templated rows.
      batch = objective.batch(tok, ro, int(on.max_len))
      cut = batch.pop("truncated")  # [R] rows cut at online.max_len: loss on a prefix.
      if cut.any() and not warned_cut:
        warned_cut = True
        logging.warning("Round %d: %d of %d training rows are longer than online.max_len="
                        "%d and lose their end; raise online.max_len (rollout/cut_rows "
                        "counts them each round).", r + 1, int(cut.sum()), len(cut),
                        int(on.max_len))
      if kl_coef:
        batch["ref_logprobs"] = ref_logprobs(
            _split_rows(batch, int(on.mini_batch)), int(jax.device_get(state.step)))
      mbs = _split_rows(batch, int(on.mini_batch))
      t_diag = time.perf_counter()
      nll_before = batch_nll(state.params, mbs, int(jax.device_get(state.step)))
      diag_s = time.perf_counter() - t_diag
      pending = metrics_lib.PendingMetrics()
      mb_tokens = [int(np.count_nonzero(mb["segment_ids"])) for mb in mbs]  # [M]
      round_updates = updates
      if round_tokens:  # Toward the budget so far: rounding does not add up.
        round_updates = updates_for_tokens(mb_tokens, (r + 1) * round_tokens - tokens_done)
      tokens_done += sum(mb_tokens[j % len(mbs)] for j in range(round_updates))
      t_update = time.perf_counter()
      for j in range(round_updates):  # Passes over the mini-batches, in order.
        state, m = train_step(state, put(mbs[j % len(mbs)]))
        pending.add(j, m)
      per_update = [m for _, m in pending.fetch()]
      update_s = time.perf_counter() - t_update
      step_metrics = metrics_lib.mean_metrics(per_update)
      for key in ("tokens", "input_tokens"):  # Budget: sums over the round's updates.
        step_metrics[key] = float(sum(m.get(key, 0.0) for m in per_update))
      step_metrics["updates"] = float(len(per_update))
      t_diag = time.perf_counter()
      nll_after = batch_nll(state.params, mbs, int(jax.device_get(state.step)))
      diag_s += time.perf_counter() - t_diag
      tokens = int(np.count_nonzero(batch["segment_ids"]))
      progress.add_tokens(tokens)
      answered = [fb for fb in feedback if fb.ok] or feedback
      failed += len(feedback) - int(ro.ok.sum())
      round_metrics = {
          **{f"train/{k}": v for k, v in step_metrics.items()},
          "rollout/reward": float(np.mean([fb.score for fb in answered])) / 10.0,
          "rollout/correct": float(np.mean([fb.correct for fb in feedback])),
          "rollout/length": float(np.mean(ro.lengths)),
          "rollout/truncated": float(np.mean(ro.lengths >= int(on.max_new_tokens))),
          "rollout/cut_rows": float(np.mean(cut)),
          "rollout/batch_nll_before": nll_before, "rollout/batch_nll_after": nll_after,
          "feedback/failed": float(len(feedback) - int(ro.ok.sum())),
          "feedback/hits": float(env.hits), "feedback/misses": float(env.misses),
          # Where the round's time went (compiles of the first round included).
          "time/round_s": time.perf_counter() - t0,
          "time/sample_s": ro.sample_s, "time/feedback_s": ro.feedback_s,
          "time/update_s": update_s, "time/diagnostics_s": diag_s,
      }
      if flip_rate is not None:  # Every process computes it (SPMD); process 0 writes.
        round_metrics.update(flip_rate(state.params))
      if (r + 1) % int(config.log_every) == 0 or r + 1 == rounds:
        speed = progress.report(r + 1)
        round_metrics.update({f"speed/{k}": v for k, v in speed.items()})
        logging.info("round %d/%d | loss %.4f | reward %.3f | correct %.3f | len %.1f | "
                     "%s tok/s | ETA %s", r + 1, rounds, step_metrics.get("loss", 0.0),
                     round_metrics["rollout/reward"], round_metrics["rollout/correct"],
                     round_metrics["rollout/length"], f"{speed['tokens_per_s']:,.0f}",
                     metrics_lib.format_duration(speed["eta_s"]))
      metrics_lib.check_finite(r + 1, round_metrics)
      writer.write(r + 1, round_metrics)
      history.append(round_metrics)
      ckpt.save(r + 1, state, extra={STATE_ITEM: online_state_at(r + 1)},
                force=r + 1 == rounds)
      writer.flush()
  finally:
    ckpt.close()
    writer.close()

  # -------------------------------------------------------------------------------------
  # Summary.
  # -------------------------------------------------------------------------------------
  plots = (metrics_lib.plot_curves(workdir, ("loss", "reward", "correct", "length"))
           if (config.plots and is_primary) else [])
  summary = dict(workdir=workdir, rounds=rounds, start_round=start_round,
                 resumed=restored is not None, updates=int(jax.device_get(state.step)),
                 samples=rounds * int(on.prompts_per_step) * n,
                 feedback_hits=env.hits, feedback_misses=env.misses,
                 feedback_failed=failed,
                 feedback_records=len(env), last=history[-1] if history else {},
                 plots=plots)
  logging.info("Done: %s", {k: summary[k] for k in ("rounds", "updates", "samples")})
  return summary

"""The default experiment: FCP from scratch on arithmetic, ternary QAT, rule-based critic.

    python -m fcp_jax.pipeline --config configs/arith_fcp.py --workdir runs/x
    python -m fcp_jax.pipeline --config configs/arith_fcp.py:runlocal --workdir /tmp/x
    python experiments/sweep.py --config configs/arith_fcp.py:runlocal --workdir /tmp/s

Args (``:variant=small,runlocal,seed=0,ternary=True,subln=auto,stage=``):
  variant: model variant (``fcp_jax.models.transformer.VARIANTS``).
  runlocal: tiny model, a few steps of every stage (the test suite runs it).
  seed: seeds every stage (model init, data order, sampling, pool draws).
  dim, layers: model width / depth overrides (0 keeps the variant's; the default
    128 x 4 layers is ``small`` narrowed to fit the CPU time budget).
  ternary: 1.58-bit QAT of the linear layers (``absmean`` weights, ``absmax_int8``
    activations, λ warm-up during the SFT warm-up); ``ternary=False`` is the float model.
  subln: BitNet b1.58 2B4T's SubLN (an RMSNorm at the input of o_proj and down_proj);
    ``auto`` (on for the ternary model, off for the float one), ``True`` or ``False``.
  stage: ``""`` for the pipeline config; ``warmup``, ``offline``, ``rft`` (configs of
    ``fcp_jax.train``), ``bootstrap``, ``grpo`` (of ``fcp_jax.bootstrap``) or ``eval``
    (of ``fcp_jax.evaluate``) for one stage's config alone.

Task: reasoning-gym ``chain_sum`` with 3-5 one-digit terms, compact questions
(``4-9+7=?``) and compact chain-of-thought responses (``4-9=-5\\n-5+7=2\\n#### 2``).
Feedback: the rule-based critic; conditions are its reviewer summaries.

Fair defaults (``docs/fcp_method.md``): every method starts from the same warm-up, gets
the same reference rows beyond it (``collect.references``: none), the same number of
generated samples and the same training tokens (``budget.train_tokens``; the pipeline
derives each stage's steps, GRPO's passes per round and RFT+GRPO's split from it and
checks each method within ±10%). Each method's learning rate, RFT's filter and the
bootstrap's lr factor are the validation selections of the ``TUNING`` families below
(the bootstrap's factor at offline FCP's selected lr). Findings behind the settings:
``docs/findings.md``.
"""

import itertools

import ml_collections

from fcp_jax import config_lib

from . import common

TASK = "chain_sum(min_terms=3, max_terms=5, min_digits=1, max_digits=1, compact=True)"
FEEDBACK = "critic(noise=0.0, seed=0)"
KIND = "reviewer"
CPLUS_MIN_SCORE = 8  # The c+ pool's score threshold, and filtered RFT's.

# Stage builders (``configs/common.py``); their defaults are this experiment's.
_offline = common.offline_stage
_online = common.online_stage


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="small", runlocal=False, seed=0, ternary=True,
                             stage="", dim=128, layers=4, subln="auto")
  if arg.runlocal and arg.variant == "small":
    arg.variant = "tiny"
    arg.dim = arg.layers = 0  # The tiny variant's own size.
  # Shared settings: every stage's config is derived from these (config_lib.DERIVED).
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.tokenizer = "char"
  config.feedback = FEEDBACK
  config.kind = KIND
  config.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, weight_quant="none", act_quant="none"))
  if arg.dim:  # Width override: heads keep 64 dims (at least 2 heads).
    config.model.update(embed_dim=arg.dim, num_heads=max(arg.dim // 64, 2),
                        num_kv_heads=max(arg.dim // 128, 1),
                        head_dim=min(64, arg.dim // 2), mlp_dim=3 * arg.dim)
  if arg.layers:
    config.model.num_layers = arg.layers
  if arg.ternary:
    config.model.update(weight_quant="absmean", act_quant="absmax_int8")
  if common.subln(arg.subln, arg.ternary):  # A key only when on (float keys stay).
    config.model.subln = True
  config.parallel = common.parallel()
  # Prompts (``experiment.split_prompts``): train prompts feed the warm-up, the
  # collection and the online rounds (the first ``online.task_size`` of them);
  # validation prompts (tuning) and test prompts (reporting) are held out, all three
  # disjoint by question; ``task_seed=None`` follows ``seed``. ``direct_fraction`` of
  # the warm-up references are answer-only (``#### n``); ``warmup_conditions`` of the
  # warm-up rows carry a random feedback text (``experiment.warmup_records``).
  config.data = ml_collections.ConfigDict(dict(
      task=TASK, train_size=8000, validation_size=200, eval_size=200, task_seed=None,
      instruction="none", system="", direct_fraction=0.6, warmup_conditions=0.0))

  # 1. SFT warm-up on reference solutions under the null condition <EF></EF>.
  config.warmup = _offline(objective="warmup", steps=1000, batch=12, lr=3e-3,
                           max_len=128, data_name="sft")
  if arg.ternary:
    config.warmup.quant.lambda_ramp = 60
    config.warmup.optim.update(weight_decay=0.05, stage2_at=0.6)
  else:
    config.warmup.optim.lr = 1e-3

  # 2. Collect k samples per prompt from the warm-up; keep prompts with mixed outcomes
  #    (``pairs=0``: every sample of them); the warm-up's references of ``references``
  #    further prompts would join the triples (0: no method gets references beyond the
  #    warm-up); pools of c+ (correct, score >= 8) and of the worst verdicts (wrong,
  #    score <= 2).
  config.collect = ml_collections.ConfigDict(dict(
      prompts=1500, num_samples=4, pairs=0, references=0, sampling="temperature(t=1.0)",
      max_new_tokens=48, batch_prompts=200, eval_fraction=0.05,
      pool_min_score=CPLUS_MIN_SCORE, pool_require_correct=True, negative_max_score=2))

  # 3. Offline FCP on the triples: log π(y | <EF>c</EF> x).
  config.offline = _offline(objective="fcp", steps=0, batch=18, lr=1e-3,
                            max_len=208, data_name="triples")

  # 4. Online bootstrapping from offline FCP: sample under c+, train under fresh c';
  #    partial-online: 4 mini-batch updates per round, at ``lr_factor`` x offline's lr.
  config.bootstrap = _online(objective="fcp", loss="nll(aggregation='token-mean')",
                             rounds=12, prompts=32, samples=4, mini_batch=32, lr=None,
                             max_len=184, max_new=48, task_size=2000)
  config.bootstrap.lr_factor = 0.005

  # Baselines from the same warm-up, samples and training tokens: RFT on the correct
  # samples at the c+ threshold, GRPO (score / 10 reward; rounds from the sample
  # budget), and RFT+GRPO (RFT on the collection, then GRPO for the bootstrap's rounds).
  config.rft = _offline(objective=f"rft_null(min_score={CPLUS_MIN_SCORE})", steps=0,
                        batch=12, lr=1e-3, max_len=128, data_name="rft")
  config.grpo = _online(objective="grpo", loss="grpo(clip_eps=0.2)", rounds=0,
                        prompts=64, samples=4, mini_batch=32, lr=3e-5, max_len=80,
                        max_new=48, task_size=2000)
  # Training tokens (non-padding inputs) of every method beyond the warm-up; the offline
  # and RFT stages take their steps from it (``total_steps=0``). 0: no budget, every
  # stage's own total_steps and online.epochs.
  config.budget = ml_collections.ConfigDict(dict(train_tokens=600_000))

  # 5. Evaluation: greedy, on the ``splits`` named (test reports; validation tunes),
  #    under each condition (``evaluation.CONDITIONS``), four seeds of the condition
  #    draws (pool c+ and the worst verdicts; fixed texts are decoded once). ``pool``
  #    and ``negatives`` are paths for the standalone ``fcp_jax.evaluate``.
  config.eval = ml_collections.ConfigDict(dict(
      splits=("test",), size=200,
      conditions=("pool", "null", "negative", "fixed_negative", "positive"),
      seeds=(0, 1, 2, 3),
      negative="", positive="", max_new_tokens=48, batch_size=200, pool="",
      negatives=""))
  config.methods = ("warmup", "offline_fcp", "fcp_bootstrap", "rft", "grpo", "rft_grpo")
  # What a re-run does with a finished stage whose key changed: "recompute" it (and
  # everything downstream), or "refuse" with the list of changed keys.
  config.on_change = "recompute"
  # Processes that share the stages after the collection (``fcp_jax.stage_workers``;
  # 0: 2 on a CPU host, else 1).
  config.stage_workers = 0

  if arg.runlocal:
    # Answer-only references and random warm-up conditions on, so tests cover them.
    config.data.update(train_size=96, validation_size=16, eval_size=32,
                       direct_fraction=0.25,
                       warmup_conditions=0.25)
    for name in ("warmup", "offline", "rft"):  # Offline FCP and RFT: steps from budget.
      config[name].update(batch_size=8, log_every=3)
      config[name].eval.update(batch_size=8, max_batches=1)
    config.warmup.total_steps = 6
    config.warmup.eval.every = config.warmup.checkpoint.every = 3
    config.warmup.quant.lambda_ramp = 2 if arg.ternary else 0
    config.collect.update(prompts=24, num_samples=4, pairs=1, max_new_tokens=12,
                          batch_prompts=24, eval_fraction=0.2, pool_min_score=0,
                          pool_require_correct=False, negative_max_score=10)
    config.rft.objective = "rft_null"  # Runlocal's c+ pool has no threshold either.
    for name in ("bootstrap", "grpo"):
      config[name].online.update(task_size=96, prompts_per_step=4, num_samples=2,
                                 mini_batch=8, max_new_tokens=12)
      config[name].update(log_every=1)
      config[name].checkpoint.every = 1
    config.bootstrap.online.rounds = 2  # GRPO's rounds follow from the sample budget.
    config.eval.update(size=16, seeds=(0, 1), max_new_tokens=12, batch_size=16)
    config.budget.train_tokens = 8000
    config.stage_workers = 1

  return config_lib.pipeline_stage(config, arg.stage)


SEEDS = (0, 1, 2)
# Tuning families (``experiments/sweep.py --family NAME``): seeds x a grid of overrides,
# the tuned methods alone, evaluated on the validation split under their native
# conditions; the sweep's selection table picks each method's best group by its
# validation mean. RFT+GRPO runs the selected RFT and GRPO settings.
TUNING = {
    "tune_fcp": dict(methods=("offline_fcp", "fcp_bootstrap"), grid={
        "offline.optim.lr": (3e-4, 1e-3, 3e-3),
        "bootstrap.lr_factor": (0.005, 0.02, 0.2)}),
    "tune_rft": dict(methods=("rft",), grid={
        "rft.optim.lr": (3e-4, 1e-3, 3e-3),
        "rft.objective": ("'rft_null'", "'rft_null(min_score=8)'")}),
    "tune_grpo": dict(methods=("grpo",), grid={
        "grpo.optim.lr": (3e-6, 1e-5, 3e-5, 1e-4, 3e-4),
        "grpo.loss": ("'grpo(clip_eps=0.2)'", "'grpo(clip_eps=0.2, kl_coef=0.05)'")}),
}
# Reported families: seeds x arms of the default config, evaluated on the test split.
ARMS = {
    # Feedback that is not a clean label, and the task without its answer-only mode.
    "arms": {"noisy_critic": ["feedback='critic(noise=0.2, seed=0)'"],
             "user": ["kind=user"], "critique": ["kind=critique"],
             "critique_no_numbers": [
                 "kind=critique",
                 "feedback='critic(noise=0.0, seed=0, critique_numbers=False)'"],
             "no_direct": ["data.direct_fraction=0.0"]},
    # The paper's Table 5 ablations of FCP and its bootstrap.
    "ablations": {
        "fresh_cplus": ["bootstrap.online.fresh_cplus_per_rollout=True"],
        "seq_mean": ["offline.loss=nll(aggregation='seq-mean-token-sum')",
                     "bootstrap.loss=nll(aggregation='seq-mean-token-sum')"],
        "mini_batch_128": ["bootstrap.online.mini_batch=128"]},
    # Accuracy against training tokens: every method at other budgets (the default 600k
    # is ``get_sweep()``'s ternary arm).
    "token_curve": {f"tokens_{t // 1000}k": [f"budget.train_tokens={t}"]
                    for t in (300_000, 1_200_000, 2_400_000)},
}
# Reported families of config args, on test; each compares with ``get_sweep()``'s
# ternary arm of the same seed.
ARG_ARMS = {
    "no_subln": "subln=False",  # The ternary model without SubLN.
}


def get_sweep(family=None):
  """Entries for ``experiments/sweep.py``.

  ``None``: seeds x quantizer (float vs ternary), on test. A ``TUNING`` family: seeds x
  its grid, on validation. An ``ARMS`` family: seeds x its arms, on test; an
  ``ARG_ARMS`` one: seeds with its args, on test.
  """
  if family is None:
    return [f"seed={seed},ternary={ternary}" for seed in SEEDS
            for ternary in (False, True)]
  if family in ARMS:
    return [dict(arg=f"seed={seed}", overrides=overrides) for seed in SEEDS
            for overrides in ARMS[family].values()]
  if family in ARG_ARMS:
    return [f"seed={seed},{ARG_ARMS[family]}" for seed in SEEDS]
  if family not in TUNING:
    raise ValueError(f"Unknown sweep family {family!r}; known: "
                     f"{sorted(TUNING) + sorted(ARMS) + sorted(ARG_ARMS)}.")
  keys, grids = zip(*TUNING[family]["grid"].items())
  fixed = ["eval.splits=('validation',)", "eval.conditions=('pool', 'null')",
           f"methods={TUNING[family]['methods']}"]
  return [dict(arg=f"seed={seed}", overrides=fixed + [
      f"{k}={v}" for k, v in zip(keys, values)])
          for seed in SEEDS for values in itertools.product(*grids)]

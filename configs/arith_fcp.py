"""The default experiment: FCP from scratch on arithmetic, ternary QAT, rule-based critic.

    python -m fcp_jax.pipeline --config configs/arith_fcp.py --workdir runs/x
    python -m fcp_jax.pipeline --config configs/arith_fcp.py:runlocal --workdir /tmp/x
    python experiments/sweep.py --config configs/arith_fcp.py:runlocal --workdir /tmp/s

Args (``:variant=small,runlocal,seed=0,ternary=True,stage=``):
  variant: model variant (``fcp_jax.models.transformer.VARIANTS``).
  runlocal: tiny model, a few steps of every stage (the test suite runs it).
  seed: seeds every stage (model init, data order, sampling, pool draws).
  dim, layers: model width / depth overrides (0 keeps the variant's; the default
    128 x 4 layers is ``small`` narrowed to fit the CPU time budget).
  ternary: 1.58-bit QAT of the linear layers (``absmean`` weights, ``absmax_int8``
    activations, λ warm-up during the SFT warm-up); ``ternary=False`` is the float model.
  stage: ``""`` for the pipeline config; ``warmup``, ``offline``, ``rft`` (configs of
    ``fcp_jax.train``), ``bootstrap``, ``grpo`` (of ``fcp_jax.bootstrap``) or ``eval``
    (of ``fcp_jax.evaluate``) for one stage's config alone.

Task: reasoning-gym ``chain_sum`` with 3-5 terms of 1 digit, compact questions
(``4-9+7=?``) and compact chain-of-thought responses (``4-9=-5\\n-5+7=2\\n#### 2``,
at most 44 characters, so 48 new tokens never truncate one); no system prompt and no
answer instruction, to keep character sequences short. With 3-5 terms the warm-up's
bare guesses are right only ~25% of the time, which leaves worked chains room to beat
them (with 2-4 terms guesses were 45-66% right and the gap was fragile).
Feedback: the rule-based critic; conditions are its reviewer summaries.

Budget: FCP uses ``collect.prompts * collect.num_samples`` samples offline plus
``bootstrap.online.rounds * prompts_per_step * num_samples`` online; RFT collects the
online share again from the warm-up policy and GRPO runs as many rounds as make the same
total (``fcp_jax.pipeline`` derives both), so every method sees the same number of
generated samples.
"""

import ml_collections

from fcp_jax import config_lib
from fcp_jax.training import sharding

TASK = "chain_sum(min_terms=3, max_terms=5, min_digits=1, max_digits=1, compact=True)"
FEEDBACK = "critic(noise=0.0, seed=0)"
KIND = "reviewer"


def _common(arg) -> ml_collections.ConfigDict:
  """Fields every training stage shares (model, quantization, parallelism)."""
  c = ml_collections.ConfigDict()
  c.seed = arg.seed
  c.tokenizer = "char"
  c.log_every = 20
  c.init_from = ""
  c.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, weight_quant="none", act_quant="none"))
  if arg.dim:  # Width override: heads keep 64 dims (at least 2 heads).
    c.model.update(embed_dim=arg.dim, num_heads=max(arg.dim // 64, 2),
                   num_kv_heads=max(arg.dim // 128, 1), head_dim=min(64, arg.dim // 2),
                   mlp_dim=3 * arg.dim)
  if arg.layers:
    c.model.num_layers = arg.layers
  c.quant = ml_collections.ConfigDict(dict(lambda_start=0, lambda_ramp=0, lambda_stagger=0))
  c.parallel = ml_collections.ConfigDict(dict(
      mode="mesh", mesh_shape=(-1, 1, 1), rules=sharding.DEFAULT_RULES,
      distributed=False, coordinator_address="", num_processes=0, process_id=-1))
  c.checkpoint = ml_collections.ConfigDict(dict(every=0, keep=2, async_save=False))
  c.debug = ml_collections.ConfigDict(dict(nan_at_step=-1, kill_at_round=-1))
  c.plots = True
  if arg.ternary:
    c.model.weight_quant = "absmean"
    c.model.act_quant = "absmax_int8"
  return c


def _optim(lr: float, *, schedule: str = "cosine(end_factor=0.1)", warmup_frac=0.05,
           weight_decay=0.0, stage2_at=0.0) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=lr, schedule=schedule, warmup_steps=0, warmup_frac=warmup_frac, b1=0.9,
      b2=0.95, eps=1e-8, weight_decay=weight_decay, clip_norm=1.0, stage2_at=stage2_at,
      stage2_lr_factor=0.5 if stage2_at else 1.0, stage2_weight_decay=0.0))


def _offline(arg, *, objective: str, steps: int, batch: int, lr: float, max_len: int,
             data_name: str, pack: bool = True) -> ml_collections.ConfigDict:
  """A ``fcp_jax.train`` config (the pipeline fills ``data.data_dir`` and init_from).

  With ``pack`` each of the ``batch`` rows holds as many whole sequences as fit in
  ``max_len`` (first fit), so a row of ``max_len`` ~ 2-3x the mean sequence is ~87-92%
  tokens instead of ~65% when every sequence is padded to the longest.
  """
  c = _common(arg)
  c.objective = objective
  c.total_steps = steps
  c.batch_size = batch
  c.grad_accum = 1
  c.loss = "nll(aggregation='token-mean')"
  c.optim = _optim(lr)
  c.data = ml_collections.ConfigDict(dict(
      data_dir="", name=data_name, train_split="train", eval_split="eval",
      max_len=max_len, pack=pack, overflow="truncate", num_workers=0, system=None))
  c.eval = ml_collections.ConfigDict(dict(every=max(steps // 2, 1), batch_size=batch,
                                          max_batches=2))
  return c


def _online(arg, *, objective: str, loss: str, rounds: int, prompts: int, samples: int,
            mini_batch: int, lr: float, max_len: int, max_new: int
            ) -> ml_collections.ConfigDict:
  """A ``fcp_jax.bootstrap`` config (the pipeline fills init_from and the pool)."""
  c = _common(arg)
  c.objective = objective
  c.loss = loss
  c.log_every = 5
  c.optim = _optim(lr, schedule="constant", warmup_frac=0.0)
  c.checkpoint.every = 5
  c.online = ml_collections.ConfigDict(dict(
      task=TASK, task_size=2000, task_seed=arg.seed, instruction="none", system="",
      rounds=rounds, prompts_per_step=prompts, num_samples=samples,
      mini_batch=mini_batch, sampling="temperature(t=1.0)", max_new_tokens=max_new,
      max_len=max_len, prompt_bucket=64, condition_kind=KIND,
      fresh_cplus_per_rollout=False, feedback=FEEDBACK, pool=""))
  return c


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="small", runlocal=False, seed=0, ternary=True,
                             stage="", dim=128, layers=4)
  if arg.runlocal and arg.variant == "small":
    arg.variant = "tiny"
    arg.dim = arg.layers = 0  # The tiny variant's own size.
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.tokenizer = "char"
  config.feedback = FEEDBACK
  config.kind = KIND

  # Prompts: train prompts feed the warm-up, the collection and the online rounds;
  # eval prompts are held out (disjoint by question hash). ``direct_fraction`` of the
  # warm-up references are answer-only (``#### n``, seeded per prompt): a second mode of
  # behaviour that feedback can steer (guessing vs working it out). ``warmup_conditions``
  # of the warm-up rows carry a random feedback text (``pipeline.warmup_records``).
  config.data = ml_collections.ConfigDict(dict(
      task=TASK, train_size=8000, eval_size=200, task_seed=arg.seed,
      instruction="none", system="", direct_fraction=0.6, warmup_conditions=0.0))

  # 1. SFT warm-up on reference solutions under the null condition <EF></EF>. With 60%
  #    answer-only references, greedy decoding guesses (``#### n``) for every prompt,
  #    ~25% right: a behaviour that the feedback (which praises clean chains over bare
  #    answers) can steer towards working the problem out. Packed rows of 128 hold ~32
  #    sequences (~48 tokens, at most 77): the same quality as 32 rows padded to 80
  #    (eval loss 0.191 vs 0.192) in 270 s instead of 370 s. The warm-up's arithmetic
  #    decides how right FCP's chains are: 1000 steps instead of 800 (eval loss 0.139
  #    instead of 0.191, samples at T=1 35% right instead of 21%) took FCP+bootstrap
  #    under pool c+ from 41.0 to 79.2 on seed 0.
  config.warmup = _offline(arg, objective="warmup", steps=1000, batch=12, lr=3e-3,
                           max_len=128, data_name="sft")
  #    Learning rates: ternary QAT takes 3e-3 (two-stage, weight decay off for the last
  #    40%); the float model's own scan (seed 0, 800 steps, eval loss) chose 1e-3:
  #    3e-3 0.45, 6e-3 0.75, 1.2e-2 0.97, 1.5e-3 0.18, 1e-3 0.17 (ternary: 0.19).
  if arg.ternary:
    config.warmup.quant.lambda_ramp = 60
    config.warmup.optim.update(weight_decay=0.05, stage2_at=0.6)
  else:
    config.warmup.optim.lr = 1e-3

  # 2. Collect k samples per prompt from the warm-up and keep prompts with mixed
  #    outcomes: every sample of them (``pairs=0``, the policy's own proportions), or
  #    ``pairs`` correct and ``pairs`` incorrect responses of each. Many distinct prompts
  #    matter more than many samples per prompt: offline FCP on a few hundred prompts
  #    for several epochs overfits and loses arithmetic on held-out questions.
  #    ``references``: the warm-up's own references of that many further prompts join
  #    the triples with the critic's feedback on them (clean chains under positive
  #    conditions; RFT gets them too, as correct responses). They are cheap (no sampling)
  #    and lift the chains under c+: 5000 instead of 3000 (and 8 bootstrap rounds
  #    instead of 12) ended 6 points higher under pool c+. 1500 sampled prompts instead
  #    of 2000 pay for the longer warm-up (GRPO's equal budget shrinks with them).
  #    Pools from the samples' feedback: c+ are the correct verdicts scored ≥ 8; their
  #    mirror image, the wrong ones scored ≤ 10 - 8 = 2, are evaluation's fully negative
  #    condition (mostly bare wrong guesses and chains that slip, ~400 phrasings).
  config.collect = ml_collections.ConfigDict(dict(
      prompts=1500, num_samples=4, pairs=0, references=5000, sampling="temperature(t=1.0)",
      max_new_tokens=48, batch_prompts=200, eval_fraction=0.05,
      pool_min_score=8, pool_require_correct=True, negative_max_score=2))

  # 3. Offline FCP on the triples: log π(y | <EF>c</EF> x). The warm-up never saw
  #    feedback text, so the first steps are a shock (response loss ~1.7 against ~0.19
  #    under null); ~2 epochs restore the arithmetic in the new context.
  #    Packed: 18 rows of 208 hold ~32 triples (~100 tokens, at most ~170) per step,
  #    in half the time of 32 padded rows of 160. Accuracy follows the offline compute
  #    closely: 400 steps end at eval loss 0.25 instead of 0.18 and lose ~17 points.
  config.offline = _offline(arg, objective="fcp", steps=540, batch=18, lr=1e-3,
                            max_len=208, data_name="triples")

  # 4. Online bootstrapping from offline FCP: sample under c+, train under fresh c'.
  #    Conservative (one update per round, lr 5e-6): at T=1 only ~20% of the rollouts
  #    are right, and this model cannot tie *where* a chain slipped to the negative c'
  #    it gets, so larger steps leak the slips into c+ (16 rounds at lr 1e-5 took
  #    pool-c+ accuracy from 48% to 26%, flipping only 0.07% of the ternary codes).
  #    ``max_len`` 184 holds the longest c' (106 characters) with a full response.
  config.bootstrap = _online(arg, objective="fcp", loss="nll(aggregation='token-mean')",
                             rounds=8, prompts=32, samples=4, mini_batch=128, lr=5e-6,
                             max_len=184, max_new=48)

  # Baselines from the same warm-up and the same number of generated samples. GRPO takes
  # 64 prompts (256 samples, 8 updates) per round for 28 rounds: 15 s less than 55
  # rounds of 32 for the time budget. RFT needs its 100 steps (60 ended 5-12 points
  # lower under null and saved 5 s).
  config.rft = _offline(arg, objective="rft_null", steps=100, batch=12, lr=1e-3,
                        max_len=128, data_name="rft")
  config.grpo = _online(arg, objective="grpo", loss="grpo(clip_eps=0.2)", rounds=0,
                        prompts=64, samples=4, mini_batch=32, lr=3e-4, max_len=80,
                        max_new=48)

  # 5. Evaluation: greedy, held-out prompts, under each condition, two seeds (only the
  #    draws of pool c+ and of the worst verdicts depend on the seed). "no_answer" (the
  #    critic's verdicts on responses without an answer, which the samples never earn)
  #    can join the conditions. ``pool`` and ``negatives`` are paths for the standalone
  #    ``fcp_jax.evaluate`` (the pipeline passes the collect stage's pools).
  config.eval = ml_collections.ConfigDict(dict(
      task=TASK, size=200, task_seed=arg.seed, conditions=("pool", "null", "negative",
                                                           "positive"),
      seeds=(0, 1), kind=KIND, feedback=FEEDBACK, negative="", positive="",
      instruction="none", system="", max_new_tokens=48, batch_size=200, pool="",
      negatives=""))
  config.methods = ("warmup", "offline_fcp", "fcp_bootstrap", "rft", "grpo")

  if arg.runlocal:
    # Answer-only references and random warm-up conditions on, so tests cover them.
    config.data.update(train_size=96, eval_size=32, direct_fraction=0.25,
                       warmup_conditions=0.25)
    for name in ("warmup", "offline", "rft"):
      stage = config[name]
      stage.update(total_steps=6, batch_size=8, log_every=3)
      stage.eval.update(every=3, batch_size=8, max_batches=1)
    config.warmup.quant.lambda_ramp = 2 if arg.ternary else 0
    config.collect.update(prompts=24, num_samples=4, pairs=1, references=8, max_new_tokens=12,
                          batch_prompts=24, eval_fraction=0.2, pool_min_score=0,
                          pool_require_correct=False, negative_max_score=10)
    for name in ("bootstrap", "grpo"):
      config[name].online.update(task_size=96, rounds=2, prompts_per_step=4,
                                 num_samples=2, mini_batch=8, max_new_tokens=12)
      config[name].update(log_every=1)
      config[name].checkpoint.every = 1
    config.eval.update(size=16, seeds=(0, 1), max_new_tokens=12, batch_size=16)

  return config_lib.pipeline_stage(config, arg.stage)


def get_sweep(hyper=None):
  """Seeds x quantizer (float vs ternary): a list of config args for ``sweep.py``."""
  del hyper
  return [f"seed={seed},ternary={ternary}" for seed in (0, 1, 2)
          for ternary in (False, True)]

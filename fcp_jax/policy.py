"""The policy every stage shares: tokenizer, model, sampler, final λ, and its params.

Library code for the drivers (``fcp_jax.train``, ``bootstrap``, ``evaluate``,
``pipeline``): building the tokenizer of ``config.tokenizer``, checking it against the
model's vocabulary, writing a pretrained model once as a run folder that ``init_from``
and ``tokenizer`` accept, filling the ternary-only params a float checkpoint lacks, and
``Policy``, the model with a sampler and the deployed λ that loads any stage's params.
"""

import os
from typing import Any, Callable, Dict, Mapping, Optional

from absl import logging
import flax.linen as nn
import jax
import numpy as np

from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import checkpoint as checkpoint_lib
from fcp_jax.training import sharding as sharding_lib
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib

TOKENIZERS = {"char": tokenizer_lib.CharTokenizer}
TOKENIZER_FILE = "tokenizer.json"
# Prompt lengths are padded to a multiple of this before sampling (one compile per
# multiple); evaluation and collection use it, the online driver its own setting.
PROMPT_BUCKET = 32


def build_tokenizer(spec: str):
  """``"char"``, a Hugging Face ``tokenizer.json``, or a folder holding one.

  A folder is e.g. the FCP pipeline's ``base/`` stage, which writes the pretrained
  model's tokenizer (with ``<EF>``, ``</EF>``) beside its params.
  """
  if spec in TOKENIZERS:
    return TOKENIZERS[spec]()
  path = spec
  if os.path.isdir(spec):
    path = os.path.join(spec, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.tokenizer={spec!r} is neither one of "
                            f"{sorted(TOKENIZERS)} nor an existing tokenizer file (or "
                            f"a folder holding {TOKENIZER_FILE}).")
  return tokenizer_lib.HFTokenizer(path)


def check_vocab(tok, model_cfg):
  if tok.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"Tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                     f"is {model_cfg.vocab_size}; use a larger variant or override "
                     "config.model.vocab_size.")



def write_pretrained_base(spec: str, model_config: Mapping[str, Any],
                          folder: str) -> Dict[str, Any]:
  """Loads ``pretrained.PRETRAINED`` model ``spec`` and writes it as a run ``folder``.

  The params go to ``folder/checkpoints`` (``checkpoint.save_params``), read by
  ``init_from=folder``; the tokenizer (``<EF>``, ``</EF>``, ChatML tokens) to
  ``folder/tokenizer.json``, read by ``tokenizer=folder``. The layout (``scan_layers``)
  and parameter dtype follow ``model_config`` (a ``config.model`` section), and its
  architecture must equal the loaded model's, padded vocabulary included.

  Returns:
    A record of what was written (source, sizes, added tokens, paths).
  """
  from fcp_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  model_cfg = state_lib.model_config(model_config)
  base = pretrained.PRETRAINED.build(spec, scan_layers=model_cfg.scan_layers,
                                     dtype=model_cfg.param_dtype)
  pretrained.check_architecture(
      base.cfg, model_cfg, loaded_name=f"pretrained {spec!r} ({base.source})",
      expected_name=f"config.model (variant {model_config['variant']!r})")
  check_vocab(base.tokenizer, model_cfg)
  os.makedirs(folder, exist_ok=True)
  tokenizer_path = os.path.join(folder, TOKENIZER_FILE)
  base.tokenizer.save(tokenizer_path)
  checkpoint_dir = checkpoint_lib.save_params(folder, base.params)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(base.params))
  logging.info("Pretrained %s: %s, %d params, vocabulary %d (tokenizer %d, added %s).",
               spec, base.source, num_params, base.cfg.vocab_size,
               base.tokenizer.vocab_size, list(base.tokenizer.added_tokens))
  return dict(pretrained=spec, source=base.source, num_params=num_params,
              vocab_size=base.cfg.vocab_size,
              tokenizer_vocab_size=base.tokenizer.vocab_size,
              added_tokens=list(base.tokenizer.added_tokens), tokenizer=tokenizer_path,
              checkpoints=checkpoint_dir)


def fill_quant_params_fn(model) -> Callable[[Any], Any]:
  """``init_from``'s ``fill_missing``: ternary-only params from their initialisers.

  A float checkpoint (e.g. a pretrained base) read by a ternary model lacks the
  extra-RMSNorm gains (init 1) and the quantizers' own params, which are initialised
  by ``ternary_training.fill_quant_params`` from the loaded kernels (SEQ's ``max|W|``,
  DLT's scale), exactly as a fresh init would from those kernels.
  """
  from fcp_jax.models import ternary_training  # pylint: disable=g-import-not-at-top

  def fill(params):
    return ternary_training.fill_quant_params(
        model, params, np.zeros((1, state_lib.INIT_SEQ_LEN), np.int32))

  return fill



class Policy:
  """The model of an experiment with a sampler and the deployed (final) λ.

  Args:
    model_config: a ``config.model`` section.
    tokenizer: a ``config.tokenizer`` spec (``build_tokenizer``).
    quant: the λ schedule the model was trained with (``config.quant``); sampling
      uses its final value.
    parallel: a ``config.parallel`` section: params are loaded placed as training
      places them, and the sampler splits its rows over the batch devices (every
      device, and every process, samples its share). None: one device.
  """

  def __init__(self, model_config: Mapping[str, Any], tokenizer: str,
               quant: Mapping[str, Any], *, prompt_bucket: int = PROMPT_BUCKET,
               parallel: Optional[Mapping[str, Any]] = None):
    self.tok = build_tokenizer(tokenizer)
    self.model, self.model_cfg = state_lib.build_model(model_config)
    check_vocab(self.tok, self.model_cfg)
    par = sharding_lib.build(parallel) if parallel is not None else None
    self.sampler = sampler_lib.Sampler(self.model, self.tok, prompt_bucket=prompt_bucket,
                                       parallel=par)
    self.abstract = jax.eval_shape(lambda: nn.unbox(state_lib.init_boxed_params(
        self.model, jax.random.PRNGKey(0))))
    if par is not None:
      self.abstract = sharding_lib.abstract_with_shardings(
          self.abstract, par.shardings(state_lib.param_logical_specs(self.model)))
    self.qlambda = step_lib.make_qlambda_fn(self.model_cfg, quant)(
        step_lib.final_qlambda_step(quant, self.model_cfg.num_layers))

  def load(self, run_dir: str) -> Any:
    """The params of a run folder (or checkpoint path), newest complete step."""
    return checkpoint_lib.restore_params(run_dir, self.abstract)

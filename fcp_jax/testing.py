"""Helpers shared by tests and colabs: tiny models and tokenizers, kill-at callbacks,
drivers under ``experiments/`` loaded as modules."""

import functools
import importlib
import importlib.util
import os
import signal
import sys
from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import transformer as transformer_lib


def tiny_model(seed: int = 0, variant: str = "tiny", **overrides
               ) -> Tuple[transformer_lib.TransformerConfig, transformer_lib.Transformer, dict]:
  """Returns ``(cfg, model, params)`` of a freshly initialised small variant."""
  cfg = transformer_lib.get_variant(variant, **overrides)
  model = transformer_lib.Transformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"])
  return cfg, model, params


def char_tokenizer() -> tokenizer_lib.CharTokenizer:
  return tokenizer_lib.CharTokenizer()


def load_driver(path: str):
  """The script at ``path`` (e.g. ``experiments/export_gguf.py``) as a fresh module.

  Drivers are leaves that no module imports; tests call their ``main`` this way.
  """
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0] + "_driver", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def kill_at(event: str, index: int):
  """A learner callback that SIGKILLs this process at ``(event, index)`` (kill tests)."""

  def callback(name: str, i: int):
    if (name, i) == (event, index):
      os.kill(os.getpid(), signal.SIGKILL)

  return callback


def main(argv: Sequence[str]):
  """``python -m fcp_jax.testing MODULE:FN EVENT INDEX --config ... --workdir ...``.

  Runs a learner's ``run(config, workdir, callbacks=...)`` from the command line (as
  its driver does) and SIGKILLs the process at ``(EVENT, INDEX)``.
  """
  from fcp_jax import config_lib  # pylint: disable=g-import-not-at-top
  target, event, index, *rest = argv
  module, _, fn = target.partition(":")
  run = getattr(importlib.import_module(module), fn)
  config_lib.driver_main(rest, functools.partial(
      run, callbacks=[kill_at(event, int(index))]))


if __name__ == "__main__":
  main(sys.argv[1:])

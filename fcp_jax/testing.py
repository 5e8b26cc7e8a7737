"""Helpers shared by tests and colabs: tiny models and tokenizers built in-process."""

from typing import Tuple

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

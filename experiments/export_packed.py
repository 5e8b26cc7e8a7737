r"""Exports a trained ternary checkpoint to the packed TQ2 format and prints its size.

    python experiments/export_packed.py --workdir DIR [--out FILE] [--params FILE] \
        [--variant tiny] [--model.weight_quant=absmean ...]

The model config comes from ``DIR/config.json`` (its ``model`` section: an optional
``variant`` plus TransformerConfig fields), else from ``--variant``; ``--model.k=v``
overrides either. Params come from ``--params`` (.safetensors with "/"-joined keys, or
flax .msgpack), else ``DIR/params.safetensors``, else the latest orbax checkpoint under
``DIR/checkpoints`` (``fcp_jax.training.checkpoint.restore_params``). The packed file lands
in ``--out`` (default ``DIR/packed/model.tq2.safetensors``) and runs with
``Transformer(cfg).apply({"params": packing.load_packed(path)[0]}, tokens)``.
"""

import argparse
import ast
import json
import os
import sys
from typing import Any, Dict, Optional, Sequence

from flax import serialization
import flax.linen as nn
import jax
import jax.numpy as jnp
from safetensors import numpy as st_numpy

from fcp_jax.models import packing
from fcp_jax.models import transformer


def save_params(params: Any, path: str) -> None:
  """Writes a (boxed or plain) params tree as safetensors with "/"-joined keys."""
  st_numpy.save_file(packing.flatten_tree(nn.unbox(params)), path)


def load_params(workdir: str, cfg: transformer.TransformerConfig,
                params_file: Optional[str] = None) -> Dict[str, Any]:
  """The latent params tree of a run.

  ``params_file`` (.safetensors with "/"-joined keys, or flax .msgpack), else
  ``workdir/params.safetensors``, else the latest orbax checkpoint of ``workdir`` through
  ``fcp_jax.training.checkpoint.restore_params`` (unboxed params of ``cfg``'s shapes).
  """
  path = params_file or os.path.join(workdir, "params.safetensors")
  if os.path.exists(path):
    if path.endswith(".msgpack"):
      with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())
    return packing.unflatten_tree(st_numpy.load_file(path))
  if params_file:
    raise FileNotFoundError(f"--params {params_file!r} does not exist.")
  from fcp_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  model = transformer.Transformer(cfg)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]))
  try:
    return checkpoint.restore_params(workdir, abstract)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"No params at {path!r} and no checkpoint in {workdir!r} "
                            f"({e}); pass --params FILE (.safetensors or .msgpack).") from None


def load_model_config(workdir: str, variant: Optional[str],
                      overrides: Dict[str, Any]) -> transformer.TransformerConfig:
  """TransformerConfig of ``workdir/config.json``'s ``model`` section (``variant`` plus
  field overrides; None keeps the variant's value), else of ``variant``."""
  fields = {}
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      fields = {k: v for k, v in json.load(f).get("model", {}).items() if v is not None}
  variant = fields.pop("variant", None) or variant
  if variant is None:
    raise ValueError(f"No model variant: {path!r} has no model.variant; pass --variant.")
  return transformer.get_variant(variant, **{**fields, **overrides})


def export(params: Any, cfg: transformer.TransformerConfig, out: str) -> Dict[str, float]:
  """Packs ``params`` into ``out``; returns the sizes."""
  packed = packing.pack_params(params, cfg)
  file_bytes = packing.save_packed(out, packed, cfg)
  return {"bytes_before": packing.tree_nbytes(nn.unbox(params)),
          "bytes_after": file_bytes,
          "bits_per_weight": packing.bits_per_weight(packed, cfg)}


def _parse(argv: Sequence[str]):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None)
  parser.add_argument("--params", default=None)
  parser.add_argument("--variant", default=None)
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for item in rest:
    key, eq, value = item.partition("=")
    if not key.startswith("--model.") or not eq:
      parser.error(f"Unknown argument {item!r}; model overrides look like --model.k=v.")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # A plain string such as absmean.
    overrides[key[len("--model."):]] = value
  return args, overrides


def main(argv: Sequence[str]) -> Dict[str, float]:
  args, overrides = _parse(argv)
  cfg = load_model_config(args.workdir, args.variant, overrides)
  params = load_params(args.workdir, cfg, args.params)
  out = args.out or os.path.join(args.workdir, "packed", "model.tq2.safetensors")
  stats = export(params, cfg, out)
  print(f"wrote {out}")
  print(f"bytes before (float32 latent params): {stats['bytes_before']:,}")
  print(f"bytes after (packed file):            {stats['bytes_after']:,} "
        f"({stats['bytes_before'] / stats['bytes_after']:.2f}x smaller)")
  print(f"bits per quantized weight (codes + scales): {stats['bits_per_weight']:.3f}")
  return stats


if __name__ == "__main__":
  main(sys.argv[1:])

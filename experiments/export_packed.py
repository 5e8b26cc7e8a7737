r"""Exports a trained ternary checkpoint to the packed TQ2 format and prints its size.

    python experiments/export_packed.py --workdir DIR [--out FILE] [--params FILE] \
        [--variant tiny] [--model.weight_quant=absmean ...]

The model config comes from ``DIR/config.json`` (its ``model`` section: an optional
``variant`` plus TransformerConfig fields), else from ``--variant``; ``--model.k=v``
overrides either. Params come from ``--params`` (.safetensors with "/"-joined keys, or
flax .msgpack), else ``DIR/params.safetensors``, else the latest orbax checkpoint under
``DIR/checkpoints`` (``packing.load_params``). The packed file lands
in ``--out`` (default ``DIR/packed/model.tq2.safetensors``) and runs with
``Transformer(cfg).apply({"params": packing.load_packed(path)[0]}, tokens)``.
"""

import argparse
import os
import sys
from typing import Any, Dict, Sequence

import flax.linen as nn

from fcp_jax.models import packing
from fcp_jax.models import transformer


# The run readers live in the library (shared with experiments/export_gguf.py).
save_params = packing.save_params
load_params = packing.load_params
load_model_config = packing.load_model_config


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
  try:
    return args, packing.parse_model_overrides(rest)
  except ValueError as e:
    parser.error(str(e))


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

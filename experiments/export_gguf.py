r"""Exports a trained ternary run to a GGUF file for llama.cpp and prints its size.

    python experiments/export_gguf.py --workdir DIR [--out FILE] [--params FILE] \
        [--variant small] [--tokenizer char|PATH] [--type tq2_0|tq1_0] \
        [--float_type f16|f32] [--context_length 2048] [--model.weight_quant=absmean ...]

Config and params are read as ``experiments/export_packed.py`` reads them
(``packing.load_model_config``, ``packing.load_params``). The tokenizer is
``--tokenizer``, else the ``tokenizer`` of ``DIR/config.json`` ("char", or a
``tokenizer.json`` or a folder holding one). The file (``fcp_jax.models.gguf_export``)
lands in ``--out`` (default ``DIR/gguf/model.<type>.gguf``) and runs with
``llama-cli -m FILE``; the ternary tensors take 2.0625 bits per weight as TQ2_0 and
1.6875 as TQ1_0.
"""

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from fcp_jax import policy
from fcp_jax.models import gguf_export
from fcp_jax.models import packing


def tokenizer_spec(workdir: str, spec: Optional[str]) -> str:
  """``spec``, else the ``tokenizer`` of ``workdir/config.json``."""
  if spec:
    return spec
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      spec = json.load(f).get("tokenizer")
  if not spec:
    raise ValueError(f"No tokenizer: {path!r} names none; pass --tokenizer char|PATH.")
  return spec


def _parse(argv: Sequence[str]):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None)
  parser.add_argument("--params", default=None)
  parser.add_argument("--variant", default=None)
  parser.add_argument("--tokenizer", default=None)
  parser.add_argument("--type", default="tq2_0", choices=sorted(gguf_export.TERNARY_TYPES))
  parser.add_argument("--float_type", default="f16",
                      choices=sorted(gguf_export.FLOAT_TYPES))
  parser.add_argument("--context_length", type=int, default=2048)
  args, rest = parser.parse_known_args(argv)
  try:
    return args, packing.parse_model_overrides(rest)
  except ValueError as e:
    parser.error(str(e))


def main(argv: Sequence[str]) -> gguf_export.GGUFExport:
  args, overrides = _parse(argv)
  cfg = packing.load_model_config(args.workdir, args.variant, overrides)
  params = packing.load_params(args.workdir, cfg, args.params)
  tok = policy.build_tokenizer(tokenizer_spec(args.workdir, args.tokenizer))
  out = args.out or os.path.join(args.workdir, "gguf", f"model.{args.type}.gguf")
  info = gguf_export.export_gguf(out, cfg, params, tok, ternary_type=args.type,
                                 float_type=args.float_type,
                                 context_length=args.context_length)
  print(f"wrote {out} (llama.cpp architecture {info.arch!r})")
  print(f"file size: {info.file_bytes:,} bytes ({info.file_bytes / 2**20:.2f} MiB)")
  if info.ternary_tensors:
    print(f"ternary tensors: {info.ternary_tensors} {info.ternary_type}, "
          f"{info.ternary_weights:,} weights, {info.bits_per_weight:.4f} bits/weight "
          "(TQ1_0 ≈ 1.69, TQ2_0 = 2.06)")
  else:
    print("no ternary tensors (weight_quant='none'): every kernel is float")
  return info


if __name__ == "__main__":
  main(sys.argv[1:])

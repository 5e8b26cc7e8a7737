"""Bytes each replica sends per train step: float gradients vs TernGrad.

    python experiments/benchmarks/terngrad_bytes.py [--variant small] [--min_size 1024]
        [--hlo]

Counts from the parameter shapes: float32 bytes of every gradient, against int8 codes
of the tensors TernGrad compresses + one float32 scale each + float32 bytes of the small
tensors it leaves in float. With ``--hlo`` it also compiles the ``mesh`` train step on
8 fake CPU devices, both ways, and sums the operand bytes of its all-reduces by dtype.
"""

import argparse
import os
import re
from collections import Counter

DTYPE_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "s8": 1, "u32": 4, "pred": 1}


def payload_bytes(variant: str, min_size: int):
  """(float bytes, TernGrad bytes, compressed tensors, all tensors) of one gradient."""
  import jax  # pylint: disable=g-import-not-at-top
  from fcp_jax.training import grad_compression  # pylint: disable=g-import-not-at-top
  from fcp_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  model, _ = state_lib.build_model({"variant": variant})
  tokens = jax.ShapeDtypeStruct((1, 8), jax.numpy.int32)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
  tg = grad_compression.TernGrad(min_size=min_size)
  leaves = jax.tree.leaves(params)
  small = [x.size for x in leaves if not tg.compresses(x)]
  big = [x.size for x in leaves if tg.compresses(x)]
  return 4 * sum(x.size for x in leaves), sum(big) + 4 * len(big) + 4 * sum(small), \
      len(big), len(leaves)


def hlo_all_reduce_bytes(variant: str, spec: str) -> Counter:
  """Operand bytes of the all-reduces in the compiled mesh train step, by dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fcp_jax.training import sharding, step  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      model={"variant": variant}, loss="nll", grad_compression=spec,
      optim=dict(lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0,
                 clip_norm=0.0, b1=0.9, b2=0.95)))
  par = sharding.build({"mode": "mesh", "mesh_shape": (-1, 1, 1)})
  tr = step.build_training(config, par, total_steps=1)
  dtypes = dict(tokens="int32", positions="int32", segment_ids="int32",
                loss_mask="float32")
  batch = {k: jax.ShapeDtypeStruct((8, 64), d, sharding=par.batch_sharding)
           for k, d in dtypes.items()}  # [B, T]
  with par.context():
    text = tr.train_step.jitted.lower(tr.abstract_state, batch).compile().as_text()
  out = Counter()
  for line in text.splitlines():
    if " all-reduce(" in line or " all-reduce-start(" in line:
      result = line.split("=", 1)[1].split("all-reduce")[0]
      for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result):
        n = 1
        for d in filter(None, dims.split(",")):
          n *= int(d)
        out[dtype] += n * DTYPE_BYTES.get(dtype, 4)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--min_size", type=int, default=1024)
  parser.add_argument("--hlo", action="store_true")
  args = parser.parse_args()
  if args.hlo:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  float_b, tern_b, n_big, n_all = payload_bytes(args.variant, args.min_size)
  print(f"variant={args.variant}: {n_big} of {n_all} gradient tensors compressed "
        f"(min_size={args.min_size})")
  print(f"float32 gradients : {float_b:>10,d} bytes/step per replica")
  print(f"TernGrad          : {tern_b:>10,d} bytes/step per replica "
        f"({float_b / tern_b:.2f}x less)")
  if args.hlo:
    for spec in ("none", f"terngrad(min_size={args.min_size})"):
      counts = hlo_all_reduce_bytes(args.variant, spec)
      print(f"compiled mesh step, {spec}: all-reduce operand bytes "
            f"{dict(counts)} (total {sum(counts.values()):,d})")


if __name__ == "__main__":
  main()

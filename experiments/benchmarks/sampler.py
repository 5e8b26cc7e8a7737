"""Benchmark: decoding speed of the jitted sampler (prefill + ``while_loop`` decode).

    python experiments/benchmarks/sampler.py [--variant small] [--dim 128] [--layers 4]
        [--batch 200] [--prompt 64] [--new 40] [--modes float,ternary] [--repeats 3]
        [--scan] [--layouts one,rows]

For each mode it builds the model (random init), compiles ``Sampler.sample`` for one
shape, then times ``--repeats`` calls of ``--batch`` prompts of ``--prompt`` tokens
with ``--new`` generated tokens at temperature 1 (a random model rarely emits the end
token, so every call runs all ``--new`` decoding steps). It prints the compile time,
the median time per call and per decoding step, and generated tokens/s. The cache is
``prompt + new`` slots; ``--scan`` uses the stacked-layer (``nn.scan``) model, whose
cache is one [L, B, K, S, H] array instead of one buffer per layer. ``--layouts``:
``one`` samples on one device; ``rows`` splits the rows over every device (the
``sample_sharding`` of a ``(-1, 1, 1)`` mesh, params replicated), as the pipeline
samples on a multi-device host; each layout is a row of the same run.
"""

import argparse
import time

import flax.linen as nn
import jax
import numpy as np

from fcp_jax import host
from fcp_jax.models import transformer
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib
from train_step import MODES  # pylint: disable=g-bad-import-order  (this folder's)


def bench_mode(mode: str, layout: str, args):
  overrides = dict(MODES[mode], scan_layers=args.scan)
  if args.dim:
    overrides.update(embed_dim=args.dim, mlp_dim=3 * args.dim)
  if args.layers:
    overrides.update(num_layers=args.layers)
  model, cfg = state_lib.build_model({"variant": args.variant, **overrides})
  params = nn.unbox(state_lib.init_boxed_params(model, jax.random.PRNGKey(0)))
  par = None
  if layout == "rows":
    par = sharding.build({"mode": "mesh", "mesh_shape": (-1, 1, 1)})
    params = jax.device_put(params, par.shardings(state_lib.param_logical_specs(model)))
  elif layout != "one":
    raise ValueError(f"Unknown layout {layout!r}; use 'one' or 'rows'.")
  sampler = sampler_lib.Sampler(model, end_ids=(cfg.vocab_size - 1,), pad_id=0,
                                prompt_bucket=args.prompt, parallel=par)
  prompts = np.random.RandomState(0).randint(1, cfg.vocab_size - 1,
                                             (args.batch, args.prompt)).tolist()

  def call(seed):
    t = time.perf_counter()
    out = sampler.sample(params, prompts, jax.random.PRNGKey(seed),
                         max_new_tokens=args.new, method="temperature(t=1.0)")
    return time.perf_counter() - t, out

  compile_s, _ = call(0)
  times, steps = [], []
  for r in range(args.repeats):
    dt, out = call(r + 1)
    times.append(dt)
    steps.append(int(out.lengths.max()))
  call_s = float(np.median(times))
  return dict(params=transformer.count_params(params), compile_s=compile_s,
              call_s=call_s, step_ms=1e3 * call_s / max(np.median(steps), 1),
              tokens_per_s=args.batch * float(np.median(steps)) / call_s)


def main():
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--dim", type=int, default=128, help="0 keeps the variant's")
  parser.add_argument("--layers", type=int, default=0, help="0 keeps the variant's")
  parser.add_argument("--batch", type=int, default=200)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=40)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--modes", default="float,ternary")
  parser.add_argument("--scan", action="store_true")
  parser.add_argument("--layouts", default="one")
  args = parser.parse_args()

  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; variant "
        f"{args.variant} (dim {args.dim or 'default'}, scan {args.scan}); {args.batch} "
        f"prompts x {args.prompt} tokens, {args.new} new tokens")
  print(f"{'mode':8s} {'layout':6s} {'params':>9s} {'compile s':>9s} {'call s':>7s} "
        f"{'ms/step':>8s} {'new tok/s':>10s}")
  for mode in args.modes.split(","):
    for layout in args.layouts.split(","):
      r = bench_mode(mode.strip(), layout.strip(), args)
      print(f"{mode:8s} {layout:6s} {r['params']:9,d} {r['compile_s']:9.1f} "
            f"{r['call_s']:7.2f} {r['step_ms']:8.1f} {r['tokens_per_s']:10,.0f}")


if __name__ == "__main__":
  main()

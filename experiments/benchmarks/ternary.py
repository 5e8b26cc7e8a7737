"""Benchmark: ternary QAT step cost, packed storage and packed-inference speed.

    python experiments/benchmarks/ternary.py [--variant small] [--batch 32] [--seq 96]
        [--steps 8] [--methods absmean,absmean+absmax_int8,...] [--skip_train]

Prints three tables:

1. Train step time of ``--variant`` in float32 and with each ternary method (λ = 1):
   a local jitted AdamW step (value_and_grad of the next-token NLL on random tokens),
   median and best of ``--steps`` timed steps after a warm-up, and the ratio to float.
   The float baseline is timed before and after the methods; the ratio uses the best of
   its two medians (the machine is shared, so the noise is printed too).
2. Packed storage: bits per quantized weight (codes + scales + shifts/biases) and the
   bytes of the whole packed model against its float32 params.
3. Forward time of the fake-quantized model (float matmuls on dequantized weights)
   and of the packed model (int8 × ternary codes → int32) at batch 1 and ``--batch``.
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fcp_jax import host
from fcp_jax.models import packing
from fcp_jax.models import transformer

METHODS = {
    "absmean": ("absmean", "none"),
    "absmean+absmax_int8": ("absmean", "absmax_int8"),
    "absmean_median_channel": ("absmean(granularity='channel', stat='median')", "none"),
    "twn": ("twn", "none"),
    "tbt": ("tbt", "none"),
    "seq": ("seq", "none"),
    "seq_paretoq": ("seq(grad='paretoq')", "none"),
    "dlt": ("dlt", "none"),
    "tequila": ("tequila", "none"),
    "absmean+elastic": ("absmean", "elastic"),
}


def time_fn(fn: Callable[[], object], steps: int) -> Tuple[float, float]:
  """(median, best) seconds of ``fn`` (blocked until ready) after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times), min(times)


def make_train_step(cfg: transformer.TransformerConfig, tokens: jax.Array):
  """(params, opt_state, step fn) of a minimal AdamW train step for ``cfg``."""
  model = transformer.Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1)
  opt_state = tx.init(params)

  def loss_fn(p, batch):
    logits, _ = model.apply({"params": p}, batch, qlambda=1.0)  # [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], batch[:, 1:]).mean()

  @jax.jit
  def step(p, o, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  return params, opt_state, step


def bench_train(variant: str, methods: List[str], batch: int, seq: int,
                steps: int) -> None:
  tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0,
                              transformer.get_variant(variant).vocab_size)

  def run(wq: str, aq: str) -> Tuple[float, float]:
    cfg = transformer.get_variant(variant, weight_quant=wq, act_quant=aq)
    params, opt_state, step = make_train_step(cfg, tokens)
    return time_fn(lambda: step(params, opt_state, tokens), steps)

  print(f"\n== train step, {variant}, batch {batch} x {seq} tokens, "
        f"{steps} timed steps ==")
  print(f"{'method':26s} {'median ms':>10s} {'best ms':>9s} {'ratio':>7s}")
  float_runs = [run("none", "none")]
  rows = [(m, run(*METHODS[m])) for m in methods]
  float_runs.append(run("none", "none"))
  base = min(r[0] for r in float_runs)
  for i, (med, best) in enumerate(float_runs):
    print(f"{'float32 (run %d)' % (i + 1):26s} {med * 1e3:10.1f} {best * 1e3:9.1f} "
          f"{med / base:7.3f}")
  for name, (med, best) in rows:
    print(f"{name:26s} {med * 1e3:10.1f} {best * 1e3:9.1f} {med / base:7.3f}")


def bench_storage_and_inference(variant: str, methods: List[str], batch: int, seq: int,
                                steps: int) -> None:
  print(f"\n== packed storage and forward time, {variant}, seq {seq} ==")
  print(f"{'method':26s} {'bits/w':>7s} {'f32 MB':>7s} {'packed MB':>9s} "
        f"{'fake b1 ms':>10s} {'packed b1':>9s} {'fake b%d' % batch:>9s} "
        f"{'packed b%d' % batch:>10s}")
  for name in methods:
    wq, aq = METHODS[name]
    cfg = transformer.get_variant(variant, weight_quant=wq, act_quant=aq)
    model = transformer.Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    packed = jax.tree.map(jnp.asarray, packing.pack_params(params, cfg))
    bits = packing.bits_per_weight(packed, cfg)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])
    times = {}
    for b in (1, batch):
      for kind, p in (("fake", params), ("packed", packed)):
        times[kind, b] = time_fn(lambda p=p, b=b: apply(p, tokens[:b]), steps)[0]
    f32_mb = packing.tree_nbytes(jax.device_get(params)) / 2**20
    packed_mb = packing.tree_nbytes(jax.device_get(packed)) / 2**20
    print(f"{name:26s} {bits:7.3f} {f32_mb:7.2f} {packed_mb:9.2f} "
          f"{times['fake', 1] * 1e3:10.2f} {times['packed', 1] * 1e3:9.2f} "
          f"{times['fake', batch] * 1e3:9.1f} {times['packed', batch] * 1e3:10.1f}")


def main() -> None:
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=96)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--skip_train", action="store_true")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"Unknown methods {unknown}; options: {sorted(METHODS)}.")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}")
  if not args.skip_train:
    bench_train(args.variant, methods, args.batch, args.seq, args.steps)
  bench_storage_and_inference(args.variant, methods, args.batch, args.seq, args.steps)


if __name__ == "__main__":
  main()

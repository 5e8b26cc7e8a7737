"""Benchmark: ternary QAT step cost, packed storage and packed-inference speed.

    python experiments/benchmarks/ternary.py [--variant small] [--batch 32] [--seq 96]
        [--steps 8] [--methods absmean,absmean+absmax_int8,...] [--skip_train]
        [--forms float,fake,packed,prepared]

Prints two tables:

1. Train step time of ``--variant`` in float32 and with each ternary method (λ = 1):
   a local jitted AdamW step (value_and_grad of the next-token NLL on random tokens),
   median and best of ``--steps`` timed steps after a warm-up, and the ratio to float.
   The float baseline is timed before and after the methods; the ratio uses the best of
   its two medians (the machine is shared, so the noise is printed too).
2. Storage and decoding, for each method and each of ``--forms``: ``float`` (the same
   variant with weight_quant="none", holding the latent weights), ``fake`` (latent
   weights, quantized at every call), ``packed`` (TQ2, unpacked at every call) and
   ``prepared`` (``packing.prepare_for_inference``): bits per quantized weight (codes +
   scales + shifts/biases; GGUF TQ1_0's and TQ2_0's printed for reference), the model's
   MB, and the time of one decode step (one token per row on a KV cache of ``--seq``
   tokens, the cache donated: what the sampler does per generated token) at batch 1
   and ``--batch``. A method's forms are timed in turn, one call each per round, for
   ``--steps`` rounds after a warm-up, so load on the machine hits them alike; medians
   and the ratio to float. These models run in float32 (``dtype`` / ``param_dtype``
   overridden).
"""

import argparse
import functools
import statistics
import time
from typing import Callable, Dict, List, Tuple

import flax.linen as nn
import gguf
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


FORMS = ("float", "fake", "packed", "prepared")
F32 = dict(dtype="float32", param_dtype="float32")


def gguf_bits(name: str) -> float:
  """Bits per weight of a GGUF ternary type ("TQ1_0", "TQ2_0")."""
  block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
  return 8 * nbytes / block


def take_like(tree, like):
  """The leaves of ``tree`` at the paths of ``like`` (same shapes), or None if one is
  missing: a float model's params taken from a latent ternary tree."""
  if not hasattr(like, "items"):
    return tree if getattr(tree, "shape", None) == like.shape else None
  if not hasattr(tree, "items"):
    return None
  out = {k: take_like(tree.get(k), v) for k, v in like.items()}
  return None if any(v is None for v in out.values()) else out


def share_leaves(tree, like):
  """``tree`` with every leaf that ``like`` holds at the same path and shape taken from
  ``like`` (the float embeddings and norms of a packed tree: one copy in memory)."""
  if not hasattr(tree, "items"):
    same = hasattr(like, "shape") and np.shape(tree) == like.shape and (
        np.asarray(tree).dtype == like.dtype)
    return like if same else jnp.asarray(tree)
  return {k: share_leaves(v, like.get(k) if hasattr(like, "get") else None)
          for k, v in tree.items()}


def decode_steps(cfg: transformer.TransformerConfig, batch: int, seq: int, slots: int):
  """(step, cache): ``step(params, cache) -> (logits [B, V], cache)`` decodes one token
  per row, the cache donated; ``cache()`` is a fresh cache holding ``seq`` tokens with
  room for ``slots`` more."""
  model = transformer.Transformer(cfg)
  tokens = jnp.full((batch, 1), 7, jnp.int32)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(params, cache):
    logits, cache = model.apply({"params": params}, tokens, cache=cache)
    return logits[:, -1], cache

  def cache():
    c = transformer.init_cache(cfg, batch, seq + slots)
    return {**c, "segment_ids": c["segment_ids"].at[:, :seq].set(1),
            "index": jnp.asarray(seq, jnp.int32)}

  return step, cache


def time_alternating(fns: Dict[str, Callable[[], object]],
                     steps: int) -> Dict[str, float]:
  """Median seconds of each ``fn`` over ``steps`` rounds of one call each, in turn."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(steps):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(t) for name, t in times.items()}


def bench_storage_and_inference(variant: str, methods: List[str], batch: int, seq: int,
                                steps: int, forms: List[str]) -> None:
  float_cfg = transformer.get_variant(variant, **F32)
  tokens = jnp.zeros((1, 1), jnp.int32)
  init = lambda cfg: nn.unbox(jax.jit(transformer.Transformer(cfg).init)(
      jax.random.key(0), tokens)["params"])
  float_shapes = jax.eval_shape(lambda: init(float_cfg))
  mb = lambda tree: packing.tree_nbytes(tree) / 2**20
  print(f"\n== storage and one decode step, {variant}, KV cache of {seq} tokens, median "
        f"of {steps} alternated rounds ==")
  print(f"bits/weight of the ternary kernels: TQ2 and prepared below; GGUF TQ1_0 "
        f"{gguf_bits('TQ1_0'):.4f} and TQ2_0 {gguf_bits('TQ2_0'):.4f} for reference")
  print(f"{'method':26s} {'form':9s} {'bits/w':>7s} {'MB':>8s} {'b1 ms':>9s} {'ratio':>6s} "
        f"{'b%d ms' % batch:>9s} {'ratio':>6s}")
  for name in methods:
    wq, aq = METHODS[name]
    cfg = transformer.get_variant(variant, weight_quant=wq, act_quant=aq, **F32)
    latent = init(cfg)
    # The float model holds the latent weights (one copy), unless their trees differ.
    float_params = take_like(latent, float_shapes) or init(float_cfg)
    packed = packing.pack_params(latent, cfg)
    prepared = packing.prepare_for_inference(packed, cfg)
    storage = {"float": (32.0, mb(float_params)), "fake": (32.0, mb(latent)),
               "packed": (packing.bits_per_weight(packed, cfg), mb(packed)),
               "prepared": (packing.bits_per_weight(prepared, cfg), mb(prepared))}
    params = {"float": float_params, "fake": latent,
              "packed": share_leaves(packed, latent) if "packed" in forms else None,
              "prepared": share_leaves(prepared, latent)}
    del packed, prepared
    cols = {}
    for b in (1, batch):
      fns = {}
      for form in forms:
        step, cache = decode_steps(float_cfg if form == "float" else cfg, b, seq,
                                   steps + 2)
        state = {"cache": cache()}

        def call(step=step, p=params[form], state=state):
          logits, state["cache"] = step(p, state["cache"])
          return logits

        fns[form] = call
      cols[b] = time_alternating(fns, steps)
      del fns
    for form in forms:
      row = "".join(f" {cols[b][form] * 1e3:9.2f} {cols[b][form] / cols[b]['float']:6.2f}"
                    for b in (1, batch))
      bits, size = storage[form]
      print(f"{name:26s} {form:9s} {bits:7.3f} {size:8.1f}{row}", flush=True)
    del params, latent


def main() -> None:
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=96)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--skip_train", action="store_true")
  parser.add_argument("--forms", default=",".join(FORMS),
                      help="rows of table 2 (float is always timed)")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"Unknown methods {unknown}; options: {sorted(METHODS)}.")
  forms = ["float"] + [f for f in args.forms.split(",") if f != "float"]
  if set(forms) - set(FORMS):
    parser.error(f"Unknown forms {sorted(set(forms) - set(FORMS))}; options: {FORMS}.")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}")
  if not args.skip_train:
    bench_train(args.variant, methods, args.batch, args.seq, args.steps)
  bench_storage_and_inference(args.variant, methods, args.batch, args.seq, args.steps,
                              forms)


if __name__ == "__main__":
  main()

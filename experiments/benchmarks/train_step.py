"""Benchmark: tokens/s and FLOP utilisation of the offline train step (float, ternary).

    python experiments/benchmarks/train_step.py [--variant small] [--batch 32] [--seq 96]
        [--steps 10] [--modes float,ternary] [--peak_tflops X]
    python experiments/benchmarks/train_step.py --variant 1b --batch 8 --seq 2048 \
        --modes float   # on an accelerator: MFU of the bf16, remat 1b variant

For each mode it compiles the real train step (``training/step.py`` under the ``mesh``
strategy of ``training/sharding.py``, AdamW, token-mean NLL on a synthetic batch with a
response-only loss mask), times ``--steps`` updates one by one after a warm-up update, and
prints the median and best step time, tokens/s (all positions, padding included) and FLOP/s. FLOPs per step come from
XLA's ``cost_analysis`` of the compiled step, next to the ``6 * N * tokens`` estimate;
utilisation is the step's FLOP/s over the FLOP/s of a large jitted float32 matmul
measured in the same process. MFU is the step's FLOP/s over the devices' nominal dense
peak: ``--peak_tflops`` per device, else ``PEAK_TFLOPS`` by device kind (bf16 peaks of
common accelerators; none for CPUs, whose row shows the matmul share only). The ternary
mode uses ``weight_quant="absmean"``, ``act_quant="absmax_int8"`` at λ = 1 (fake quantization: float matmuls plus the
quantizer work, so it is expected to be slower than float on CPU). It also prints
XLA's scratch buffer per call and the host's minor page faults per step: with
``FCP_JAX_MALLOC=system`` (glibc's defaults, see ``fcp_jax/host.py``) a scratch buffer
over 64 MB is mapped afresh, and faulted in page by page, on every step.
"""

import argparse
import os
import resource
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fcp_jax import host
from fcp_jax.models import transformer
from fcp_jax.training import losses
from fcp_jax.training import optim
from fcp_jax.training import sharding
from fcp_jax.training import state as state_lib
from fcp_jax.training import step as step_lib

MODES = {
    "float": dict(weight_quant="none", act_quant="none"),
    "ternary": dict(weight_quant="absmean", act_quant="absmax_int8"),
}


# Nominal dense bf16 TFLOP/s per device, by ``jax.Device.device_kind`` prefix.
PEAK_TFLOPS = {
    "NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA H20": 148.0,
    "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def device_peak_flops(override_tflops: Optional[float] = None) -> Optional[float]:
  """FLOP/s of all devices together: ``override_tflops`` or ``PEAK_TFLOPS``, or None."""
  kind = jax.devices()[0].device_kind
  tflops = override_tflops or next(
      (v for k, v in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0]))
       if kind.startswith(k)), None)
  return None if tflops is None else tflops * 1e12 * jax.device_count()


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> Dict[str, np.ndarray]:
  """Random tokens; the second half of every row is the response (loss) part."""
  rs = np.random.RandomState(seed)
  return dict(tokens=rs.randint(0, vocab, (batch, seq)).astype(np.int32),
              positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
              segment_ids=np.ones((batch, seq), np.int32),
              loss_mask=(np.arange(seq)[None] >= seq // 2).repeat(batch, 0).astype(
                  np.float32))


def xla_flops(compiled) -> Optional[float]:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and "flops" in cost else None


def matmul_peak(n: int = 1024, repeats: int = 20) -> float:
  """FLOP/s of a jitted n x n float32 matmul (best of ``repeats``)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def build_step(model_config: Dict[str, Any], batch: int, seq: int):
  """The real train step of ``model_config`` (``state_lib.build_model``'s argument).

  AdamW (lr 1e-3, constant, weight decay 0.1 on kernels, clipping at norm 1), the FCP
  loss (token-mean NLL over the loss mask), the ``mesh`` strategy on all devices, and a
  ``synthetic_batch`` of ``batch`` x ``seq``. Returns ``(train_step, state, batch, par,
  model_cfg)``; ``train_step.jitted`` is the ``jax.jit`` object (for ``lower``).
  """
  model, model_cfg = state_lib.build_model(model_config)
  opt = optim.make_optimizer(ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="constant", weight_decay=0.1, clip_norm=1.0)),
                             total_steps=1000, model_cfg=model_cfg)
  loss = losses.build("fcp")
  par = sharding.build({"mode": "mesh", "mesh_shape": (-1, 1, 1)})
  specs = state_lib.state_logical_specs(model, opt.tx)
  state = par.create_state(state_lib.make_init_fn(model, opt.tx), jax.random.PRNGKey(0),
                           specs)
  qlambda_fn = step_lib.make_qlambda_fn(model_cfg, {})  # λ = 1 from step 0.
  train_step = par.jit_train_step(step_lib.make_train_step(
      model, loss, opt, qlambda_fn=qlambda_fn, axis_name=par.axis_name), specs)
  batch = par.put_batch(synthetic_batch(batch, seq, model_cfg.vocab_size))
  return train_step, state, batch, par, model_cfg


def bench_mode(mode: str, args) -> Optional[Dict[str, float]]:
  if mode == "ternary":
    try:
      from fcp_jax.models import ternary  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError as e:
      print(f"ternary: skipped ({e}).")
      return None
  train_step, state, batch, par, _ = build_step({"variant": args.variant, **MODES[mode]},
                                                 args.batch, args.seq)

  t = time.perf_counter()
  with par.context():
    compiled = train_step.jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  flops = xla_flops(compiled)
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  state, m = train_step(state, batch)  # Warm-up.
  jax.block_until_ready(m)
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = train_step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  n_params = transformer.count_params(state.params)
  tokens = args.batch * args.seq
  return dict(params=n_params, compile_s=compile_s, step_s=float(np.median(times)),
              best_s=min(times), xla_flops=flops or float("nan"),
              est_flops=6.0 * n_params * tokens, loss=float(m["loss"]),
              temp_mb=temp_bytes / 2**20, faults=faults / args.steps)


def main():
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="small")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=96)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--modes", default="float,ternary")
  parser.add_argument("--matmul", type=int, default=1024)
  parser.add_argument("--peak_tflops", type=float, default=None,
                      help="nominal peak per device for MFU (default: PEAK_TFLOPS)")
  args = parser.parse_args()

  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; variant "
        f"{args.variant}; batch {args.batch} x {args.seq} tokens; {args.steps} steps; "
        f"malloc {os.environ.get(host.ENV, 'tuned')} ({host.ENV})")
  peak = matmul_peak(args.matmul)
  print(f"jitted {args.matmul}^2 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
  device_peak = device_peak_flops(args.peak_tflops)
  print(f"device: {jax.devices()[0].device_kind}; nominal peak "
        + (f"{device_peak / 1e12:.0f} TFLOP/s in all" if device_peak else
           "unknown (MFU not shown; --peak_tflops sets it)"))
  header = (f"{'mode':8s} {'params':>9s} {'compile s':>9s} {'median ms':>9s} "
            f"{'best ms':>8s} {'tokens/s':>9s} {'XLA GFLOP/step':>14s} "
            f"{'6N GFLOP/step':>13s} {'GFLOP/s':>8s} {'of matmul':>9s} "
            f"{'MFU':>6s} {'scratch MB':>10s} {'faults/step':>11s}")
  rows = []
  for mode in args.modes.split(","):
    r = bench_mode(mode.strip(), args)
    if r is None:
      continue
    flops = r["xla_flops"] if np.isfinite(r["xla_flops"]) else r["est_flops"]
    rate = flops / r["step_s"]
    rows.append(f"{mode:8s} {r['params']:9,d} {r['compile_s']:9.1f} "
                f"{1e3 * r['step_s']:9.1f} {1e3 * r['best_s']:8.1f} "
                f"{args.batch * args.seq / r['step_s']:9,.0f} "
                f"{r['xla_flops'] / 1e9:14.2f} {r['est_flops'] / 1e9:13.2f} "
                f"{rate / 1e9:8.1f} {rate / peak:9.1%} "
                f"{(f'{rate / device_peak:.1%}' if device_peak else '-'):>6s} "
                f"{r['temp_mb']:10.1f} "
                f"{r['faults']:11,.0f}")
  print(header)
  print("\n".join(rows))
  print("tokens/s and GFLOP/s use the median step time; the matmul figure is its best "
        "of 20 runs. On a shared machine rerun when it is idle (see `uptime`).")


if __name__ == "__main__":
  main()

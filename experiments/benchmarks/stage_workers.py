"""Benchmark: what a second process on the same cores adds (the case for stage workers).

    python experiments/benchmarks/stage_workers.py [--dim 128] [--layers 4] [--batch 12]
        [--seq 128] [--steps 30] [--sample_batch 200] [--new 48] [--repeats 4]

Runs the same work in one process alone, then in two processes at once, and prints per
workload: the time per call in each case, the process CPU time over wall time alone
(how many cores one process keeps busy), and the throughput of two processes over one
(``2 * alone / together``). Workloads, on the demo's shape (ternary, SubLN): the train
step (``train_step.build_step``), greedy sampling and T=1 sampling
(``sampling/sampler.py``, a random model, so every call runs all ``--new`` steps).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WORKLOADS = ("train", "greedy", "t1")


def _cpu() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def child(args) -> dict:
  """Times each workload in this process; returns {workload: (s per call, cores)}."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from fcp_jax import host  # pylint: disable=g-import-not-at-top
  host.tune_malloc()
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fcp_jax.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from fcp_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top  (this folder's)

  model_config = dict(variant="small", embed_dim=args.dim, mlp_dim=3 * args.dim,
                      num_heads=max(args.dim // 64, 2), num_kv_heads=max(args.dim // 128, 1),
                      head_dim=min(64, args.dim // 2), num_layers=args.layers,
                      subln=True, **train_step.MODES["ternary"])

  def timed(call, n):
    call()  # Compile.
    wall, cpu = time.perf_counter(), _cpu()
    for _ in range(n):
      call()
    wall = time.perf_counter() - wall
    return wall / n, (_cpu() - cpu) / wall

  out = {}
  step, state, batch, _, _ = train_step.build_step(model_config, args.batch, args.seq)
  box = [state]

  def train():
    box[0], m = step(box[0], batch)
    jax.block_until_ready(m)

  out["train"] = timed(train, args.steps)
  model, cfg = state_lib.build_model(model_config)
  params = nn.unbox(state_lib.init_boxed_params(model, jax.random.PRNGKey(0)))
  sampler = sampler_lib.Sampler(model, end_ids=(cfg.vocab_size - 1,), pad_id=0,
                                prompt_bucket=64)
  prompts = np.random.RandomState(0).randint(
      1, cfg.vocab_size - 1, (args.sample_batch, 60)).tolist()
  for name, method in (("greedy", "greedy"), ("t1", "temperature(t=1.0)")):
    out[name] = timed(lambda m=method: sampler.sample(
        params, prompts, jax.random.PRNGKey(0), max_new_tokens=args.new, method=m),
                      args.repeats)
  return out


def run_children(count: int, argv) -> list:
  procs = [subprocess.Popen([sys.executable, __file__, "--child", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
           for _ in range(count)]
  outs = []
  for proc in procs:
    stdout, _ = proc.communicate()
    if proc.returncode:
      raise RuntimeError(f"A benchmark process exited with {proc.returncode}.")
    outs.append(json.loads(stdout.strip().splitlines()[-1]))
  return outs


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--batch", type=int, default=12)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--sample_batch", type=int, default=200)
  parser.add_argument("--new", type=int, default=48)
  parser.add_argument("--repeats", type=int, default=4)
  parser.add_argument("--child", action="store_true")
  args, _ = parser.parse_known_args()
  if args.child:
    print(json.dumps(child(args)))
    return
  argv = [a for a in sys.argv[1:] if a != "--child"]
  alone = run_children(1, argv)[0]
  together = run_children(2, argv)
  print(f"{os.cpu_count()} CPUs; d{args.dim}, {args.layers} layers; train {args.batch}x"
        f"{args.seq}; sampling B{args.sample_batch}, {args.new} new tokens")
  print(f"{'workload':9s} {'alone s':>9s} {'cores':>6s} {'2 at once s':>12s} "
        f"{'throughput 2/1':>15s}")
  for name in WORKLOADS:
    one, cores = alone[name]
    two = sum(t[name][0] for t in together) / 2
    print(f"{name:9s} {one:9.3f} {cores:6.2f} {two:12.3f} {2 * one / two:14.2f}x")


if __name__ == "__main__":
  main()

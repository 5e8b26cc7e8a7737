"""Benchmark: where a compiled call's time goes on XLA:CPU, and how busy the cores are.

    python experiments/benchmarks/xla_profile.py [--dim 128] [--layers 4] [--heads 2]
        [--kv_heads 1] [--mlp 384] [--vocab 128] [--mode ternary+subln]
        [--batch 12] [--seq 128] [--steps 20] [--sample_batch 200] [--prompt 64]
        [--new 40] [--top 12]

The defaults are the demo's model (``configs/arith_fcp.py``: d128, 4 layers, 2/1 heads,
SwiGLU 384, ternary with SubLN) and its warm-up batch (12 x 128). Two workloads:

* **train**: ``--steps`` calls of the real train step (``train_step.build_step``);
* **decode**: ``Sampler`` decoding calls of ``--new`` steps at T=1 for
  ``--sample_batch`` prompts of ``--prompt`` tokens (``--sample_batch 0`` skips it).

Each runs under ``jax.profiler.trace``; the trace's thunk events (one per top-level HLO
instruction the XLA:CPU runtime executes, named as in the compiled module) give:

* **busy**: the thunks' summed time per call (or per decoding step), per worker thread
  and in all, against the call's wall time; **cores busy** = summed thunk time / wall
  (at most the number of cores). Time outside thunks (dispatch, waiting on a
  dependency, the profiler's own overhead) is the difference;
* the **top ops**: thunk time by the HLO ``op_name`` of each instruction (layer indices
  folded, so ``layers_*/mlp/gate_proj/dot_general`` sums over layers), with the number
  of thunks per call.

The profiler slows every thunk (a traced call takes 1.1-1.3x an untraced one, whose best
wall time of 3 calls is printed too); compare the rows of one run, not across runs.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Callable, Dict, Tuple

import jax
import numpy as np

from fcp_jax import host
from fcp_jax.models import transformer
from fcp_jax.sampling import sampler as sampler_lib
# This folder's (run as a script, so the folder is on sys.path).
import peer  # pylint: disable=g-bad-import-order
from train_step import MODES, build_step  # pylint: disable=g-bad-import-order

MODE_OVERRIDES = {**MODES, "ternary+subln": dict(MODES["ternary"], subln=True)}
# Instructions that contain other thunks (their events would count those twice).
_CONTAINERS = ("while", "conditional", "call")
UNTRACED_CALLS = 3  # The untraced wall time is the best of these.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", re.M)


def op_names(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> its op_name (``jit(f)/`` prefix and layer indices folded)."""
  out = {}
  for name, op in _INSTRUCTION.findall(hlo_text):
    op = re.sub(r"^jit\([^)]*\)/", "", op)
    out[name] = re.sub(r"layers_\d+", "layers_*", op)
  return out


def trace_events(fn: Callable[[], None]) -> Tuple[list, Dict[Tuple[int, int], str], float]:
  """Runs ``fn`` under the profiler: (complete events, thread names, wall seconds)."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      t = time.perf_counter()
      fn()
      wall = time.perf_counter() - t
    path, = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return [e for e in events if e.get("ph") == "X"], threads, wall


def report(title: str, hlo_text: str, fn: Callable[[], None], per: int, unit: str,
           top: int):
  """Prints busy time per thread, cores busy, and the top ops, per ``unit``."""
  names = op_names(hlo_text)
  untraced = float("inf")
  for _ in range(UNTRACED_CALLS):
    t = time.perf_counter()
    fn()
    untraced = min(untraced, time.perf_counter() - t)
  events, threads, wall = trace_events(fn)
  busy = collections.Counter()
  by_op = collections.Counter()
  count = collections.Counter()
  for e in events:
    name = e["name"]
    if name not in names or name.startswith(_CONTAINERS):
      continue
    busy[threads.get((e["pid"], e["tid"]), "?")] += e["dur"] * 1e-6
    by_op[names[name]] += e["dur"] * 1e-6
    count[names[name]] += 1
  total = sum(busy.values())
  ms = lambda s: f"{1e3 * s / per:8.2f} ms"
  print(f"\n== {title}: wall {ms(wall)} per {unit} traced ({ms(untraced)} untraced); "
        f"thunks {ms(total)} -> {total / wall:.2f} of {os.cpu_count()} cores busy")
  for thread, s in busy.most_common():
    print(f"  thread {thread[:40]:40s} {ms(s)}  ({s / wall:.0%} of the wall)")
  print(f"  top ops (thunk time per {unit}, thunks per {unit}):")
  for op, s in by_op.most_common(top):
    print(f"  {ms(s)}  x{count[op] / per:6.1f}  {op[:100]}")


def main():
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in (("dim", 128), ("layers", 4), ("heads", 2), ("kv_heads", 1),
                        ("mlp", 384), ("vocab", 128), ("batch", 12), ("seq", 128),
                        ("steps", 20), ("sample_batch", 200), ("prompt", 64),
                        ("new", 40), ("top", 12)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--mode", default="ternary+subln", choices=sorted(MODE_OVERRIDES))
  args = parser.parse_args()
  model_config = dict(peer.model_config(args), **MODE_OVERRIDES[args.mode])
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; "
        f"{model_config}")

  train_step, state, batch, par, cfg = build_step(model_config, args.batch, args.seq)
  with par.context():
    hlo = train_step.jitted.lower(state, batch).compile().as_text()
  box = {"state": state}

  def steps():
    for _ in range(args.steps):
      box["state"], m = train_step(box["state"], batch)
      jax.block_until_ready(m)

  steps()  # Compiles and warms up.
  report(f"train step {args.batch}x{args.seq}", hlo, steps, args.steps, "step", args.top)

  if args.sample_batch:
    params = jax.device_get(box["state"].params)
    sampler = sampler_lib.Sampler(transformer.Transformer(cfg), end_ids=(-1,), pad_id=0,
                                  prompt_bucket=args.prompt)
    prompts = np.random.RandomState(0).randint(
        1, args.vocab, (args.sample_batch, args.prompt)).tolist()
    fns = sampler.jitted("temperature(t=1.0)", args.new, 1)
    tokens, segments = sampler.left_pad(prompts)
    # Each call decodes a fresh prefill's state (decode donates its input).
    states = iter([fns["prefill"](params, tokens, segments, None)
                   for _ in range(UNTRACED_CALLS + 2)])
    first = next(states)
    hlo = fns["decode"].lower(params, first, jax.random.PRNGKey(0), None).compile(
        ).as_text()

    def decode(state=None):
      jax.block_until_ready(fns["decode"](params, next(states) if state is None else state,
                                          jax.random.PRNGKey(1), None))

    decode(first)  # Compiles and warms up.
    report(f"decoding B{args.sample_batch}, {args.prompt}+{args.new} slots", hlo, decode,
           args.new, "decoding step", args.top)


if __name__ == "__main__":
  main()

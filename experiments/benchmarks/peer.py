"""Benchmark: fcp_jax against Hugging Face transformers + torch, same shape, one process.

    python experiments/benchmarks/peer.py [--dim 256] [--layers 4] [--heads 4]
        [--kv_heads 2] [--mlp 768] [--vocab 128] [--batch 32] [--seq 96] [--steps 10]
        [--sample_batches 200,16] [--prompt 64] [--new 40] [--repeats 3]

Builds the project's float model (the ``small`` variant's numerics: SwiGLU, RoPE base
10,000 in "half" style, RMSNorm eps 1e-6, tied embeddings; the flags set the shape) and
a ``transformers.LlamaForCausalLM`` from the same config (``models/hf.py``'s exporter
config), with the project model's initial weights copied in, and times:

* **train**: tokens/s of one update on a ``train_step.synthetic_batch`` of ``--batch`` x
  ``--seq`` (all positions counted, padding included): fcp_jax's real compiled train
  step (``train_step.build_step``: AdamW, weight decay on kernels, clipping at norm 1,
  token-mean NLL over the loss mask) against eager torch doing the same (forward,
  float32 log-softmax NLL over the same mask, backward, ``clip_grad_norm_``,
  ``torch.optim.AdamW`` with decay on the 2-D non-embedding weights). Both start from
  the same weights, so the first-step losses printed must agree (to float32 rounding).
* **sampling**: generated tokens/s of ``--new`` tokens after ``--prompt``-token prompts
  at temperature 1 with no top-k/top-p, per batch of ``--sample_batches``:
  ``sampling.Sampler`` (jitted prefill + decode loop, compiled once per shape before
  timing) against ``model.generate(do_sample=True, min_new_tokens=new)`` (so HF never
  stops early; a random model rarely emits the end token, so fcp_jax runs full length
  too and is credited with the steps it ran).
* **matmul peak**: a jitted float32 1024^2 matmul (best of 20), and the model's MLP
  matmuls (BT x D x F and BT x F x D) in both frameworks. The train step's utilisation
  is XLA's ``cost_analysis`` FLOPs per step over the step time over the 1024^2 peak;
  torch's row uses the same FLOP count (same model and update).

Each figure is a median (``--steps`` train steps, ``--repeats`` sampling calls, after a
warm-up); the run ends with the share of the CPUs other processes used meanwhile. Torch runs on
``len(os.sched_getaffinity(0))`` threads (set here, printed); XLA:CPU uses all cores.
The table lists each figure, fcp_jax's and torch's, and their ratio.
"""

import argparse
import os
import subprocess
import time
from typing import Any, Callable, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcp_jax import host
from fcp_jax.models import hf as hf_lib
from fcp_jax.models import transformer
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import state as state_lib
# This folder's (run as a script, so the folder is on sys.path).
from train_step import build_step, matmul_peak, xla_flops  # pylint: disable=g-bad-import-order


def model_config(args) -> Dict[str, Any]:
  """``state_lib.build_model``'s argument: the ``small`` variant with the flags' shape."""
  if args.dim % args.heads:
    raise ValueError(f"--dim {args.dim} is not a multiple of --heads {args.heads}.")
  return dict(variant="small", embed_dim=args.dim, num_layers=args.layers,
              num_heads=args.heads, num_kv_heads=args.kv_heads,
              head_dim=args.dim // args.heads, mlp_dim=args.mlp, vocab_size=args.vocab,
              weight_quant="none", act_quant="none")


def hf_model(cfg: transformer.TransformerConfig, params: Any, max_len: int):
  """``LlamaForCausalLM`` of ``cfg`` holding ``params`` (our unboxed param tree)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_cfg = hf_lib.HF_CONFIG_WRITERS.lookup("llama")(cfg, max_len)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg))
  state = model.state_dict()
  for name, slot in hf_lib.hf_param_plan(cfg).items():
    leaf = params
    for key in slot.path:
      leaf = leaf[key]
    leaf = np.asarray(leaf if slot.layer is None else leaf[slot.layer], np.float32)
    with torch.no_grad():
      state[name].copy_(torch.tensor(hf_lib.ours_to_hf(leaf, slot, cfg)))
  return model


def in_blocks(calls: Dict[str, Callable[[], Any]], repeats: int, warmup: int
              ) -> Dict[str, Tuple[float, Any]]:
  """``{name: (median seconds, last result)}``: each fn's warm-up and timed calls in turn.

  Each side runs alone, one block after the other: alternating single calls would
  time each side while the other's worker threads still spin-wait (torch's OpenMP
  pool does for a while after every parallel region).
  """
  out = {}
  for name, fn in calls.items():
    for _ in range(warmup):
      fn()
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      result = fn()
      times.append(time.perf_counter() - t)
    out[name] = (float(np.median(times)), result)
  return out


def fcp_train(args):
  """``(step fn -> loss, info)``: the compiled real train step on a synthetic batch."""
  train_step, state, batch, par, cfg = build_step(model_config(args), args.batch, args.seq)
  with par.context():
    compiled = train_step.jitted.lower(state, batch).compile()
  params = jax.device_get(state.params)  # Before the step donates the state.
  box = {"state": state}

  def step():
    box["state"], m = train_step(box["state"], batch)
    return float(m["loss"])  # Syncs, as a driver's logging does.

  return step, dict(cfg=cfg, params=params, flops=xla_flops(compiled),
                    batch=jax.device_get(batch), n_params=transformer.count_params(params))


def torch_train(model, batch: Dict[str, np.ndarray]) -> Callable[[], float]:
  """A step fn -> loss of the same update in eager torch."""
  import torch  # pylint: disable=g-import-not-at-top
  model.train()
  tokens = torch.tensor(batch["tokens"], dtype=torch.long)  # [B, T]
  targets = tokens[:, 1:]  # [B, T-1]
  seg = batch["segment_ids"]
  mask = torch.tensor((batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg[:, :-1])
                       * (seg[:, 1:] != 0)).astype(np.float32))  # [B, T-1]
  decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
  rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=0.1),
                           dict(params=rest, weight_decay=0.0)],
                          lr=1e-3, betas=(0.9, 0.999), eps=1e-8)

  def step():
    logits = model(input_ids=tokens).logits  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # [B, T-1, V]
    nll = -logp.gather(-1, targets[..., None])[..., 0]  # [B, T-1]
    loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()

  return step


def fcp_sample(cfg, params, prompts: np.ndarray, args) -> Callable[[], int]:
  """A call fn -> tokens generated by ``Sampler.sample`` (compiled by the first call)."""
  sampler = sampler_lib.Sampler(transformer.Transformer(cfg), end_ids=(cfg.vocab_size - 1,),
                                pad_id=0, prompt_bucket=args.prompt)
  rows = prompts.tolist()
  seeds = iter(range(10_000))

  def call():
    out = sampler.sample(params, rows, jax.random.PRNGKey(next(seeds)),
                         max_new_tokens=args.new, method="temperature(t=1.0)")
    return len(rows) * int(np.max(out.lengths))

  return call


def torch_sample(model, prompts: np.ndarray, args) -> Callable[[], int]:
  """A call fn -> tokens generated by HF ``generate`` (sampling at T=1, full length)."""
  import torch  # pylint: disable=g-import-not-at-top
  ids = torch.from_numpy(prompts).long()  # [B, P]
  seed = iter(range(10_000))

  def call():
    model.eval()
    torch.manual_seed(next(seed))
    with torch.no_grad():
      out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                           do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=args.new, min_new_tokens=args.new,
                           eos_token_id=model.config.vocab_size - 1, pad_token_id=0)
    return ids.shape[0] * (out.shape[1] - ids.shape[1])

  return call


def matmul_rates(m: int, d: int, f: int) -> Dict[str, float]:
  """FLOP/s of [m, d] x [d, f] then [m, f] x [f, d] (best of 20), jitted and torch."""
  import torch  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  x, w1, w2 = (rs.randn(*s).astype(np.float32) for s in ((m, d), (d, f), (f, d)))
  flops = 4.0 * m * d * f
  fn = jax.jit(lambda x, a, b: (x @ a) @ b)
  jx = [jnp.asarray(a) for a in (x, w1, w2)]
  tx = [torch.from_numpy(a) for a in (x, w1, w2)]

  def best(call):
    call()
    times = []
    for _ in range(20):
      t = time.perf_counter()
      call()
      times.append(time.perf_counter() - t)
    return flops / min(times)

  return dict(jax=best(lambda: fn(*jx).block_until_ready()),
              torch=best(lambda: (tx[0] @ tx[1]) @ tx[2]))


def _busy_cpu_s() -> float:
  """CPU seconds all processes have spent busy since boot (``/proc/stat``; 0 if absent)."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
  except OSError:
    return 0.0
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
  return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
  """Share of the machine's CPU time that other processes used while in the block."""

  def __enter__(self):
    self._t, self._busy, self._own = time.time(), _busy_cpu_s(), sum(os.times()[:2])
    return self

  def __exit__(self, *exc):
    wall = (time.time() - self._t) * len(os.sched_getaffinity(0))
    own = sum(os.times()[:2]) - self._own
    self.share = max(_busy_cpu_s() - self._busy - own, 0.0) / max(wall, 1e-9)
    return False


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    return "unknown (no lscpu)"
  lines = [l for l in out.splitlines() if l.startswith("Model name")]
  return " ".join(lines[0].split()) if lines else "unknown"


def main():
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for name, default in (("dim", 256), ("layers", 4), ("heads", 4), ("kv_heads", 2),
                        ("mlp", 768), ("vocab", 128), ("batch", 32), ("seq", 96),
                        ("steps", 10), ("prompt", 64), ("new", 40), ("repeats", 3)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--sample_batches", "--sample_batch", default="200,16",
                      help="comma-separated batch sizes; empty skips sampling")
  args = parser.parse_args()

  print(f"{cpu_model()}; jax {jax.__version__} ({jax.device_count()} x "
        f"{jax.devices()[0].platform})")
  print(f"shape: d={args.dim}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
        f"SwiGLU {args.mlp}, vocab {args.vocab}; train {args.batch}x{args.seq}, "
        f"{args.steps} steps; sampling prompt {args.prompt} + {args.new} new, T=1")

  with OtherLoad() as load:
    run(args)
  print(f"other processes used {load.share:.0%} of the CPUs during the run"
        + (" (the figures are not reliable: rerun on an idle machine)"
           if load.share > 0.05 else ""))


def run(args):
  """Measures everything and prints the table.

  fcp_jax's figures come first, before torch does any work in the process: once torch
  has run an op, its idle OpenMP threads slow XLA:CPU's steps that follow (by 10-15%
  on 2 cores, measured with this script's shapes).
  """
  peak = matmul_peak(1024)
  fcp_step, fcp = fcp_train(args)
  first_loss = {"fcp": fcp_step()}  # The initial weights, copied to torch below.
  step_s = {"fcp": in_blocks({"fcp": fcp_step}, args.steps, warmup=1)["fcp"][0]}
  batches = [int(s) for s in args.sample_batches.split(",") if s.strip()]
  prompts_rs = np.random.RandomState(0)
  prompts = {b: prompts_rs.randint(1, args.vocab - 1, (b, args.prompt)).astype(np.int32)
             for b in batches}
  rates = {b: {} for b in batches}
  for b in batches:
    (median, tokens_out), = in_blocks(
        {"fcp": fcp_sample(fcp["cfg"], fcp["params"], prompts[b], args)},
        args.repeats, warmup=1).values()
    rates[b]["fcp"] = tokens_out / median

  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  model = hf_model(fcp["cfg"], fcp["params"], args.prompt + args.new + args.seq)
  print(f"torch {torch.__version__} on {torch.get_num_threads()} threads (set to the CPU "
        f"count), transformers {transformers.__version__}, HF attention "
        f"{model.config._attn_implementation}, eager (no torch.compile)")  # pylint: disable=protected-access
  n_torch = sum(p.numel() for p in model.parameters())
  torch_step = torch_train(model, fcp["batch"])
  first_loss["torch"] = torch_step()
  step_s["torch"] = in_blocks({"torch": torch_step}, args.steps, warmup=1)["torch"][0]
  for b in batches:
    (median, tokens_out), = in_blocks({"torch": torch_sample(model, prompts[b], args)},
                                      args.repeats, warmup=1).values()
    rates[b]["torch"] = tokens_out / median
  shapes = matmul_rates(args.batch * args.seq, args.dim, args.mlp)

  tokens = args.batch * args.seq
  flops = fcp["flops"] or 6.0 * fcp["n_params"] * tokens
  rows = [
      ("params", fcp["n_params"], n_torch, "{:,.0f}"),
      ("first-step loss (same weights, batch)", first_loss["fcp"], first_loss["torch"],
       "{:.5f}"),
      (f"train step ms, B{args.batch}x{args.seq}", 1e3 * step_s["fcp"],
       1e3 * step_s["torch"], "{:.1f}"),
      ("train tokens/s", tokens / step_s["fcp"], tokens / step_s["torch"], "{:,.0f}"),
      (f"train GFLOP/s ({flops / 1e9:.2f} GFLOP/step, XLA)", flops / step_s["fcp"] / 1e9,
       flops / step_s["torch"] / 1e9, "{:.1f}"),
      ("  of the jitted 1024^2 matmul", flops / step_s["fcp"] / peak,
       flops / step_s["torch"] / peak, "{:.1%}"),
      ("  of the model-shape matmuls (jax's)", flops / step_s["fcp"] / shapes["jax"],
       flops / step_s["torch"] / shapes["jax"], "{:.1%}"),
      (f"matmul GFLOP/s {tokens}x{args.dim}x{args.mlp}, x{args.dim}",
       shapes["jax"] / 1e9, shapes["torch"] / 1e9, "{:.1f}"),
  ] + [(f"sampling tokens/s, B{b}", rates[b]["fcp"], rates[b]["torch"], "{:,.0f}")
       for b in batches]

  print(f"jitted 1024^2 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
  print(f"| {'figure':44s} | {'fcp_jax':>10s} | {'HF torch':>10s} | {'ratio':>6s} |")
  print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
  for name, ours, theirs, fmt in rows:
    print(f"| {name:44s} | {fmt.format(ours):>10s} | {fmt.format(theirs):>10s} | "
          f"{ours / theirs:6.2f}x |")
  print("Ratios are fcp_jax / torch (for step ms, lower is faster).")


if __name__ == "__main__":
  main()

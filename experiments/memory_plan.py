r"""Prints per-device memory plans of the train step and the sampler (no training).

    python experiments/memory_plan.py --variant=7b --devices=64 --tokens_per_device=2048 \
        --remat=dots,proj,full --loss_chunk=0,512 --chip_gib=16 [--prompts=256]
    python experiments/memory_plan.py --config=configs/arith_fcp.py --stage=warmup \
        --devices=8 --chip_gib=16

Every comma list multiplies the rows (variant x devices x remat x attention x
loss_chunk). ``--config`` plans a stage's train step at its own batch (``batch_size`` x
``data.max_len``; an online stage: ``online.mini_batch`` x ``online.max_len`` and its
sampler); ``--variant`` plans ``--tokens_per_device`` tokens per data x fsdp shard in
rows of ``--seq_len``, on ``--mesh`` (default FSDP), and the sampler when ``--prompts``
> 0. With more devices than present the plans run on fake CPU devices: the command
sets ``XLA_FLAGS=--xla_force_host_platform_device_count`` before JAX starts. Figures
are ``compiled.memory_analysis()`` of the backend that compiled them
(``fcp_jax/training/memory_plan.py``); empty remat/attention/loss_chunk keep the
config's value. The exit status is 1 when a row does not fit (0 when all do).
"""

import argparse
import copy
import itertools
import os
import re
import sys
from typing import List, Sequence

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="", help="configs/x.py[:arg]")
  p.add_argument("--stage", default="", help="a pipeline config's stage (warmup, ...)")
  p.add_argument("--variant", default="", help="model variants, comma list")
  p.add_argument("--devices", default="", help="device counts, comma list")
  p.add_argument("--mesh", default="", help="(data, fsdp, tensor), e.g. 1,-1,1")
  p.add_argument("--tokens_per_device", type=int, default=2048)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--remat", default="", help="remat policies, comma list")
  p.add_argument("--attention", default="", help="attention paths, comma list")
  p.add_argument("--loss_chunk", default="", help="loss chunks, comma list")
  p.add_argument("--prompts", type=int, default=0, help="sampler prompts (0: none)")
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--new_tokens", type=int, default=512)
  p.add_argument("--chip_gib", type=float, default=16.0)
  args = p.parse_args(argv)
  if bool(args.config) == bool(args.variant):
    p.error("give one of --config or --variant.")
  return args


def _list(text: str, cast=str) -> List:
  """``"a,b"`` -> [a, b]; empty -> [None] (keep the config's value)."""
  return [cast(x) for x in text.split(",") if x] or [None]


def fake_devices(count: int) -> None:
  """Asks XLA for ``count`` host devices; must run before JAX starts."""
  if "jax" in sys.modules or count <= 1:
    return
  flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={count}".strip()


def _devices(n: int):
  import jax  # pylint: disable=g-import-not-at-top
  for devices in (jax.devices(), jax.devices("cpu")):
    if len(devices) >= n:
      return devices[:n]
  raise ValueError(f"{n} devices asked, {len(jax.devices('cpu'))} CPU devices present: "
                   f"set XLA_FLAGS={_DEVICE_FLAG}={n} before JAX starts.")


def _stage_shapes(config, args, par, memory_plan):
  """(train kwargs, sampler kwargs or None) of a config or a variant."""
  if args.variant or "online" not in config:
    if args.variant:
      seq = args.seq_len
      rows = memory_plan.rows_for(args.tokens_per_device, seq, par)
    else:
      rows, seq = int(config.batch_size), int(config.data.max_len)
    sample = (dict(prompts=args.prompts, prompt_len=args.prompt_len,
                   new_tokens=args.new_tokens) if args.prompts else None)
    return dict(rows=rows, seq_len=seq), sample
  on = config.online
  prompts = -(-int(on.prompts_per_step) // par.num_batch_shards) * par.num_batch_shards
  return (dict(rows=int(on.mini_batch), seq_len=int(on.max_len)),
          dict(prompts=prompts, prompt_len=int(on.max_len) - int(on.max_new_tokens),
               new_tokens=int(on.max_new_tokens), num_samples=int(on.num_samples)))


def main(argv: Sequence[str]) -> List[dict]:
  args = _parse(argv)
  counts = _list(args.devices, int)
  fake_devices(max(c or 1 for c in counts))
  # pylint: disable=g-import-not-at-top
  import jax
  from fcp_jax import config_lib
  from fcp_jax.models import transformer
  from fcp_jax.training import memory_plan
  from fcp_jax.training import sharding
  # pylint: enable=g-import-not-at-top

  if args.config:
    base = config_lib.load_config(args.config)
    if args.stage:
      base = config_lib.stage_config(base, args.stage)
    bases = [(None, base)]
  else:
    bases = [(v, memory_plan.train_config({"variant": v})) for v in _list(args.variant)]
  limit = args.chip_gib * memory_plan.GIB
  rows = []
  for variant, base in bases:
    for n in counts:
      devices = _devices(n or jax.device_count())
      mesh = (tuple(int(x) for x in args.mesh.split(",")) if args.mesh
              else (1, -1, 1) if variant else tuple(base.parallel.mesh_shape))
      par = sharding.build({"mode": "mesh", "mesh_shape": mesh,
                            "rules": sharding.DEFAULT_RULES}, devices)
      for remat, attention, chunk in itertools.product(
          _list(args.remat), _list(args.attention), _list(args.loss_chunk, int)):
        config = copy.deepcopy(base)
        config.unlock()
        config.model.update({k: v for k, v in dict(
            remat=remat, attention=attention, loss_chunk=chunk).items() if v is not None})
        model = transformer.from_config(config.model)
        train, sample = _stage_shapes(config, args, par, memory_plan)
        label = dict(variant=variant or config.model.variant, devices=len(devices),
                     mesh="x".join(map(str, par.mesh.shape.values())),
                     remat=model.remat, attention=model.attention,
                     loss_chunk=model.loss_chunk,
                     batch=f"{train['rows']}x{train['seq_len']}")
        plans = memory_plan.plan_training(config, par, **train)
        if sample:
          plans += memory_plan.plan_sampling(config, par, **sample)
        rows.extend(dict(label=label, plan=plan, fits=plan.spare(limit) >= 0)
                    for plan in plans)
        print(f"planned {label}", file=sys.stderr, flush=True)
  print(f"Per-device memory plans (XLA:{jax.default_backend().upper()} "
        f"memory_analysis); fits: total <= {1 - memory_plan.HEADROOM:.0%} of "
        f"{args.chip_gib:g} GiB")
  print(memory_plan.format_table(rows, limit))
  if not all(r["fits"] for r in rows):
    print("\nDOES NOT FIT on some rows. Knobs that lower a plan:")
    print("\n".join(f"  - {k}" for k in memory_plan.KNOBS))
  return rows


if __name__ == "__main__":
  sys.exit(0 if all(r["fits"] for r in main(sys.argv[1:])) else 1)

"""Per-device memory plans: the train step and the sampler compiled ahead of time.

    par = sharding.build({"mode": "mesh", "mesh_shape": (1, -1, 1)}, devices)
    plans = plan_training(config, par, rows=64, seq_len=2048)     # [Plan("train")]
    plans += plan_sampling(config, par, prompts=256, prompt_len=512, new_tokens=512)
    print(format_table(plans, limit_bytes=16 * GIB))
    check_fits(plans, limit_bytes)                # raises DoesNotFit naming the knobs

Nothing runs: the steps are lowered on ``jax.ShapeDtypeStruct`` inputs carrying the
shardings the drivers use (``step.build_training``, ``sharding.MeshParallel``) and
compiled; ``compiled.memory_analysis()`` gives XLA's per-device buffer plan. On fake
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set by the caller
before JAX starts) the figures are XLA:CPU's: an accelerator's compiler fuses and
schedules differently, but the proportions hold.

A plan's total is ``arguments + outputs - aliased + temporaries + code`` (a donated
state's outputs reuse its argument buffers). It fits a chip when the total is at most
``1 - HEADROOM`` of the chip's bytes: the rest is left to the runtime, the allocator's
fragmentation and what the plan does not see (e.g. host transfers, other programs).
"""

import dataclasses
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from fcp_jax.models import transformer as transformer_lib
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import sharding as sharding_lib
from fcp_jax.training import step as step_lib

GIB = 1 << 30
UNITS = {"GiB": GIB, "MiB": 1 << 20}
HEADROOM = 0.1  # Fraction of the chip's memory a plan must leave free to "fit".
# Training batch fields [rows, seq_len] (``advantages``: [rows]): every loss's fields at
# once (an unused field costs only its argument bytes).
BATCH_FIELDS = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32,
                "loss_mask": jnp.float32, "old_logprobs": jnp.float32,
                "ref_logprobs": jnp.float32, "advantages": jnp.float32}
# Settings that lower a plan, in the order a message suggests them.
KNOBS = ("model.remat ('attn_proj' or 'full' keep less for the backward than 'dots')",
         "model.loss_chunk (e.g. 512: no float32 [B, T, V] logits at once; helps "
         "when the logits are the peak)",
         "model.attention ('cudnn' on GPU: no [T, T] scores)",
         "more devices or an FSDP mesh (parallel.mesh_shape (1, -1, 1): shards "
         "params and optimizer state)",
         "fewer tokens per device (batch_size, max_len, or grad_accum)")


class DoesNotFit(RuntimeError):
  """A plan needs more memory than the chip has (the message names the knobs)."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """One compiled function's per-device memory, in bytes."""
  name: str          # "train", "prefill" or "decode"
  arguments: int     # parameters + optimizer state (+ the batch / cache)
  outputs: int
  aliased: int       # outputs written into donated arguments
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

  def spare(self, limit_bytes: float) -> float:
    """Bytes left under ``(1 - HEADROOM) * limit_bytes`` (negative: does not fit)."""
    return (1.0 - HEADROOM) * limit_bytes - self.total


def from_compiled(name: str, compiled: Any) -> Plan:
  m = compiled.memory_analysis()
  return Plan(name=name, arguments=m.argument_size_in_bytes,
              outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
              temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)


def _mesh_par(par: Any) -> sharding_lib.MeshParallel:
  if not isinstance(par, sharding_lib.MeshParallel):
    raise ValueError("Memory plans need parallel.mode='mesh' (pmap replicates the "
                     "state: plan it as a mesh of one device).")
  return par


def abstract_batch(par: Any, rows: int, seq_len: int) -> Dict[str, jax.ShapeDtypeStruct]:
  """``BATCH_FIELDS`` as sharded abstract arrays [rows, seq_len] (``put_batch``'s)."""
  if rows % par.num_batch_shards:
    raise ValueError(f"{rows} rows do not divide over the {par.num_batch_shards} "
                     f"data x fsdp shards of mesh {dict(par.mesh.shape)}.")
  shape = lambda name: (rows,) if name == "advantages" else (rows, seq_len)
  return {k: jax.ShapeDtypeStruct(shape(k), dtype, sharding=par.batch_sharding)
          for k, dtype in BATCH_FIELDS.items()}


def train_config(model: Mapping[str, Any], *, loss: str = "nll",
                 grad_accum: int = 1) -> ml_collections.ConfigDict:
  """A minimal run config (AdamW, clipping) for ``step.build_training``."""
  return ml_collections.ConfigDict(dict(
      model=dict(model), loss=loss, grad_accum=grad_accum, quant={},
      optim=dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)))


def plan_training(config: Mapping[str, Any], par: Any, *, rows: int,
                  seq_len: int, tr: Optional[step_lib.Training] = None) -> List[Plan]:
  """The train step of ``config`` (``build_training``'s, or ``tr`` if already built) on
  a global batch [rows, T]."""
  par = _mesh_par(par)
  tr = tr or step_lib.build_training(config, par, total_steps=1)
  teacher = () if tr.teacher is None else (tr.teacher.abstract,)  # Distillation.
  with par.context():
    compiled = tr.train_step.jitted.lower(
        tr.abstract_state, abstract_batch(par, rows, seq_len), *teacher).compile()
  return [from_compiled("train", compiled)]


def plan_sampling(config: Mapping[str, Any], par: Any, *, prompts: int,
                  prompt_len: int, new_tokens: int, num_samples: int = 1,
                  method: str = "greedy") -> List[Plan]:
  """The sampler's prefill and decode loop with the train state's parameter shardings.

  The ``prompts`` rows [prompts, prompt_len] are split over ``data x fsdp`` as the
  drivers' sampler splits them (``Sampler(parallel=par)``), with the loop state (KV
  cache included) split the same way.
  """
  par = _mesh_par(par)
  tr = step_lib.build_training(config, par, total_steps=1)
  sampler = sampler_lib.Sampler(tr.model, end_ids=(0,), pad_id=0, parallel=par)
  fns = sampler.jitted(method, new_tokens, num_samples)
  tokens = jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32,
                                sharding=par.sample_sharding)  # [B, P]
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=par.replicated)
  with par.context():
    prefill = fns["prefill"].lower(tr.abstract_state.params, tokens, tokens,
                                   None).compile()
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(fns["prefill"], tr.abstract_state.params, tokens, tokens, None),
        prefill.output_shardings)
    decode = fns["decode"].lower(tr.abstract_state.params, state, rng, None).compile()
  return [from_compiled("prefill", prefill), from_compiled("decode", decode)]


def device_limit(device: Optional[Any] = None) -> Optional[int]:
  """The allocator's ``bytes_limit`` of ``device`` (None where not reported, e.g. CPU)."""
  stats = (device or jax.local_devices()[0]).memory_stats() or {}
  return stats.get("bytes_limit")


def _gib(n: float) -> str:
  return f"{n / GIB:.2f}"


def verdict(plan: Plan, limit_bytes: Optional[float], unit: str = "GiB") -> str:
  """``FITS (x GiB spare)`` / ``DOES NOT FIT (x GiB over)`` / ``-`` without a limit."""
  if not limit_bytes:
    return "-"
  spare = plan.spare(limit_bytes)
  amount = f"{abs(spare) / UNITS[unit]:.2f} {unit}"
  return f"FITS ({amount} spare)" if spare >= 0 else f"DOES NOT FIT ({amount} over)"


COLUMNS = ("args (params+opt)", "temps", "outputs", "code", "total")


def format_table(rows: Sequence[Mapping[str, Any]], limit_bytes: Optional[float]
                 ) -> str:
  """Rows ``{"label": {...}, "plan": Plan}`` as a text table per device (GiB, or MiB
  when every total is under 1 GiB)."""
  keys = list(rows[0]["label"]) if rows else []
  unit = "GiB" if any(r["plan"].total >= GIB for r in rows) else "MiB"
  head = keys + ["step"] + [f"{c} {unit}" for c in COLUMNS] + ["verdict"]
  body = []
  for r in rows:
    p = r["plan"]
    body.append([str(r["label"][k]) for k in keys] + [p.name] + [
        f"{v / UNITS[unit]:.2f}" for v in (p.arguments, p.temporaries,
                                           p.outputs - p.aliased, p.code, p.total)
    ] + [verdict(p, limit_bytes, unit)])
  widths = [max(len(x) for x in col) for col in zip(head, *body)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths)).rstrip()
  return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def shortfall_message(plans: Sequence[Plan], limit_bytes: float, what: str = "") -> str:
  """What does not fit ``limit_bytes``, by how much, and the knobs that would help."""
  over = [p for p in plans if p.spare(limit_bytes) < 0]
  lines = [f"{what or 'The run'} does not fit the device's "
           f"{_gib(limit_bytes)} GiB (plans must leave {HEADROOM:.0%} free):"]
  lines += [f"  {p.name}: {_gib(p.total)} GiB per device = params+opt+batch "
            f"{_gib(p.arguments)} + temporaries {_gib(p.temporaries)} + outputs "
            f"{_gib(p.outputs - p.aliased)} + code {_gib(p.code)}; "
            f"{_gib(-p.spare(limit_bytes))} GiB over." for p in over]
  lines.append("Knobs that lower it: " + "; ".join(KNOBS) + ".")
  return "\n".join(lines)


def check_fits(plans: Sequence[Plan], limit_bytes: float, what: str = "") -> None:
  """Raises ``DoesNotFit`` (``shortfall_message``) when a plan exceeds the chip."""
  if any(p.spare(limit_bytes) < 0 for p in plans):
    raise DoesNotFit(shortfall_message(plans, limit_bytes, what))


def check_before_training(config: Mapping[str, Any], par: Any, *, rows: int,
                          seq_len: int, limit_bytes: Optional[float] = None,
                          tr: Optional[step_lib.Training] = None) -> None:
  """The drivers' check: plans the train step and raises ``DoesNotFit`` if too big.

  Does nothing on CPU (or pmap mode) unless ``limit_bytes`` is given; otherwise the
  limit is the first local device's ``bytes_limit``. ``tr``: the run's own
  ``build_training`` result, planned as it is.
  """
  if limit_bytes is None:
    if jax.default_backend() == "cpu" or not isinstance(par, sharding_lib.MeshParallel):
      return
    limit_bytes = device_limit()
    if not limit_bytes:
      return
  plans = plan_training(config, par, rows=rows, seq_len=seq_len, tr=tr)
  model = transformer_lib.from_config(config["model"])
  check_fits(plans, limit_bytes, what=(
      f"The train step (batch {rows} x {seq_len} on mesh {dict(par.mesh.shape)}, "
      f"remat={model.remat!r}, attention={model.attention!r}, "
      f"loss_chunk={model.loss_chunk})"))


def rows_for(tokens_per_device: int, seq_len: int, par: Any) -> int:
  """Global rows of ``seq_len`` giving each data x fsdp shard ``tokens_per_device``."""
  return max(1, math.ceil(tokens_per_device / seq_len)) * par.num_batch_shards

"""Host-side metrics: JSONL + TensorBoard writers, progress lines, NaN guard, plots.

    writer = MetricWriter(workdir, resume_step=start_step)   # process 0 writes
    pending = PendingMetrics()
    pending.add(step, device_metrics)              # no device sync
    for step, m in pending.fetch():                # syncs; raises NonFiniteError
      writer.write(step, {f"train/{k}": v for k, v in m.items()})
    progress.line(step, m)                         # "step 10/100 | loss 2.31 | ..."
    plot_curves(workdir)                           # workdir/plots/*.png

Files: ``workdir/metrics.jsonl`` (one ``{"step": s, "train/loss": ...}`` per line) and
TensorBoard event files in ``workdir/tb/``. A resumed run drops the JSONL records after
its restart step, so the file reads as one uninterrupted run.
"""

import collections
import json
import math
import os
import time
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tb"
PLOTS_DIR = "plots"


class NonFiniteError(FloatingPointError):
  """A metric became NaN or Inf; the run stops without saving that state."""

  def __init__(self, step: int, name: str, value: float):
    self.step, self.name, self.value = step, name, value
    super().__init__(
        f"Non-finite metric {name}={value} at step {step}. Training stopped; the "
        "checkpoint on disk is the last good one (no state after this was saved).")


def check_finite(step: int, metrics: Mapping[str, float]):
  """Raises ``NonFiniteError`` naming the first non-finite metric of ``step``.

  ``loss`` (or a name ending in ``/loss``) is checked first: it is usually the cause.
  """
  for name in sorted(metrics, key=lambda k: (k.rsplit("/", 1)[-1] != "loss", k)):
    value = float(metrics[name])
    if not math.isfinite(value):
      raise NonFiniteError(step, name, value)


class PendingMetrics:
  """Per-step device metrics kept on device until the next ``fetch``."""

  def __init__(self):
    self._items: List[Tuple[int, Mapping[str, jax.Array]]] = []

  def __len__(self) -> int:
    return len(self._items)

  def add(self, step: int, metrics: Mapping[str, jax.Array]):
    self._items.append((step, metrics))

  def fetch(self) -> List[Tuple[int, Dict[str, float]]]:
    """Host values of every pending step, checked in step order for NaN/Inf."""
    items, self._items = self._items, []
    host = jax.device_get([m for _, m in items])
    out = []
    for (step, _), m in zip(items, host):
      m = {k: float(np.asarray(v)) for k, v in m.items()}
      check_finite(step, m)
      out.append((step, m))
    return out


def read_jsonl(path: str) -> List[dict]:
  """Records of a metrics JSONL file (a truncated last line is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # A line cut by a killed process.
  return out


def training_budget(workdir: str) -> Dict[str, float]:
  """What a run's optimizer updates consumed, from its ``metrics.jsonl``.

  ``updates`` (a record's ``train/updates``, else one per record), ``loss_tokens`` (the
  tokens the loss was taken on, ``train/tokens``) and ``input_tokens`` (non-padding
  tokens read, ``train/input_tokens``), summed over the run's train records.
  """
  records = [r for r in read_jsonl(os.path.join(workdir, JSONL_NAME))
             if "train/tokens" in r]
  return dict(updates=float(sum(r.get("train/updates", 1.0) for r in records)),
              loss_tokens=float(sum(r["train/tokens"] for r in records)),
              input_tokens=float(sum(r.get("train/input_tokens", 0.0) for r in records)))


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (process 0 only).

  Args:
    workdir: the run directory.
    resume_step: when resuming, JSONL records with ``step > resume_step`` (written by
      the interrupted run after its last checkpoint) are dropped.
    tensorboard: also write TensorBoard events to ``workdir/tb/``.
    is_primary: defaults to ``jax.process_index() == 0``.
  """

  def __init__(self, workdir: str, *, resume_step: Optional[int] = None,
               tensorboard: bool = True, is_primary: Optional[bool] = None):
    self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
    self.path = os.path.join(workdir, JSONL_NAME)
    self._file = self._tb = None
    if not self.is_primary:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TB_DIR),
                                            flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float]):
    if not self.is_primary:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def flush(self):
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def format_duration(seconds: float) -> str:
  """``"1h02m03s"`` or ``"2m03s"``."""
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Tokens/s and ETA over the steps since the previous report."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total_steps = total_steps
    self._step, self._time, self._tokens = start_step, time.perf_counter(), 0.0

  def add_tokens(self, tokens: float):
    self._tokens += tokens

  def report(self, step: int) -> Dict[str, float]:
    """``{"tokens_per_s", "steps_per_s", "eta_s"}`` since the previous report."""
    now = time.perf_counter()
    dt = max(now - self._time, 1e-9)
    steps = max(step - self._step, 0)
    out = {"tokens_per_s": self._tokens / dt, "steps_per_s": steps / dt}
    out["eta_s"] = (self.total_steps - step) / out["steps_per_s"] if steps else 0.0
    self._step, self._time, self._tokens = step, now, 0.0
    return out

  def line(self, step: int, metrics: Mapping[str, float],
           speed: Mapping[str, float]) -> str:
    parts = [f"step {step}/{self.total_steps}"]
    for k in ("loss", "accuracy", "grad_norm", "lr"):
      if k in metrics:
        parts.append(f"{k} {metrics[k]:.4g}")
    parts.append(f"{speed['tokens_per_s']:,.0f} tok/s")
    parts.append(f"ETA {format_duration(speed['eta_s'])}")
    return " | ".join(parts)


_duration = format_duration  # Old private name, still used by bootstrap.py, pipeline.py.


def plot_curves(workdir: str, metrics: Sequence[str] = ("loss", "accuracy")
                ) -> List[str]:
  """PNG curves of ``train/<m>`` and ``eval/<m>`` against step, in ``workdir/plots``.

  Returns the written paths (one per metric that has data).
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_jsonl(os.path.join(workdir, JSONL_NAME))
  series: Dict[str, List[Tuple[int, float]]] = collections.defaultdict(list)
  for r in records:
    for k, v in r.items():
      if k != "step":
        series[k].append((r["step"], v))
  out_dir = os.path.join(workdir, PLOTS_DIR)
  paths = []
  for name in metrics:
    keys = [k for k in sorted(series) if k.split("/", 1)[-1] == name]
    if not keys:
      continue
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
      steps, values = zip(*series[k])
      ax.plot(steps, values, label=k, marker="o" if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(out_dir, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths


def mean_metrics(records: Iterable[Mapping[str, float]]) -> Dict[str, float]:
  """Mean of each key over ``records`` (for interval summaries)."""
  sums, counts = collections.defaultdict(float), collections.defaultdict(int)
  for r in records:
    for k, v in r.items():
      sums[k] += v
      counts[k] += 1
  return {k: sums[k] / counts[k] for k in sums}

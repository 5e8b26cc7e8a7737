"""Runs a config's sweep (one pipeline per entry, or arm) and merges the results.

    python experiments/sweep.py --config configs/arith_fcp.py --workdir runs/sweep
    python experiments/sweep.py --config configs/arith_fcp.py:runlocal --workdir /tmp/s \\
        --sweep "seed=0,ternary=False;seed=0,ternary=True" --parallel 2
    python experiments/sweep.py --config configs/arith_fcp.py --workdir runs/tune \\
        --family tune_grpo --print_commands

Each entry of ``get_sweep(family)`` (or of ``--sweep``, entries separated by ``;``) is a
config arg string joined to the base arg (``runlocal,seed=1,ternary=False``), or a dict
``{"arg": ..., "overrides": ["grpo.optim.lr=1e-4", ...]}``; its label is the arg and the
overrides joined by ``|`` (``seed=0|grpo.optim.lr=1e-4``, a form ``--sweep`` accepts
too). Its pipeline runs in ``WORKDIR/<entry>-<hash of its resolved config, overrides
included>`` and is resumable like any pipeline. Every arm keeps its stages in one store
(``WORKDIR/stages``), so arms that differ only downstream share their warm-up and
collection; two arms that reach one stage at once serialise on the stage's lock.
``--config.k=v`` overrides apply to every arm.

Running:

* by default the arms run one after the other in this process;
* ``--parallel N`` runs up to N arms at once, each a process of its own
  (``sweep.py --arm LABEL``) logging to ``WORKDIR/logs/<arm>.log``; JAX's GPU memory
  preallocation is off in them unless ``XLA_PYTHON_CLIENT_PREALLOCATE`` is set (a TPU
  host serves one process: launch its arms with ``--print_commands``);
* each arm's experiment shares its later stages among ``config.stage_workers``
  processes of its own (``fcp_jax.stage_workers``; 2 on a CPU host by default);
* ``--arm LABEL`` runs that one arm (into the same workdir and store) and merges
  nothing; ``--print_commands`` prints the ``--arm`` command of every arm, then the
  ``--merge_only`` command that merges their results, and runs nothing;
* ``--merge_only`` merges the ``results.json`` the arms have written.

An arm that fails does not stop the others: the merge keeps the arms that finished,
``sweep.json`` lists the failed (or, with ``--merge_only``, missing) ones and the command
exits non-zero.

The merged table groups arms by everything except the seed and reports, per method and
condition, the mean accuracy over seeds ± the half-width of its 95% confidence interval
(Student t with n - 1 degrees of freedom), n and the per-seed range; a group of one seed
has no interval (``n=1``). Also the per-method budget (``budget.methods``) as the mean
over seeds, the split and the CPU the arms ran on: ``WORKDIR/sweep.json``, ``sweep.md``
and ``sweep.png`` (``sweep_FAMILY.*`` for ``--family FAMILY``, so families can share a
workdir and its store). When every arm evaluated the validation split (a tuning family), a
selection table names each method's best group by its mean accuracy under its native
condition; arms on the test split are never selected on.
"""

import collections
import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import flags
from absl import logging
import ml_collections
import numpy as np

from fcp_jax import compile_cache
from fcp_jax import config_lib
from fcp_jax import host

# 0.975 quantiles of Student's t by degrees of freedom, for when scipy is missing.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
# results.json ``budget.methods`` fields merged as the mean over seeds, with headers.
BUDGET_FIELDS = {"samples": "generated samples", "updates": "updates",
                 "loss_tokens": "loss tokens", "input_tokens": "input tokens",
                 "references": "references", "seconds": "seconds"}
STATS_NOTE = ("Accuracy %: mean over seeds ± half-width of its 95% confidence interval "
              "(Student t, n - 1 dof), n seeds and the per-seed range min..max; one seed "
              "(n=1) has no interval.")
BUDGET_NOTE = ("Budget per method (mean over seeds; what each method consumed beyond "
               "the shared warm-up, the warm-up its own).")
ARM_INFO = "sweep_arm.json"  # In each arm's workdir: the machine it ran on.
SCRIPT = os.path.relpath(os.path.abspath(__file__))
FLAGS = ("config", "workdir", "sweep", "family", "parallel", "arm", "merge_only",
         "print_commands")
BOOL_FLAGS = ("merge_only", "print_commands")
USAGE = ("Usage: sweep.py --config=path.py[:arg] --workdir=DIR [--sweep='a=1;a=2' | "
         "--family=NAME] [--parallel=N | --print_commands | --merge_only | --arm=LABEL] "
         "[--config.k=v ...]")


# ---------------------------------------------------------------------------------------
# Entries and arms.
# ---------------------------------------------------------------------------------------


def entry_parts(entry: Any) -> Tuple[str, List[str]]:
  """``(arg, overrides)`` of a sweep entry: an arg string or ``{"arg", "overrides"}``."""
  if isinstance(entry, str):
    return entry, []
  unknown = set(entry) - {"arg", "overrides"}
  if unknown:
    raise ValueError(f"Sweep entry {entry!r}: unknown fields {sorted(unknown)}; use "
                     "'arg' and 'overrides'.")
  return entry.get("arg", ""), list(entry.get("overrides", ()))


def entry_label(entry: Any) -> str:
  """``seed=0,ternary=True`` or ``seed=0|grpo.optim.lr=1e-4|...``."""
  arg, overrides = entry_parts(entry)
  return "|".join([arg, *overrides]) if overrides else arg


def entry_from_label(label: str) -> Any:
  """The entry that ``label`` is the label of (``entry_label``'s inverse)."""
  arg, *overrides = label.split("|")
  return dict(arg=arg, overrides=overrides) if overrides else arg


def entry_name(arg: str, config=None) -> str:
  """``seed-0_ternary-True``, plus ``-<hash>`` of the resolved ``config`` when given."""
  name = re.sub(r"[^A-Za-z0-9.-]+", "_", arg.replace("=", "-")).strip("_")[:80]
  name = name or "default"
  if config is None:
    return name
  text = json.dumps(config_lib.to_dict(config), sort_keys=True)
  return f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def group_key(label: str) -> str:
  """The entry's label without ``seed=...`` (entries differing only in seed group)."""
  arg, *overrides = label.split("|")
  arg = ",".join(p for p in arg.split(",") if p and not p.startswith("seed="))
  return "|".join(p for p in [arg, *overrides] if p) or "base"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One entry of a sweep, resolved: its label, config and workdir."""
  label: str
  config: ml_collections.ConfigDict
  workdir: str

  @property
  def name(self) -> str:
    return os.path.basename(self.workdir)


def resolve_arms(config_path: str, base_arg: str, sweep: Sequence[Any], workdir: str,
                 overrides: Sequence[str] = ()) -> List[Arm]:
  """Each entry's config (base arg + its arg; ``overrides``, then its own) and workdir."""
  if not sweep:
    raise ValueError("The sweep has no entries.")
  arms = []
  for entry in sweep:
    arg, entry_overrides = entry_parts(entry)
    label = entry_label(entry)
    if entry_parts(entry_from_label(label)) != (arg, entry_overrides):
      raise ValueError(f"Sweep entry {entry!r}: its label {label!r} does not name it "
                       "back ('|' in an override?); an arm is launched by its label.")
    config = config_lib.load_config(
        f"{config_path}:{','.join(a for a in (base_arg, arg) if a)}")
    config_lib.apply_overrides(config, list(overrides) + entry_overrides)
    arms.append(Arm(label, config, os.path.join(workdir, entry_name(label, config))))
  labels = [a.label for a in arms]
  if len(set(labels)) != len(labels):
    raise ValueError(f"Sweep entries repeat labels: {sorted(labels)}.")
  return arms


# ---------------------------------------------------------------------------------------
# Statistics over seeds and the merge.
# ---------------------------------------------------------------------------------------


def t_quantile_975(dof: int) -> float:
  """Student t's 0.975 quantile: scipy's, else ``T_975`` (dof > 30: 30's, a bit wide)."""
  try:
    from scipy import stats  # pylint: disable=g-import-not-at-top
  except ImportError:
    return T_975[min(dof, len(T_975)) - 1]
  return float(stats.t.ppf(0.975, dof))


def seed_stats(values: Sequence[float], seeds: Sequence[Any] = ()) -> Dict[str, Any]:
  """Mean, 95% CI half-width (Student t, n - 1 dof), sample std, n, range, values.

  ``ci95`` and ``std`` are None for one value: one seed says nothing of the spread.
  """
  x = np.asarray(values, dtype=np.float64)  # [n]
  n = len(x)
  std = float(x.std(ddof=1)) if n > 1 else None
  ci95 = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
  return dict(mean=float(x.mean()), ci95=ci95, std=std, n=n, min=float(x.min()),
              max=float(x.max()), values=[float(v) for v in x], seeds=list(seeds))


def _grouped(entries: Mapping[str, Mapping[str, Any]]
             ) -> Dict[str, List[Mapping[str, Any]]]:
  grouped: Dict[str, List[Mapping[str, Any]]] = collections.defaultdict(list)
  for label, res in entries.items():
    grouped[group_key(label)].append(res)
  return dict(grouped)


def merge(entries: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """``{label: results.json}`` -> ``{group: {method: {condition: seed_stats}}}``.

  Each method's table also names its ``native`` condition.
  """
  out: Dict[str, Any] = {}
  for group, runs in _grouped(entries).items():
    table: Dict[str, Dict[str, Any]] = {}
    seeds = [r.get("seed") for r in runs]
    for method, first in runs[0]["eval"].items():
      table[method] = {c: seed_stats([r["eval"][method][c]["accuracy"] for r in runs],
                                     seeds)
                       for c, v in first.items() if isinstance(v, dict)}
      table[method]["native"] = first.get("native")
    out[group] = table
  return out


def merge_budgets(entries: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """``{group: {method: {field: mean over seeds}}}`` of results' ``budget.methods``."""
  out: Dict[str, Any] = {}
  for group, runs in _grouped(entries).items():
    per_run = [r.get("budget", {}).get("methods", {}) for r in runs]
    out[group] = {method: {k: float(np.mean([p[method][k] for p in per_run]))
                           for k in BUDGET_FIELDS}
                  for method in per_run[0] if all(method in p for p in per_run)}
  return out


def native(row: Mapping[str, Any]) -> Dict[str, Any]:
  """A method row's statistics under its native condition."""
  return row[row["native"]]


def conditions_of(table: Mapping[str, Any]) -> List[str]:
  return [c for c in next(iter(table.values())) if c != "native"]


def select(merged: Mapping[str, Any]) -> Dict[str, Any]:
  """Per method, the group with the best mean accuracy under its native condition."""
  out = {}
  methods = {m for table in merged.values() for m in table}
  for method in sorted(methods):
    scored = [(native(table[method])["mean"], group)
              for group, table in merged.items() if method in table]
    _, group = max(scored)
    out[method] = dict(native(merged[group][method]), group=group, groups=len(scored))
  return out


# ---------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------


def format_stats(s: Mapping[str, Any]) -> str:
  """``60.0 ± 12.4 (n=3; 50.0..70.0)`` in %, or ``50.0 (n=1)``."""
  if s["ci95"] is None:
    return f"{100 * s['mean']:.1f} (n={s['n']})"
  return (f"{100 * s['mean']:.1f} ± {100 * s['ci95']:.1f} (n={s['n']}; "
          f"{100 * s['min']:.1f}..{100 * s['max']:.1f})")


def accuracy_markdown(table: Mapping[str, Any]) -> str:
  """One group's methods × conditions table."""
  conditions = conditions_of(table)
  lines = ["| method | native | " + " | ".join(conditions) + " |",
           "|---|---|" + "---|" * len(conditions)]
  for method, row in table.items():
    lines.append(f"| {method} | {row['native']} | "
                 + " | ".join(format_stats(row[c]) for c in conditions) + " |")
  return "\n".join(lines) + "\n"


def budget_markdown(budget: Mapping[str, Mapping[str, float]]) -> str:
  """One group's per-method budget table (means over seeds)."""
  lines = ["| method | " + " | ".join(BUDGET_FIELDS.values()) + " |",
           "|---|" + "---|" * len(BUDGET_FIELDS)]
  for method, b in budget.items():
    lines.append(f"| {method} | " + " | ".join(f"{b[k]:,.0f}" for k in BUDGET_FIELDS)
                 + " |")
  return "\n".join(lines) + "\n"


def merged_markdown(merged: Mapping[str, Any], split: str = "test",
                    budgets: Optional[Mapping[str, Any]] = None,
                    machine: str = "") -> str:
  """``sweep.md``'s tables: accuracy (and budget) per group."""
  lines = [f"# Sweep: accuracy % on the {split} split", "", f"Split: {split}."
           + (f" {machine}" if machine else ""), "", STATS_NOTE, ""]
  for group, table in merged.items():
    lines += [f"## {group}", "", accuracy_markdown(table)]
    if budgets and budgets.get(group):
      lines += [BUDGET_NOTE, "", budget_markdown(budgets[group])]
  return "\n".join(lines)


def selection_markdown(selection: Mapping[str, Any]) -> str:
  lines = ["## Selection (validation split; best mean under the native condition)", "",
           STATS_NOTE, "", "| method | selected | accuracy % | groups compared |",
           "|---|---|---|---|"]
  for method, s in selection.items():
    lines.append(f"| {method} | `{s['group']}` | {format_stats(s)} | {s['groups']} |")
  return "\n".join(lines) + "\n"


def failures_markdown(failed: Mapping[str, str]) -> str:
  lines = ["## Arms without results (not merged)", ""]
  lines += [f"- `{label}`: {why}" for label, why in failed.items()]
  return "\n".join(lines) + "\n"


def cpu_name() -> str:
  """This machine's CPU: ``lscpu``'s "Model name", else ``platform.processor()``."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
  except OSError:
    out = ""
  for line in out.splitlines():
    key, _, value = line.partition(":")
    if key.strip() == "Model name" and value.strip():
      return value.strip()
  return platform.processor() or platform.machine() or "unknown"


def machine_line(infos: Mapping[str, Optional[Mapping[str, Any]]]) -> str:
  """``CPU: X; devices: 8 × cpu`` of the arms (``{label: ARM_INFO or None}``).

  Arms on different machines (or run by other means, which record none) are counted
  per machine; when no arm recorded one the line names this machine's CPU.
  """
  known = collections.Counter(
      f"CPU: {i['cpu']}; devices: {i['devices']}" for i in infos.values() if i)
  missing = sum(not i for i in infos.values())
  if not known:
    return f"CPU (of the merging machine; the arms recorded none): {cpu_name()}."
  if len(known) == 1 and not missing:
    return next(iter(known)) + "."
  counts = list(known.items()) + ([("not recorded", missing)] if missing else [])
  return "Machines: " + "; ".join(f"{m} ({n} arm{'s' * (n != 1)})"
                                  for m, n in counts) + "."


def plot(merged: Mapping[str, Any], path: str) -> str:
  """Native-condition accuracy per method ± 95% CI, one bar group per sweep group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = list(merged)
  methods = list(next(iter(merged.values())))
  width = 0.8 / max(len(groups), 1)
  fig, ax = plt.subplots(figsize=(8, 4))
  for j, g in enumerate(groups):
    cells = [native(merged[g][m]) for m in methods]
    means = [100 * s["mean"] for s in cells]
    cis = [np.nan if s["ci95"] is None else 100 * s["ci95"] for s in cells]
    ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=cis, capsize=3,
           label=g)
  ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
  ax.set_xticklabels(methods)
  ax.set_ylabel("accuracy % (native condition; 95% CI)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------
# Running arms.
# ---------------------------------------------------------------------------------------


class ArmsFailedError(RuntimeError):
  """Some arms have no results; the merge of the others was written to ``paths``."""

  def __init__(self, failed: Mapping[str, str], paths: Optional[Mapping[str, str]]):
    super().__init__(f"{len(failed)} sweep arm(s) without results: "
                     + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    self.failed, self.paths = dict(failed), paths


def _duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=round(seconds)))


class Progress:
  """Logs ``arms done / total``, the elapsed time and an ETA at each finished arm.

  The ETA is the mean duration of the arms done so far times the arms left, over the
  number of ``workers`` that run them.
  """

  def __init__(self, total: int, workers: int = 1):
    self.total, self.workers, self.done, self.failed = total, workers, 0, 0
    self.seconds = 0.0  # Summed over the arms done.
    self.t0 = time.perf_counter()

  def finished(self, label: str, error: Optional[str], seconds: float):
    self.done += 1
    self.failed += error is not None
    self.seconds += seconds
    elapsed = time.perf_counter() - self.t0
    eta = self.seconds / self.done * (self.total - self.done) / self.workers
    logging.info("Sweep: arm %s %s; %d/%d arms done (%d failed), %s elapsed, ETA %s.",
                 label, "FAILED: " + error if error else "done", self.done, self.total,
                 self.failed, _duration(elapsed), _duration(eta))


def store_of(workdir: str) -> str:
  return os.path.join(workdir, "stages")


def run_arm(arm: Arm, store: str) -> Dict[str, Any]:
  """Runs (or resumes) one arm's pipeline in this process; records its machine."""
  from fcp_jax import experiment  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  logging.info("Sweep arm %s in %s", arm.label, arm.workdir)
  results = experiment.run(arm.config, arm.workdir, store=store)
  kinds = collections.Counter(d.device_kind for d in jax.devices())
  with open(os.path.join(arm.workdir, ARM_INFO), "w") as f:
    json.dump(dict(label=arm.label, cpu=cpu_name(), devices=", ".join(
        f"{n} × {k}" for k, n in kinds.items())), f, indent=2)
  return results


def sweep_command(config_spec: str, workdir: str, mode: Sequence[str],
                  overrides: Sequence[str], python: str = "python") -> List[str]:
  """``python sweep.py --config=.. --workdir=.. <mode flags> --config.k=v ...``."""
  return [python, SCRIPT, f"--config={config_spec}", f"--workdir={workdir}", *mode,
          *(f"--config.{o}" for o in overrides)]


def arm_command(config_spec: str, workdir: str, label: str, overrides: Sequence[str],
                python: str = "python") -> List[str]:
  """The command that runs arm ``label`` alone, into ``workdir`` and its store."""
  return sweep_command(config_spec, workdir, [f"--arm={label}"], overrides, python)


def _run_sequentially(arms: Sequence[Arm], store: str, progress: Progress
                      ) -> Dict[str, str]:
  failed = {}
  for arm in arms:
    t0 = time.perf_counter()
    try:
      run_arm(arm, store)
    except Exception as e:  # pylint: disable=broad-except
      logging.error("Sweep arm %s failed:\n%s", arm.label, traceback.format_exc())
      failed[arm.label] = f"{type(e).__name__}: {e}"
    progress.finished(arm.label, failed.get(arm.label), time.perf_counter() - t0)
  return failed


def _run_subprocess(arm: Arm, command: Sequence[str], log_path: str
                    ) -> Tuple[Optional[str], float]:
  """Runs ``command``, its output appended to ``log_path``.

  Returns (None, or what went wrong: the exit code, the log's last line and its path;
  seconds).
  """
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # GPUs shared by N arms.
  t0 = time.perf_counter()
  with open(log_path, "a") as log:
    log.write(f"\n=== {datetime.datetime.now().isoformat()} {shlex.join(command)}\n")
    log.flush()
    rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                        check=False).returncode
  seconds = time.perf_counter() - t0
  if rc == 0:
    return None, seconds
  with open(log_path) as f:
    tail = [line.rstrip() for line in f.readlines()[-20:]]
  logging.error("Sweep arm %s exited with %d; end of %s:\n%s", arm.label, rc, log_path,
                "\n".join(tail))
  last = next((line for line in reversed(tail) if line.strip()), "")
  return f"exit code {rc} ({last.strip()[:200]}); log {log_path}", seconds


def _run_in_parallel(arms: Sequence[Arm], commands: Mapping[str, Sequence[str]],
                     logs_dir: str, parallel: int, progress: Progress) -> Dict[str, str]:
  os.makedirs(logs_dir, exist_ok=True)
  failed = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = {}
    for arm in arms:
      log_path = os.path.join(logs_dir, f"{arm.name}.log")
      logging.info("Sweep arm %s: queued (log %s).", arm.label, log_path)
      futures[pool.submit(_run_subprocess, arm, commands[arm.label], log_path)] = arm
    for future in concurrent.futures.as_completed(futures):
      label = futures[future].label
      try:
        error, seconds = future.result()
      except Exception as e:  # pylint: disable=broad-except
        error, seconds = f"{type(e).__name__}: {e}", 0.0  # The process did not start.
      if error:
        failed[label] = error
      progress.finished(label, error, seconds)
  return {a.label: failed[a.label] for a in arms if a.label in failed}


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def merged_name(family: Optional[str] = None) -> str:
  """The merged files' stem: ``sweep``, or ``sweep_FAMILY`` for a config's family."""
  return f"sweep_{family}" if family else "sweep"


def write_merged(workdir: str, arms: Sequence[Arm], failed: Mapping[str, str],
                 name: str = "sweep"
                 ) -> Tuple[Dict[str, Any], Dict[str, str], Dict[str, str]]:
  """Merges the ``results.json`` of ``arms`` not in ``failed`` into ``WORKDIR/NAME.*``.

  Returns (merged, paths, failed): arms with no ``results.json`` join ``failed``.
  Nothing is written when no arm has results.
  """
  failed = dict(failed)
  entries, infos = {}, {}
  for arm in arms:
    if arm.label in failed:
      continue
    results = _read_json(os.path.join(arm.workdir, "results.json"))
    if results is None:
      failed[arm.label] = f"no results.json in {arm.workdir}"
      continue
    entries[arm.label] = results
    infos[arm.label] = _read_json(os.path.join(arm.workdir, ARM_INFO))
  if not entries:
    return {}, {}, failed
  splits = {res["split"] for res in entries.values()}
  if len(splits) != 1:
    raise ValueError(f"Sweep arms evaluated different splits {sorted(splits)}; "
                     "merge runs of one split only.")
  split = splits.pop()
  merged, budgets = merge(entries), merge_budgets(entries)
  # Tuning reads validation only: a selection is made from validation results alone.
  selection = select(merged) if split == "validation" else None
  machine = machine_line(infos)
  paths = {ext: os.path.join(workdir, f"{name}.{ext}") for ext in ("json", "md", "png")}
  arms_json = {a.label: dict(workdir=a.workdir, seed=entries[a.label].get("seed"),
                             group=group_key(a.label), machine=infos[a.label])
               for a in arms if a.label in entries}
  with open(paths["json"], "w") as f:
    json.dump(dict(split=split, machine=machine, arms=arms_json, groups=merged,
                   budget=budgets, selection=selection, failed=failed), f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(merged_markdown(merged, split, budgets, machine))
    if selection:
      f.write("\n" + selection_markdown(selection))
    if failed:
      f.write("\n" + failures_markdown(failed))
  plot(merged, paths["png"])
  return merged, paths, failed


def run_sweep(config_path: str, base_arg: str, sweep: Sequence[Any], workdir: str,
              overrides: Sequence[str] = (), *, parallel: int = 1,
              merge_only: bool = False, name: str = "sweep"
              ) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """Runs every arm (``parallel`` at once), then merges; returns (merged, paths).

  ``parallel=1`` runs the arms one after the other in this process, more run as
  processes of their own. ``merge_only`` merges the arms' results as they are, into
  ``WORKDIR/NAME.*`` (``merged_name``). Raises
  ``ArmsFailedError`` (after merging the others) when an arm failed or has no results.
  """
  if parallel < 1:
    raise ValueError(f"--parallel={parallel}: needs at least 1.")
  arms = resolve_arms(config_path, base_arg, sweep, workdir, overrides)
  failed: Dict[str, str] = {}
  if not merge_only:
    parallel = min(parallel, len(arms))
    progress = Progress(len(arms), parallel)
    if parallel == 1:
      failed = _run_sequentially(arms, store_of(workdir), progress)
    else:
      spec = f"{config_path}:{base_arg}" if base_arg else config_path
      commands = {a.label: arm_command(spec, workdir, a.label, overrides, sys.executable)
                  for a in arms}
      failed = _run_in_parallel(arms, commands, os.path.join(workdir, "logs"), parallel,
                                progress)
  merged, paths, failed = write_merged(workdir, arms, failed, name)
  if failed:
    raise ArmsFailedError(failed, paths or None)
  return merged, paths


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def parse_argv(argv: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
  """``(flags, overrides)``; ``BOOL_FLAGS`` may stand alone (``--merge_only``)."""
  rest, overrides = config_lib.split_overrides(list(argv))
  bools = {}
  for name in BOOL_FLAGS:
    for a in [a for a in rest if a == f"--{name}" or a.startswith(f"--{name}=")]:
      rest.remove(a)
      _, eq, value = a.partition("=")
      bools[name] = config_lib.parse_bool(value, f"--{name}") if eq else True
  opts = dict(config_lib.parse_flags(rest), **bools)
  unknown = set(opts) - set(FLAGS)
  if unknown:
    raise ValueError(f"Unknown flags {sorted(unknown)}. {USAGE}")
  if not opts.get("config") or not opts.get("workdir"):
    raise ValueError(USAGE)
  try:
    opts["parallel"] = int(opts.get("parallel", 1))
  except ValueError:
    raise ValueError(f"--parallel={opts['parallel']!r} is not an integer.") from None
  modes = [f for f in ("arm", "merge_only", "print_commands") if opts.get(f)]
  modes += ["parallel"] if opts["parallel"] > 1 else []
  if len(modes) > 1:
    raise ValueError(f"--{', --'.join(modes)}: use at most one of them.")
  if "arm" in opts and ({"sweep", "family"} & set(opts)):
    raise ValueError("--arm names its entry itself; drop --sweep and --family.")
  return opts, overrides


def sweep_entries(config_path: str, opts: Mapping[str, Any]) -> List[Any]:
  """``--sweep``'s entries (labels separated by ``;``), else ``get_sweep(--family)``."""
  if "sweep" in opts:
    return [entry_from_label(label) for label in opts["sweep"].split(";")]
  return _load_module(config_path).get_sweep(opts.get("family") or None)


def launch_commands(opts: Mapping[str, Any], overrides: Sequence[str]) -> List[str]:
  """One shell command per arm, then the command that merges their results."""
  config_path, _, base_arg = opts["config"].partition(":")
  sweep = sweep_entries(config_path, opts)
  arms = resolve_arms(config_path, base_arg, sweep, opts["workdir"], overrides)
  commands = [arm_command(opts["config"], opts["workdir"], a.label, overrides)
              for a in arms]
  selection = ([f"--sweep={opts['sweep']}"] if "sweep" in opts else
               [f"--family={opts['family']}"] if opts.get("family") else [])
  commands.append(sweep_command(opts["config"], opts["workdir"],
                                [*selection, "--merge_only"], overrides))
  return [shlex.join(c) for c in commands]


def main(argv: Sequence[str]) -> int:
  host.tune_malloc()  # Before the first JAX computation; see fcp_jax/host.py.
  compile_cache.enable()  # Arms share compiled programs; see fcp_jax/compile_cache.py.
  opts, overrides = parse_argv(argv)
  config_path, _, base_arg = opts["config"].partition(":")
  if opts.get("print_commands"):
    print("\n".join(launch_commands(opts, overrides)))
    return 0
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  workdir = opts["workdir"]
  if "arm" in opts:
    arm, = resolve_arms(config_path, base_arg, [entry_from_label(opts["arm"])], workdir,
                        overrides)
    run_arm(arm, store_of(workdir))
    print(os.path.join(arm.workdir, "results.json"))
    return 0
  failure = None
  try:
    _, paths = run_sweep(config_path, base_arg, sweep_entries(config_path, opts),
                         workdir, overrides, parallel=opts["parallel"],
                         merge_only=bool(opts.get("merge_only")),
                         name=merged_name(opts.get("family")))
  except ArmsFailedError as e:
    failure, paths = e, e.paths
    logging.error("%s", e)
  if paths:
    with open(paths["md"]) as f:
      print(f.read())
    print(paths)
  return 1 if failure else 0


def _load_module(path: str):
  return config_lib.load_module(path)  # A config may import its siblings.


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

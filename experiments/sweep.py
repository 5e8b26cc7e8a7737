"""Runs a config's sweep locally (one pipeline per entry) and merges the results.

    python experiments/sweep.py --config configs/arith_fcp.py --workdir runs/sweep
    python experiments/sweep.py --config configs/arith_fcp.py:runlocal --workdir /tmp/s \\
        --sweep "seed=0,ternary=False;seed=0,ternary=True"

    python experiments/sweep.py --config configs/arith_fcp.py --workdir runs/tune \
        --family tune_grpo

Each entry of ``get_sweep(family)`` (or of ``--sweep``, entries separated by ``;``) is a
config arg string joined to the base arg (``runlocal,seed=1,ternary=False``), or a dict
``{"arg": ..., "overrides": ["grpo.optim.lr=1e-4", ...]}``; its pipeline runs in
``WORKDIR/<entry>-<hash of its resolved config, overrides included>`` and is resumable
like any pipeline. Every entry keeps its stages in one store (``WORKDIR/stages``), so
entries that differ only downstream share their warm-up and collection. The merged
table groups entries by everything except the seed and reports mean ± std over seeds
of each method's accuracy under each condition, on the split the entries evaluated:
``WORKDIR/sweep.json``, ``sweep.md`` and ``sweep.png``. When every entry evaluated the
validation split (a tuning family), a selection table names each method's best group
by its mean accuracy under its native condition; entries on the test split are never
selected on. ``--config.k=v`` overrides apply to every entry.
"""

import collections
import hashlib
import json
import os
import re
import sys
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from absl import flags
from absl import logging
import numpy as np

from fcp_jax import config_lib
from fcp_jax import experiment


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


def select(merged: Mapping[str, Any]) -> Dict[str, Any]:
  """Per method, the group with the best mean accuracy under its native condition."""
  out = {}
  methods = {m for table in merged.values() for m in table}
  for method in sorted(methods):
    scored = [(table[method][table[method]["native"]]["mean"], group)
              for group, table in merged.items() if method in table]
    best, group = max(scored)
    cell = merged[group][method][merged[group][method]["native"]]
    out[method] = dict(group=group, mean=best, std=cell["std"], seeds=cell["seeds"],
                       groups=len(scored))
  return out


def selection_markdown(selection: Mapping[str, Any]) -> str:
  lines = ["## Selection (validation split; native condition, mean ± std over seeds)",
           "", "| method | selected | accuracy % | groups compared |", "|---|---|---|---|"]
  for method, s in selection.items():
    lines.append(f"| {method} | `{s['group']}` | {100 * s['mean']:.1f} ± "
                 f"{100 * s['std']:.1f} (n={s['seeds']}) | {s['groups']} |")
  return "\n".join(lines) + "\n"


def merge(entries: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """``{arg: results.json}`` -> ``{group: {method: {condition: stats over seeds}}}``."""
  grouped: Dict[str, List[Mapping[str, Any]]] = collections.defaultdict(list)
  for arg, res in entries.items():
    grouped[group_key(arg)].append(res)
  out: Dict[str, Any] = {}
  for group, runs in grouped.items():
    table: Dict[str, Dict[str, Any]] = {}
    methods = runs[0]["eval"].keys()
    for method in methods:
      table[method] = {}
      conditions = [c for c, v in runs[0]["eval"][method].items() if isinstance(v, dict)]
      for c in conditions:
        accs = np.asarray([r["eval"][method][c]["accuracy"] for r in runs])  # [S]
        table[method][c] = dict(mean=float(accs.mean()), std=float(accs.std()),
                                values=[float(a) for a in accs], seeds=len(accs))
      table[method]["native"] = runs[0]["eval"][method].get("native")
    out[group] = table
  return out


def merged_markdown(merged: Mapping[str, Any], split: str = "test") -> str:
  lines = [f"# Sweep: accuracy % on the {split} split (mean ± std over seeds)", ""]
  for group, table in merged.items():
    conditions = [c for c in next(iter(table.values())) if c != "native"]
    lines += [f"## {group}", "", "| method | " + " | ".join(conditions) + " |",
              "|---|" + "---|" * len(conditions)]
    for method, row in table.items():
      cells = [f"{100 * row[c]['mean']:.1f} ± {100 * row[c]['std']:.1f} "
               f"(n={row[c]['seeds']})" for c in conditions]
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def plot(merged: Mapping[str, Any], path: str) -> str:
  """Native-condition accuracy per method, one bar group per sweep group."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = list(merged)
  methods = list(next(iter(merged.values())))
  width = 0.8 / max(len(groups), 1)
  fig, ax = plt.subplots(figsize=(8, 4))
  for j, g in enumerate(groups):
    rows = [merged[g][m] for m in methods]
    means = [100 * r[r["native"]]["mean"] for r in rows]
    stds = [100 * r[r["native"]]["std"] for r in rows]
    ax.bar(np.arange(len(methods)) + j * width, means, width, yerr=stds, capsize=3,
           label=g)
  ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
  ax.set_xticklabels(methods)
  ax.set_ylabel("accuracy % (native condition)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def run_sweep(config_path: str, base_arg: str, sweep: Sequence[Any], workdir: str,
              overrides: Sequence[str] = ()) -> Tuple[Dict[str, Any], Dict[str, str]]:
  """Runs every entry's pipeline, then writes the merged files; returns (merged, paths)."""
  entries = {}
  for entry in sweep:
    arg, entry_overrides = entry_parts(entry)
    full = ",".join(a for a in (base_arg, arg) if a)
    config = config_lib.load_config(f"{config_path}:{full}")
    config_lib.apply_overrides(config, list(overrides) + entry_overrides)
    label = entry_label(entry)
    logging.info("Sweep entry %s", label)
    entries[label] = experiment.run(
        config, os.path.join(workdir, entry_name(label, config)),
        store=os.path.join(workdir, "stages"))
  splits = {res["split"] for res in entries.values()}
  if len(splits) != 1:
    raise ValueError(f"Sweep entries evaluated different splits {sorted(splits)}; "
                     "merge runs of one split only.")
  split = splits.pop()
  merged = merge(entries)
  # Tuning reads validation only: a selection is made from validation results alone.
  selection = select(merged) if split == "validation" else None
  paths = {"json": os.path.join(workdir, "sweep.json"),
           "md": os.path.join(workdir, "sweep.md"),
           "png": os.path.join(workdir, "sweep.png")}
  with open(paths["json"], "w") as f:
    json.dump(dict(split=split, groups=merged, selection=selection), f, indent=2)
  with open(paths["md"], "w") as f:
    f.write(merged_markdown(merged, split))
    if selection:
      f.write("\n" + selection_markdown(selection))
  plot(merged, paths["png"])
  return merged, paths


def main(argv: Sequence[str]):
  rest, overrides = config_lib.split_overrides(list(argv))
  opts = config_lib.parse_flags(rest)
  spec, workdir = opts.get("config", ""), opts.get("workdir", "")
  if not spec or not workdir:
    raise ValueError("Usage: sweep.py --config=path.py[:arg] --workdir=DIR "
                     "[--sweep='a=1;a=2' | --family=NAME] [--config.k=v ...]")
  unknown = set(opts) - {"config", "workdir", "sweep", "family"}
  if unknown:
    raise ValueError(f"Unknown flags {sorted(unknown)}; expected --config, --workdir, "
                     "--sweep, --family and --config.k=v.")
  config_path, _, base_arg = spec.partition(":")
  if "sweep" in opts:
    sweep = opts["sweep"].split(";")
  else:
    sweep = _load_module(config_path).get_sweep(opts.get("family") or None)
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  _, paths = run_sweep(config_path, base_arg, sweep, workdir, overrides)
  with open(paths["md"]) as f:
    print(f.read())
  print(paths)


def _load_module(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


if __name__ == "__main__":
  main(sys.argv[1:])

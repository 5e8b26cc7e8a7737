"""Writes a README results section from a sweep's merged results (test split only).

    python experiments/results_readme.py --sweep_json runs/sweep/sweep.json
    python experiments/results_readme.py --sweep_json runs/sweep --out results.md
    python experiments/results_readme.py --sweep_json runs/sweep --readme README.md
    python experiments/results_readme.py \
        --sweep_json runs/sweep,runs/sweep/sweep_arms.json --readme README.md

Reads ``sweep.json`` (``experiments/sweep.py``; a sweep workdir names its
``sweep.json``; a comma list of them gives one section each, in order: the default
sweep, then families' ``sweep_FAMILY.json``) and writes markdown: per group, the methods × conditions table (mean
± 95% CI half-width over seeds, n, per-seed range), the per-method budget, the machine
and the seeds, and per method a sentence comparing its native-condition accuracy with
FCP + bootstrap's: it *wins* when its interval lies wholly above, *loses* when wholly
below, and *ties* when the two intervals overlap (a group of one seed has no interval,
so nothing is claimed). The methods of one seed share its warm-up, so the sentence also
gives the difference paired by seed (mean ± 95% CI of the per-seed differences), with
its own verdict: wins or loses when that interval excludes 0. ``GAINS`` adds the same
paired difference for the bootstrap against offline FCP. Validation sweeps (tuning)
are refused: reported numbers come from the test split.

The section goes to stdout, to ``--out``, or with ``--readme`` replaces the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in that file (an error if the
markers are missing).
"""

import json
import os
import sys
from typing import Any, Dict, Mapping, Optional, Sequence

from fcp_jax import config_lib
import sweep  # experiments/sweep.py, beside this script.

REFERENCE = "fcp_bootstrap"  # The method every other one is compared with.
GAINS = (("fcp_bootstrap", "offline_fcp"),)  # (method, its baseline): paired gains.
START, END = "<!-- results:start -->", "<!-- results:end -->"
USAGE = ("Usage: results_readme.py --sweep_json=PATH[,PATH...] (sweep.json or its "
         "workdir) [--out=FILE] [--readme=README.md]")


def load_sweep(path: str) -> Dict[str, Any]:
  """A sweep's ``sweep.json`` (``path`` may be the sweep's workdir); test split only."""
  if os.path.isdir(path):
    path = os.path.join(path, "sweep.json")
  with open(path) as f:
    merged = json.load(f)
  if merged.get("split") != "test":
    raise ValueError(f"{path} holds the {merged.get('split')!r} split; results are "
                     "reported from the test split only (validation is for tuning).")
  return merged


def _interval(s: Mapping[str, Any]):
  return s["mean"] - s["ci95"], s["mean"] + s["ci95"]


def verdict(s: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
  """``wins`` / ``ties (CIs overlap)`` / ``loses`` of stats ``s`` against ``ref``."""
  if s["ci95"] is None or ref["ci95"] is None:
    return "cannot be compared (n=1: no confidence interval)"
  (lo, hi), (ref_lo, ref_hi) = _interval(s), _interval(ref)
  if lo > ref_hi:
    return "wins"
  if hi < ref_lo:
    return "loses"
  return "ties (CIs overlap)"


def paired(s: Mapping[str, Any], ref: Mapping[str, Any]) -> Dict[str, Any]:
  """``seed_stats`` of ``s - ref`` over the seeds both cells have, paired by seed."""
  ref_by_seed = dict(zip(ref["seeds"], ref["values"]))
  common = [(seed, v - ref_by_seed[seed]) for seed, v in zip(s["seeds"], s["values"])
            if seed is not None and seed in ref_by_seed]
  if not common:
    raise ValueError(f"No seed in common between seeds {s['seeds']} and {ref['seeds']}.")
  seeds, diffs = zip(*common)
  return sweep.seed_stats(diffs, seeds)


def paired_verdict(d: Mapping[str, Any]) -> str:
  """``wins`` / ``ties (CI includes 0)`` / ``loses`` of a paired difference ``d``."""
  if d["ci95"] is None:
    return "cannot be compared (n=1: no confidence interval)"
  if d["mean"] - d["ci95"] > 0:
    return "wins"
  if d["mean"] + d["ci95"] < 0:
    return "loses"
  return "ties (CI includes 0)"


def format_difference(d: Mapping[str, Any]) -> str:
  """``+3.0 ± 1.2 (n=3; +1.5..+4.0)`` percentage points."""
  if d["ci95"] is None:
    return f"{100 * d['mean']:+.1f} (n={d['n']})"
  return (f"{100 * d['mean']:+.1f} ± {100 * d['ci95']:.1f} (n={d['n']}; "
          f"{100 * d['min']:+.1f}..{100 * d['max']:+.1f})")


def comparisons(table: Mapping[str, Any]) -> Optional[str]:
  """A sentence per method on its native accuracy against ``REFERENCE``'s, and the
  paired ``GAINS``; None without ``REFERENCE``."""
  if REFERENCE not in table:
    return None
  ref = sweep.native(table[REFERENCE])
  lines = []
  for method, row in table.items():
    if method == REFERENCE:
      continue
    s = sweep.native(row)
    d = paired(s, ref)
    lines.append(f"- {method} ({row['native']}): {sweep.format_stats(s)} vs {REFERENCE} "
                 f"({table[REFERENCE]['native']}) {sweep.format_stats(ref)}: "
                 f"{verdict(s, ref)}; paired by seed {format_difference(d)} points: "
                 f"{paired_verdict(d)}.")
  for method, base in GAINS:
    if method in table and base in table:
      d = paired(sweep.native(table[method]), sweep.native(table[base]))
      lines.append(f"- {method} − {base} (native conditions), paired by seed: "
                   f"{format_difference(d)} points: {method} {paired_verdict(d)}.")
  return "\n".join(lines) + "\n"


def seeds_line(merged: Mapping[str, Any]) -> str:
  """``Seeds: 0, 1, 2 (n = 3 per group).`` of the merged cells."""
  cells = [sweep.native(row) for table in merged["groups"].values()
           for row in table.values()]
  seeds = sorted({s for c in cells for s in c["seeds"] if s is not None})
  ns = sorted({c["n"] for c in cells})
  return (f"Seeds: {', '.join(map(str, seeds))} "
          f"(n = {', '.join(map(str, ns))} per group).")


def results_section(merged: Mapping[str, Any], source: str = "",
                    title: str = "Results (test split)") -> str:
  """The markdown results section of a test-split ``sweep.json``."""
  lines = [f"### {title}", ""]
  if source:
    lines += [f"Generated by `experiments/results_readme.py` from `{source}`.", ""]
  lines += [merged.get("machine", "Machine: not recorded."), "", seeds_line(merged), "",
            sweep.STATS_NOTE, ""]
  for group, table in merged["groups"].items():
    lines += [f"#### {group}", "", sweep.accuracy_markdown(table)]
    budget = merged.get("budget", {}).get(group)
    if budget:
      lines += [sweep.BUDGET_NOTE, "", sweep.budget_markdown(budget)]
    compared = comparisons(table)
    if compared:
      lines += [f"Native-condition accuracy against {REFERENCE} (wins / ties when the "
                "95% CIs overlap / loses; then the difference paired by seed, which "
                "wins or loses when its 95% CI excludes 0):", "", compared]
  if merged.get("failed"):
    lines += [sweep.failures_markdown(merged["failed"])]
  return "\n".join(lines)


def title(path: str) -> str:
  """A section's heading: ``Results (test split)``, plus the family of ``sweep_F.json``."""
  stem = os.path.splitext(os.path.basename(path))[0] if path.endswith(".json") else ""
  family = stem[len("sweep_"):] if stem.startswith("sweep_") else ""
  return f"Results (test split){': ' + family if family else ''}"


def replace_between_markers(text: str, section: str) -> str:
  """``text`` with what lies between ``START`` and ``END`` replaced by ``section``."""
  if text.count(START) != 1 or text.count(END) != 1:
    raise ValueError(f"Expected one {START} and one {END} marker; found "
                     f"{text.count(START)} and {text.count(END)}.")
  if text.index(END) < text.index(START):
    raise ValueError(f"{END} comes before {START}.")
  head, rest = text.split(START)
  _, tail = rest.split(END)
  return f"{head}{START}\n{section.strip()}\n{END}{tail}"


def _write(path: str, text: str):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv: Sequence[str]) -> int:
  opts = config_lib.parse_flags(argv)
  unknown = set(opts) - {"sweep_json", "out", "readme"}
  if unknown or not opts.get("sweep_json"):
    raise ValueError(USAGE + (f" Unknown flags {sorted(unknown)}." if unknown else ""))
  section = "\n".join(results_section(load_sweep(path), path, title(path))
                      for path in str(opts["sweep_json"]).split(","))
  if opts.get("readme"):
    with open(opts["readme"]) as f:
      text = f.read()
    _write(opts["readme"], replace_between_markers(text, section))
  if opts.get("out"):
    _write(opts["out"], section)
  if not opts.get("readme") and not opts.get("out"):
    print(section)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

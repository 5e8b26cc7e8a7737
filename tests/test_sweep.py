"""Tests of experiments/sweep.py (statistics, merge, launch modes) and results_readme."""

import json
import math
import os
import shlex
import sys

import pytest

from fcp_jax import config_lib
from fcp_jax import experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
import results_readme  # pylint: disable=g-import-not-at-top,wrong-import-position
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = os.path.join(REPO, "configs", "arith_fcp.py")
BUDGET = dict(samples=100, updates=10.0, loss_tokens=500.0, input_tokens=900.0,
              references=8, seconds=3.0)


def _results(accs, *, seed=0, split="test", workdir="w", seconds=3.0):
  """A results.json: ``accs`` is {method: (native, {condition: accuracy})}."""
  ev = {m: dict({c: dict(accuracy=a, stderr=0.01) for c, a in conds.items()},
                native=native) for m, (native, conds) in accs.items()}
  return dict(seed=seed, split=split, workdir=workdir, eval=ev,
              budget=dict(methods={m: dict(BUDGET, seconds=seconds) for m in accs}))


def _write_results(arm, results):
  os.makedirs(arm.workdir, exist_ok=True)
  with open(os.path.join(arm.workdir, "results.json"), "w") as f:
    json.dump(dict(results, workdir=arm.workdir), f)


def test_ci_half_width_is_student_t_over_seeds():
  s = sweep.seed_stats([0.5, 0.6, 0.7], seeds=[0, 1, 2])
  assert s["mean"] == pytest.approx(0.6) and s["n"] == 3
  assert s["std"] == pytest.approx(0.1)
  assert s["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
  assert (s["min"], s["max"]) == (0.5, 0.7) and s["values"] == [0.5, 0.6, 0.7]
  assert s["seeds"] == [0, 1, 2]
  assert sweep.format_stats(s) == "60.0 ± 24.8 (n=3; 50.0..70.0)"


def test_t_table_matches_scipy_and_serves_without_it(monkeypatch):
  with_scipy = [sweep.t_quantile_975(dof) for dof in range(1, 31)]
  monkeypatch.setitem(sys.modules, "scipy", None)  # `from scipy import stats` fails.
  table = [sweep.t_quantile_975(dof) for dof in range(1, 31)]
  assert table == list(sweep.T_975)
  assert table == pytest.approx(with_scipy, abs=1e-3)
  assert sweep.t_quantile_975(100) == sweep.T_975[-1]  # Conservative beyond the table.


def test_one_seed_has_no_interval():
  s = sweep.seed_stats([0.42])
  assert s["ci95"] is None and s["std"] is None and s["n"] == 1
  assert sweep.format_stats(s) == "42.0 (n=1)"


def test_merge_groups_by_all_but_the_seed():
  res = lambda acc, seed: _results({"m": ("null", {"null": acc})}, seed=seed)
  merged = sweep.merge({"seed=0,ternary=True": res(0.2, 0), "seed=1,ternary=True":
                        res(0.4, 1), "seed=0,ternary=False": res(0.5, 0)})
  assert set(merged) == {"ternary=True", "ternary=False"}
  cell = merged["ternary=True"]["m"]["null"]
  assert cell["mean"] == pytest.approx(0.3) and cell["n"] == 2
  assert cell["ci95"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2), rel=1e-3)
  assert cell["values"] == [0.2, 0.4] and cell["seeds"] == [0, 1]
  assert merged["ternary=True"]["m"]["native"] == "null"
  assert "| m | null | 30.0 ± 127.1 (n=2; 20.0..40.0) |" in sweep.accuracy_markdown(
      merged["ternary=True"])
  assert "| m | null | 50.0 (n=1) |" in sweep.accuracy_markdown(merged["ternary=False"])


def test_sweep_selects_on_validation_only_and_tuning_entries_apply():
  # Moved from tests/test_pipeline.py (the selection now shows the 95% CI).
  def res(acc, native_acc):
    return _results({"grpo": ("null", {"null": native_acc, "pool": acc})},
                    split="validation")
  merged = sweep.merge({"seed=0|grpo.optim.lr=0.001": res(0.9, 0.2),
                        "seed=1|grpo.optim.lr=0.001": res(0.9, 0.4),
                        "seed=0|grpo.optim.lr=0.0001": res(0.1, 0.5),
                        "seed=1|grpo.optim.lr=0.0001": res(0.1, 0.6)})
  assert set(merged) == {"grpo.optim.lr=0.001", "grpo.optim.lr=0.0001"}
  chosen = sweep.select(merged)["grpo"]  # By the native condition, not the best cell.
  assert chosen["group"] == "grpo.optim.lr=0.0001" and chosen["n"] == 2
  assert chosen["mean"] == pytest.approx(0.55) and chosen["groups"] == 2
  assert chosen["ci95"] == pytest.approx(12.706 * 0.05, rel=1e-3)
  assert "| grpo | `grpo.optim.lr=0.0001` | 55.0 ± 63.5 (n=2; 50.0..60.0) | 2 |" in (
      sweep.selection_markdown(sweep.select(merged)))
  module = sweep._load_module(CONFIG)  # pylint: disable=protected-access
  for family in module.TUNING:
    entries = module.get_sweep(family)
    assert len({sweep.entry_label(e) for e in entries}) == len(entries)
    for entry in entries[:2]:
      assert sweep.entry_from_label(sweep.entry_label(entry)) == entry
      arg, overrides = sweep.entry_parts(entry)
      config = config_lib.load_config(f"{CONFIG}:runlocal,{arg}")
      config_lib.apply_overrides(config, overrides)
      assert config.eval.splits == ("validation",)
  for family in [*module.ARMS, *module.ARG_ARMS]:  # Reported: every arm applies, on test.
    for entry in module.get_sweep(family):
      arg, overrides = sweep.entry_parts(entry)
      config = config_lib.load_config(f"{CONFIG}:{arg}")
      config_lib.apply_overrides(config, overrides)
      experiment.check_budget(config)
      assert config.eval.splits == ("test",)
  with pytest.raises(ValueError, match="Unknown sweep family 'tune_gpro'"):
    module.get_sweep("tune_gpro")
  # SubLN: on for the ternary model (the default), off for the float one, forced by the
  # arg; off adds no key (the stage keys of the runs from before it was the default).
  assert module.get_config().model.subln is True
  assert "subln" not in module.get_config("ternary=False").model
  assert "subln" not in module.get_config("subln=False").model
  assert module.get_config("ternary=False,subln=True").model.subln is True
  with pytest.raises(ValueError, match="Config arg 'subln'"):
    module.get_config("subln=maybe")


SWEEP = ["seed=0,ternary=False", "seed=1,ternary=False", "seed=2,ternary=False",
         "seed=0,ternary=True"]


def test_merge_only_reads_the_arms_results_and_budgets(tmp_path):
  arms = sweep.resolve_arms(CONFIG, "runlocal", SWEEP, str(tmp_path))
  assert len({a.workdir for a in arms}) == 4
  for i, arm in enumerate(arms):
    _write_results(arm, _results(
        {"warmup": ("null", {"null": 0.2 + 0.1 * i, "pool": 0.1}),
         "fcp_bootstrap": ("pool", {"null": 0.3, "pool": 0.5 + 0.1 * i})},
        seed=arm.config.seed, seconds=float(i)))
  with open(os.path.join(arms[0].workdir, sweep.ARM_INFO), "w") as f:
    json.dump(dict(label=arms[0].label, cpu="Test CPU", devices="8 × cpu"), f)
  merged, paths = sweep.run_sweep(CONFIG, "runlocal", SWEEP, str(tmp_path),
                                  merge_only=True)
  with open(paths["json"]) as f:
    out = json.load(f)
  assert out["split"] == "test" and out["failed"] == {} and out["selection"] is None
  assert out["groups"] == merged and set(merged) == {"ternary=False", "ternary=True"}
  cell = merged["ternary=False"]["warmup"]["null"]
  assert cell["values"] == pytest.approx([0.2, 0.3, 0.4]) and cell["seeds"] == [0, 1, 2]
  assert cell["ci95"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-3)
  assert merged["ternary=True"]["fcp_bootstrap"]["pool"]["ci95"] is None
  assert out["budget"]["ternary=False"]["warmup"] == dict(BUDGET, seconds=1.0)
  assert out["machine"] == ("Machines: CPU: Test CPU; devices: 8 × cpu (1 arm); "
                            "not recorded (3 arms).")
  with open(paths["md"]) as f:
    md = f.read()
  assert "Split: test." in md and "Test CPU" in md
  assert ("| warmup | null | 30.0 ± 24.8 (n=3; 20.0..40.0) | 10.0 ± 0.0 (n=3; "
          "10.0..10.0) |") in md
  assert "| warmup | 100 | 10 | 500 | 900 | 8 | 1 |" in md
  assert "| fcp_bootstrap | pool | 30.0 (n=1) | 80.0 (n=1) |" in md
  assert os.path.exists(paths["png"])
  # A family's merge has files of its own beside the default sweep's.
  _, family_paths = sweep.run_sweep(CONFIG, "runlocal", SWEEP, str(tmp_path),
                                    merge_only=True, name=sweep.merged_name("arms"))
  assert family_paths["json"] == str(tmp_path / "sweep_arms.json")
  with open(family_paths["json"]) as f:
    assert json.load(f)["groups"] == merged
  assert os.path.exists(paths["json"]) and os.path.exists(family_paths["png"])

  # An arm without results: the others are merged, the missing one reported.
  os.remove(os.path.join(arms[1].workdir, "results.json"))
  with pytest.raises(sweep.ArmsFailedError) as failure:
    sweep.run_sweep(CONFIG, "runlocal", SWEEP, str(tmp_path), merge_only=True)
  assert list(failure.value.failed) == [arms[1].label]
  with open(paths["json"]) as f:
    out = json.load(f)
  assert out["groups"]["ternary=False"]["warmup"]["null"]["n"] == 2
  assert arms[1].label in out["failed"]


def test_machine_line_when_arms_agree_or_recorded_none():
  info = dict(cpu="X", devices="1 × cpu")
  assert sweep.machine_line({"a": info, "b": info}) == "CPU: X; devices: 1 × cpu."
  assert sweep.machine_line({"a": None}).startswith("CPU (of the merging machine")


def test_a_failed_arm_does_not_stop_the_others(tmp_path, monkeypatch):
  def fake_run_arm(arm, store):
    del store
    if arm.config.seed == 1:
      raise RuntimeError("boom")
    _write_results(arm, _results({"m": ("null", {"null": 0.5})}, seed=arm.config.seed))
  monkeypatch.setattr(sweep, "run_arm", fake_run_arm)
  with pytest.raises(sweep.ArmsFailedError, match="boom"):
    sweep.run_sweep(CONFIG, "runlocal", SWEEP[:3], str(tmp_path))
  with open(tmp_path / "sweep.json") as f:
    out = json.load(f)
  assert out["groups"]["ternary=False"]["m"]["null"]["n"] == 2
  assert list(out["failed"]) == ["seed=1,ternary=False"]


def test_parallel_runs_arms_as_processes_and_keeps_going(tmp_path, monkeypatch):
  """Each arm's 'command' writes fake results (seed 1 fails) in a process of its own."""
  arms = {a.label: a for a in sweep.resolve_arms(CONFIG, "runlocal", SWEEP[:3],
                                                 str(tmp_path))}
  def fake_command(config_spec, workdir, label, overrides, python="python"):
    del config_spec, workdir, overrides
    arm = arms[label]
    results = json.dumps(dict(_results({"m": ("null", {"null": 0.1 * arm.config.seed})},
                                       seed=arm.config.seed), workdir=arm.workdir))
    script = ("import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
              "open(os.path.join(sys.argv[1], 'results.json'), 'w').write(sys.argv[2]); "
              "print('arm done'); sys.exit(int(sys.argv[3]))")
    return [python, "-c", script, arm.workdir, results, str(int(arm.config.seed == 1))]
  monkeypatch.setattr(sweep, "arm_command", fake_command)
  with pytest.raises(sweep.ArmsFailedError) as failure:
    sweep.run_sweep(CONFIG, "runlocal", SWEEP[:3], str(tmp_path), parallel=2)
  assert list(failure.value.failed) == ["seed=1,ternary=False"]
  assert "exit code 1" in failure.value.failed["seed=1,ternary=False"]
  with open(tmp_path / "sweep.json") as f:
    out = json.load(f)
  assert out["groups"]["ternary=False"]["m"]["null"]["values"] == [0.0, 0.2]
  with open(tmp_path / "logs" / f"{arms['seed=0,ternary=False'].name}.log") as f:
    assert "arm done" in f.read()


def test_print_commands_one_per_arm_then_the_merge(tmp_path, capsys):
  workdir = str(tmp_path / "s")
  sweep_flag = "--sweep=seed=0,ternary=False;seed=1|eval.size=8"
  rc = sweep.main([f"--config={CONFIG}:runlocal", f"--workdir={workdir}", sweep_flag,
                   "--print_commands", "--config.eval.batch_size=8"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert rc == 0 and len(lines) == 3 and not os.path.exists(workdir)
  arms = sweep.resolve_arms(CONFIG, "runlocal", [
      "seed=0,ternary=False", dict(arg="seed=1", overrides=["eval.size=8"])],
                            workdir, ["eval.batch_size=8"])
  for line, arm in zip(lines, arms):
    argv = shlex.split(line)
    assert argv[:2] == ["python", sweep.SCRIPT] and f"--arm={arm.label}" in argv
    opts, overrides = sweep.parse_argv(argv[2:])
    config_path, _, base_arg = opts["config"].partition(":")
    again, = sweep.resolve_arms(config_path, base_arg,
                                [sweep.entry_from_label(opts["arm"])],
                                opts["workdir"], overrides)
    assert again.workdir == arm.workdir  # Same workdir, hence the same store.
  merge = shlex.split(lines[-1])
  assert "--merge_only" in merge and sweep_flag in merge
  assert "--config.eval.batch_size=8" in merge


def test_flags_that_exclude_each_other_are_refused():
  base = [f"--config={CONFIG}", "--workdir=/tmp/unused"]
  with pytest.raises(ValueError, match="at most one"):
    sweep.parse_argv(base + ["--merge_only", "--parallel=2"])
  with pytest.raises(ValueError, match="drop --sweep"):
    sweep.parse_argv(base + ["--arm=seed=0", "--sweep=seed=1"])
  opts, _ = sweep.parse_argv(base + ["--merge_only", "--family", "tune_rft"])
  assert opts["merge_only"] is True and opts["family"] == "tune_rft"


# ---------------------------------------------------------------------------------------
# results_readme.
# ---------------------------------------------------------------------------------------


def _sweep_json(path, split="test"):
  """A sweep.json: fcp_bootstrap at 60 ± small; grpo wins, rft ties, warmup loses."""
  runs = {}
  for seed in (0, 1, 2):
    d = 0.01 * (seed - 1)
    runs[f"seed={seed}"] = _results(
        {"warmup": ("null", {"null": 0.30 + d, "pool": 0.3}),
         "fcp_bootstrap": ("pool", {"null": 0.5, "pool": 0.60 + d}),
         "rft": ("null", {"null": 0.58 + 3 * d, "pool": 0.5}),
         "grpo": ("null", {"null": 0.80 + d, "pool": 0.5})}, seed=seed, split=split)
  runs["seed=0,variant=tiny"] = _results({"grpo": ("null", {"null": 0.1})}, split=split)
  merged = sweep.merge(runs)
  out = dict(split=split, machine="CPU: Test CPU; devices: 1 × cpu.", groups=merged,
             budget=sweep.merge_budgets(runs), selection=None, failed={})
  with open(path, "w") as f:
    json.dump(out, f)
  return str(path)


def test_results_readme_compares_with_fcp_bootstrap(tmp_path):
  section = results_readme.results_section(results_readme.load_sweep(
      _sweep_json(tmp_path / "sweep.json")))
  assert "- grpo (null): 80.0 ± 2.5 (n=3; 79.0..81.0) vs fcp_bootstrap (pool) " \
         "60.0 ± 2.5 (n=3; 59.0..61.0): wins; paired by seed +20.0 ± 0.0 " \
         "(n=3; +20.0..+20.0) points: wins." in section
  # rft - fcp_bootstrap per seed: -4, -2, 0 points: mean -2, t(2) * 2 / sqrt(3) = 5.0.
  assert "- rft (null): 58.0 ± 7.5 (n=3; 55.0..61.0) vs fcp_bootstrap (pool) 60.0 ± " \
         "2.5 (n=3; 59.0..61.0): ties (CIs overlap); paired by seed -2.0 ± 5.0 " \
         "(n=3; -4.0..+0.0) points: ties (CI includes 0)." in section
  assert "- warmup (null): " in section and section.count("points: loses.") == 1
  assert "CPU: Test CPU" in section and "Seeds: 0, 1, 2 (n = 1, 3 per group)." in section
  assert "| fcp_bootstrap | 100 | 10 | 500 | 900 | 8 | 3 |" in section
  assert "#### variant=tiny" in section  # A group without fcp_bootstrap: no sentences.
  s, ref = dict(mean=0.5, ci95=None), dict(mean=0.6, ci95=0.01)
  assert results_readme.verdict(s, ref).startswith("cannot be compared (n=1")


def test_paired_differences_match_seeds_and_give_the_bootstrap_gain():
  cell = lambda values, seeds: sweep.seed_stats(values, seeds)
  # Seeds matched by id, not position; seed 3 has no partner and is left out.
  d = results_readme.paired(cell([0.5, 0.7, 0.9], [2, 0, 3]), cell([0.6, 0.4], [0, 2]))
  assert d["seeds"] == [2, 0] and d["values"] == pytest.approx([0.1, 0.1])
  assert d["ci95"] == pytest.approx(0.0) and results_readme.paired_verdict(d) == "wins"
  with pytest.raises(ValueError, match="No seed in common"):
    results_readme.paired(cell([0.5], [0]), cell([0.5], [1]))
  # Offline FCP 20 / 25 / 30 %; the bootstrap +2, +3, +4 points over it, per seed:
  # the unpaired intervals overlap, the paired gain 3.0 ± t(2) * 1 / sqrt(3) excludes 0.
  rows = {}
  for method, values in (("offline_fcp", [0.20, 0.25, 0.30]),
                         ("fcp_bootstrap", [0.22, 0.28, 0.34])):
    rows[method] = dict(native="pool", pool=cell(values, [0, 1, 2]))
  text = results_readme.comparisons(rows)
  assert ": ties (CIs overlap); paired by seed -3.0 ± 2.5 (n=3; -4.0..-2.0) points: " \
         "loses." in text
  assert "- fcp_bootstrap − offline_fcp (native conditions), paired by seed: +3.0 ± " \
         "2.5 (n=3; +2.0..+4.0) points: fcp_bootstrap wins." in text


def test_results_readme_writes_a_section_per_sweep_file(tmp_path, capsys):
  main = _sweep_json(tmp_path / "sweep.json")
  arms = _sweep_json(tmp_path / "sweep_arms.json")
  assert results_readme.main([f"--sweep_json={tmp_path},{arms}"]) == 0
  out = capsys.readouterr().out
  assert out.index("### Results (test split)\n") < out.index(
      "### Results (test split): arms\n")
  assert out.count("vs fcp_bootstrap") == 2 * results_readme.results_section(
      results_readme.load_sweep(main)).count("vs fcp_bootstrap")


def test_results_readme_refuses_validation(tmp_path):
  _sweep_json(tmp_path / "sweep.json", split="validation")
  with pytest.raises(ValueError, match="test split only"):
    results_readme.load_sweep(str(tmp_path))


def test_results_readme_replaces_between_markers(tmp_path, capsys):
  path = _sweep_json(tmp_path / "sweep.json")
  readme = tmp_path / "README.md"
  readme.write_text("# T\n\nintro\n<!-- results:start -->\nold\n<!-- results:end -->\n"
                    "after\n")
  assert results_readme.main([f"--sweep_json={path}", f"--readme={readme}"]) == 0
  text = readme.read_text()
  assert text.startswith("# T\n\nintro\n<!-- results:start -->\n### Results (test")
  assert text.endswith("<!-- results:end -->\nafter\n") and "old" not in text
  assert capsys.readouterr().out == ""
  again = results_readme.replace_between_markers(
      text, results_readme.results_section(results_readme.load_sweep(path), path))
  assert again == text  # Idempotent.
  readme.write_text("# T\nno markers\n")
  with pytest.raises(ValueError, match="marker"):
    results_readme.main([f"--sweep_json={path}", f"--readme={readme}"])
  assert readme.read_text() == "# T\nno markers\n"
  with pytest.raises(ValueError, match="comes before"):
    results_readme.replace_between_markers(
        "<!-- results:end -->\n<!-- results:start -->", "x")


# ---------------------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sweep_merges_exactly_as_the_sequential_one(tmp_path, capsys):
  """Two runlocal arms, in two workdirs with stores of their own: same merged table.

  An arm that fails (the pipeline's own doing) must fail in both runs alike, with the
  other arm merged in both. Two methods keep the four pipelines short.
  """
  methods = "methods=('warmup','fcp_bootstrap')"
  group = f"ternary=False|{methods}"
  argv = [f"--config={CONFIG}:runlocal",
          f"--sweep=seed=0,ternary=False|{methods};seed=1,ternary=False|{methods}"]
  rc = {"par": sweep.main(argv + [f"--workdir={tmp_path / 'par'}", "--parallel=2"]),
        "seq": sweep.main(argv + [f"--workdir={tmp_path / 'seq'}"])}
  assert "# Sweep: accuracy % on the test split" in capsys.readouterr().out
  out = {}
  for name in ("par", "seq"):
    with open(tmp_path / name / "sweep.json") as f:
      out[name] = json.load(f)
  assert rc["par"] == rc["seq"] == (1 if out["seq"]["failed"] else 0)
  assert list(out["par"]["failed"]) == list(out["seq"]["failed"])
  assert out["par"]["groups"] == out["seq"]["groups"]
  assert out["par"]["arms"].keys() == out["seq"]["arms"].keys()
  assert len(out["seq"]["arms"]) + len(out["seq"]["failed"]) == 2
  assert set(out["seq"]["groups"][group]) == {"warmup", "fcp_bootstrap"}
  row = out["seq"]["groups"][group]["fcp_bootstrap"]["pool"]
  assert row["n"] == len(out["seq"]["arms"]) >= 1
  assert (row["ci95"] is None) == (row["n"] == 1)
  assert set(out["seq"]["budget"][group]) == set(out["seq"]["groups"][group])
  assert out["par"]["machine"] == out["seq"]["machine"]
  assert len(os.listdir(tmp_path / "par" / "logs")) == 2

"""Stage workers: processes that run an experiment's independent stages at once.

After the collection an experiment's stages form a few independent chains (offline FCP →
bootstrap, RFT, GRPO, RFT → GRPO) and the evaluations. With ``config.stage_workers=N``
the main process starts ``N - 1`` helper processes that run the same experiment
(``experiment.run(..., worker=i)``) on the same stage store. Each process walks the
stages in an order of its own (``order``: the main one first to last, the helpers from
the last chain back) and runs the first stage that is neither done, nor running in
another process (``stages.StageBusy``, from the stage's lock), nor waiting for an
upstream stage (``stages.StageNotReady``); a stage that another process finished is
loaded, as on any re-run. So every stage runs once, in whichever process reaches it
first, and computes what it would compute alone: the results are those of one process,
bitwise (each stage's record names its ``worker``). Only the main process writes the
results.

Each process has the host's devices to itself and shares its cores: on a CPU host the
stages' small matmuls and decoding loops leave cores idle that another stage fills (2
workers on 2 cores: 1.1-1.4x the train steps and 1.2-1.5x the sampling of one process,
``experiments/benchmarks/stage_workers.py``, docs/findings.md §9). ``stage_workers=0`` picks 2 on a CPU host with two or more cores,
else 1; accelerators and multi-process runs take 1 (a second process would contend for
the accelerator's memory), and asking them for more is an error naming the setting.
"""

import ctypes
import logging as std_logging
import os
import pickle
import signal
import subprocess
import sys
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

from absl import logging
import jax

from fcp_jax import stages as stages_lib

POLL_S = 1.0  # How often a process with nothing runnable looks again.
Step = Tuple[str, Callable[[], Any]]


def resolve(value: Any) -> int:
  """The number of stage workers ``config.stage_workers=value`` asks for here."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"config.stage_workers={value!r}: expected a whole number >= 0 "
                     "(0: 2 on a CPU host, else 1).")
  single = jax.process_count() == 1 and jax.default_backend() == "cpu"
  if value == 0:
    return 2 if single and (os.cpu_count() or 1) >= 2 else 1
  if value > 1 and not single:
    raise ValueError(
        f"config.stage_workers={value} runs stages in separate processes, which only a "
        f"single-process CPU run supports (this one: {jax.process_count()} process(es) "
        f"on {jax.default_backend()}); set it to 1 or 0.")
  return value


def order(training: Sequence[Step], evaluations: Sequence[Step], worker: int
          ) -> List[Step]:
  """The order in which ``worker`` tries the stages after the collection."""
  if worker == 0:
    return [*training, *evaluations]
  return [*reversed(training), *reversed(evaluations)]


def run_steps(stages: stages_lib.Stages, steps: Sequence[Step], workers: int):
  """Runs (or loads) every step; with ``workers > 1`` skipping the busy and the not-ready
  ones for now.

  Alone (``workers=1``, every multi-process run) the steps run in order, waiting on
  locks: every process of a run takes part in each stage. Shared, after each step
  that ran or loaded it starts again from the first pending step; with nothing
  runnable it waits ``POLL_S``. Raises if every pending step waits for an upstream
  stage that no pending step provides.
  """
  if workers == 1:
    for _, step in steps:
      step()
    return
  pending, told = list(steps), set()
  stages.wait = False
  try:
    while pending:
      waiting = {}
      for i, (name, step) in enumerate(pending):
        try:
          step()
        except stages_lib.StageBusy:
          if name not in told:
            logging.info("Stage %s is running in another worker; going on.", name)
            told.add(name)
          continue
        except stages_lib.StageNotReady as e:
          waiting[name] = e.args[0]
          continue
        del pending[i]
        break
      else:
        if len(waiting) == len(pending):
          raise RuntimeError("Stages wait for stages that none will run: " + ", ".join(
              f"{name} for {up}" for name, up in waiting.items()))
        time.sleep(POLL_S)
  finally:
    stages.wait = True


def start(config: Any, workdir: str, store: Optional[str], count: int
          ) -> List[subprocess.Popen]:
  """Starts helpers ``1..count`` (``child_main``), their output beside this process's."""
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (package_root, env.get("PYTHONPATH")) if p)
  procs = []
  for worker in range(1, count + 1):
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "from fcp_jax import stage_workers; stage_workers.child_main()"],
        stdin=subprocess.PIPE, env=env)
    proc.stdin.write(pickle.dumps((config, workdir, store, worker)))
    proc.stdin.close()
    logging.info("Stage worker %d: process %d.", worker, proc.pid)
    procs.append(proc)
  return procs


def finish(procs: Sequence[subprocess.Popen], *, abort: bool = False) -> List[int]:
  """Waits for the helpers (``abort``: stops them first); their exit codes."""
  if abort:
    for proc in procs:
      proc.terminate()
  codes = [proc.wait() for proc in procs]
  for worker, code in enumerate(codes, 1):
    if code and not abort:
      logging.error("Stage worker %d exited with %d (its log is above); the main process "
                    "ran or loaded every stage itself.", worker, code)
  return codes


class _Prefix(std_logging.Filter):

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record) -> bool:
    record.msg = f"{self.prefix}{record.msg}"
    return True


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def child_main():
  """A helper's entry point: ``(config, workdir, store, worker)`` pickled on stdin.

  On Linux it gets SIGTERM when the main process dies (``PR_SET_PDEATHSIG``), so a
  killed run leaves no helper behind (its stage resumes from checkpoints on a re-run).
  """
  parent = os.getppid()
  if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # The main process died before prctl took effect.
      sys.exit(1)
  config, workdir, store, worker = pickle.load(sys.stdin.buffer)
  from fcp_jax import config_lib  # pylint: disable=g-import-not-at-top
  from fcp_jax import experiment  # pylint: disable=g-import-not-at-top
  config_lib.init_process()
  logging.get_absl_handler().addFilter(_Prefix(f"[stage worker {worker}] "))
  experiment.run(config, workdir, store=store, worker=worker)

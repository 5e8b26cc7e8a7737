"""Evaluation driver: greedy accuracy of a run's params under feedback conditions.

    python -m fcp_jax.evaluate --config configs/arith_fcp.py:runlocal,stage=eval \\
        --workdir DIR --config.init_from=RUN_DIR --config.eval.pool=POOL.json \\
        --config.eval.negatives=NEGATIVES.json

The conditions and statistics are ``fcp_jax.evaluation``'s; results go to
``DIR/eval.json`` and ``DIR/eval.md`` (written by process 0 of a multi-process run).
"""

import sys
from typing import Any, Dict, Sequence

import ml_collections

from fcp_jax import config_lib
from fcp_jax import distributed
from fcp_jax import evaluation
from fcp_jax import policy as policy_lib
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.feedback import pool as pool_lib


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Evaluates ``config.init_from``'s params; writes ``workdir/eval.{json,md}``."""
  ev = config.eval
  if tuple(ev.get("splits", ("test",))) != ("test",):
    raise ValueError(f"config.eval.splits={tuple(ev.splits)}: this driver evaluates the "
                     "test prompts (the task's held-out split) only; the pipeline "
                     "evaluates validation prompts, which it draws from its train split.")
  if not config.init_from:
    raise ValueError("config.init_from must name the run (or checkpoint) to evaluate.")
  policy = policy_lib.Policy(config.model, config.tokenizer, config.quant,
                             parallel=config.get("parallel"))
  pool = pool_lib.ConditionPool.load(ev.pool) if ev.pool else None
  negatives = pool_lib.ConditionPool.load(ev.negatives) if ev.get("negatives") else None
  examples = tasks_lib.TASKS.build(ev.task, split="eval", size=ev.size, seed=ev.task_seed)
  results = evaluation.evaluate_policy(
      policy.sampler, policy.load(config.init_from), examples,
      conditions=[c for c in ev.conditions if c != "pool" or pool is not None],
      seeds=list(ev.seeds), pool=pool, negatives=negatives,
      no_answer=evaluation.config_no_answer(ev), kind=ev.kind,
      texts=evaluation.config_texts(ev),
      system=ev.system or None, instruction=ev.instruction,
      max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, qlambda=policy.qlambda)
  if distributed.is_primary():
    evaluation.write_results(results, workdir)
  return results


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """``--config spec --workdir DIR [--config.k=v ...]``."""
  return config_lib.driver_main(argv, run)


if __name__ == "__main__":
  main(sys.argv[1:])

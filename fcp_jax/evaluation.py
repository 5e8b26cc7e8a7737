"""Evaluation under feedback conditions (``docs/fcp_method.md`` §1.5, Table 3).

``evaluate_policy(sampler, params, examples, ...)``, used by the ``fcp_jax.evaluate``
driver and the pipeline's evaluation stages.

Greedy decoding on held-out prompts, each prompt prefixed with a condition chosen by a
registry name (``CONDITIONS``):

* ``pool``: one ``c+`` per question drawn from the positive pool with a seeded RNG (the
  paper's protocol; one draw per seed);
* ``null``: ``<EF></EF>``;
* ``negative``: a fully negative condition, the mirror image of pool c+: one per question
  drawn with the seed from the worst verdicts the feedback env gave the policy's own
  collected samples (``negatives.json`` of the pipeline's collect stage: score ≤ 2 and
  wrong; ``eval.negatives`` for the evaluate driver); ``NEGATIVE[kind]`` without a pool;
* ``fixed_negative``: the paper's protocol, one fixed fully negative text for every
  question (``eval.negative``, or ``NEGATIVE[kind]``);
* ``no_answer``: one per question drawn with the seed from every verdict the env writes
  for a response with no final answer (``eval.feedback``; for the critic 144 reviewer
  texts, score 0). The policy's samples almost never earn them, so this measures how
  the policy extrapolates to harsh verdicts it never saw;
* ``positive``: a fixed positive condition (``POSITIVE[kind]`` or ``eval.positive``);
* ``none``: no ``<EF>`` wrapper at all (plain prompt).

For each condition: accuracy (mean over seeds) with its binomial standard error over
questions, the spread over seeds, the mean response length in tokens and the fraction of
responses with a final answer. Conditions that do not depend on the seed are decoded
once. Results go to ``eval.json`` and ``eval.md``.
"""

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from fcp_jax.data import answers
from fcp_jax.data import chat
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.feedback import base as feedback_base
from fcp_jax.feedback import pool as pool_lib
from fcp_jax.registry import Registry
from fcp_jax.sampling import sampler as sampler_lib

CONDITIONS = Registry("evaluation condition")

# Fixed conditions, written in the rule-based critic's style so they are in-distribution
# for a model trained on its feedback (the paper's Table 3 uses GPT-style wording).
POSITIVE = {
    "reviewer": "Correct and clear; carefully reasoned throughout.",
    "user": "Thanks, that looks right to me! Really helpful.",
    "critique": "The final answer is correct and every calculation checks out.",
}
# Fallback negatives (when no pool of the worst verdicts is given): what the critic says
# of a response with no final answer, in the paper's fully negative words.
NEGATIVE = {
    "reviewer": "Incomplete and disorganized; entirely without a conclusion.",
    "user": "I'm lost, honestly. Not what I was hoping for.",
    "critique": "The response never states a final answer.",
}


@CONDITIONS.register("pool")
def pool_conditions(n: int, *, seed: int, pool: Optional[pool_lib.ConditionPool],
                    **unused) -> List[Optional[str]]:
  """One ``c+`` per question, drawn from the pool with ``seed``."""
  del unused
  if pool is None:
    raise ValueError("The 'pool' condition needs a positive-condition pool.")
  rng = np.random.default_rng([seed, 7])
  return [pool.sample(rng) for _ in range(n)]


@CONDITIONS.register("null")
def null_conditions(n: int, **unused) -> List[Optional[str]]:
  del unused
  return [""] * n


@CONDITIONS.register("none")
def no_conditions(n: int, **unused) -> List[Optional[str]]:
  del unused
  return [None] * n


@CONDITIONS.register("negative")
def negative_conditions(n: int, *, kind: str, seed: int = 0,
                        negatives: Optional[pool_lib.ConditionPool] = None, **unused
                        ) -> List[Optional[str]]:
  """One of the worst verdicts (``negatives``) per question, else ``NEGATIVE[kind]``."""
  del unused
  if negatives is None:
    return [NEGATIVE[kind]] * n
  rng = np.random.default_rng([seed, 11])
  return [negatives.sample(rng) for _ in range(n)]


@CONDITIONS.register("fixed_negative")
def fixed_negative_conditions(n: int, *, kind: str, text: str = "", **unused
                              ) -> List[Optional[str]]:
  """The same fully negative text for every question (``text`` or ``NEGATIVE[kind]``)."""
  del unused
  return [text or NEGATIVE[kind]] * n


@CONDITIONS.register("no_answer")
def no_answer_conditions(n: int, *, seed: int = 0,
                         no_answer: Optional[pool_lib.ConditionPool] = None, **unused
                         ) -> List[Optional[str]]:
  """One of the env's verdicts on a response without a final answer per question."""
  del unused
  if no_answer is None:
    raise ValueError("The 'no_answer' condition needs the feedback env's verdicts on "
                     "responses without a final answer (eval.feedback names the env).")
  rng = np.random.default_rng([seed, 13])
  return [no_answer.sample(rng) for _ in range(n)]


@CONDITIONS.register("positive")
def positive_conditions(n: int, *, kind: str, text: str = "", **unused
                        ) -> List[Optional[str]]:
  del unused
  return [text or POSITIVE[kind]] * n


def no_answer_pool(env: Any, kind: str) -> Optional[pool_lib.ConditionPool]:
  """The env's verdicts on no-answer responses (``None`` if it cannot list them)."""
  texts = feedback_base.no_answer_texts(env, kind)
  return pool_lib.ConditionPool(texts, kind=kind, settings=dict(
      source="no_answer_verdicts", env=env.config_key())) if texts else None


def config_texts(ev: ml_collections.ConfigDict) -> Dict[str, str]:
  """The fixed condition texts an eval config sets (empty: the ``kind``'s default)."""
  return dict(fixed_negative=ev.negative, positive=ev.positive)


def config_no_answer(ev: ml_collections.ConfigDict) -> Optional[pool_lib.ConditionPool]:
  """``no_answer_pool`` of ``ev.feedback``'s env if ``ev.conditions`` asks for it."""
  spec = ev.get("feedback")
  if not spec or "no_answer" not in ev.conditions:
    return None
  return no_answer_pool(feedback_base.FEEDBACK_ENVS.build(spec), ev.kind)


def score_responses(examples: Sequence[tasks_lib.Example], texts: Sequence[str],
                    lengths: Sequence[int]) -> Dict[str, np.ndarray]:
  """Per-question correctness, has-answer and length arrays."""
  correct = np.asarray([answers.check_answer(e, t) for e, t in zip(examples, texts)],
                       np.float64)  # [N]
  answered = np.asarray([answers.extract_answer(t) is not None for t in texts],
                        np.float64)  # [N]
  return dict(correct=correct, answered=answered, length=np.asarray(lengths, np.float64))


def summarize(per_seed: Sequence[Mapping[str, np.ndarray]]) -> Dict[str, Any]:
  """Accuracy (mean over seeds), binomial standard error over questions, seed spread."""
  accs = np.asarray([s["correct"].mean() for s in per_seed])  # [S]
  n = len(per_seed[0]["correct"])
  acc = float(accs.mean())
  return dict(
      accuracy=acc,
      stderr=float(math.sqrt(max(acc * (1 - acc), 0.0) / max(n, 1))),
      seed_std=float(accs.std()),
      per_seed=[float(a) for a in accs],
      mean_length=float(np.mean([s["length"].mean() for s in per_seed])),
      answered=float(np.mean([s["answered"].mean() for s in per_seed])),
      num_questions=n, num_seeds=len(per_seed))


def evaluate_policy(sampler: sampler_lib.Sampler, params: Any,
                    examples: Sequence[tasks_lib.Example], *, conditions: Sequence[str],
                    seeds: Sequence[int], pool: Optional[pool_lib.ConditionPool] = None,
                    negatives: Optional[pool_lib.ConditionPool] = None,
                    no_answer: Optional[pool_lib.ConditionPool] = None,
                    kind: str = "reviewer", texts: Optional[Mapping[str, str]] = None,
                    system: Optional[str] = None, instruction: str = "none",
                    max_new_tokens: int = 64, batch_size: int = 256,
                    qlambda: Any = None) -> Dict[str, Dict[str, Any]]:
  """Greedy accuracy of ``params`` on ``examples`` under each named condition.

  ``pool`` holds the c+ of the ``pool`` condition, ``negatives`` the worst verdicts of
  the ``negative`` one, ``no_answer`` those of ``no_answer`` (see ``no_answer_pool``);
  conditions drawn from a pool are decoded once per seed, the others once.
  """
  tok = sampler.tokenizer
  texts = dict(texts or {})
  seeded = {"pool", "no_answer"} | ({"negative"} if negatives else set())
  questions = [tasks_lib.format_question(e, instruction) for e in examples]
  results = {}
  for name in conditions:
    build = CONDITIONS.get(name)
    per_seed = []
    for s in (seeds if name in seeded else seeds[:1]):
      conds = build(len(examples), seed=int(s), pool=pool, negatives=negatives,
                    no_answer=no_answer, kind=kind, text=texts.get(name, ""))
      prompts = [chat.encode_prompt(tok, q, c, system=system)
                 for q, c in zip(questions, conds)]
      out_texts, lengths = [], []
      for i in range(0, len(prompts), batch_size):
        out = sampler.sample(params, prompts[i:i + batch_size], jax.random.PRNGKey(0),
                             max_new_tokens=max_new_tokens, method="greedy",
                             qlambda=qlambda,  # A short last batch: the same program.
                             min_prompts=batch_size if len(prompts) > batch_size else 0)
        out_texts += list(out.text)
        lengths += [int(x) for x in out.lengths]
      per_seed.append(score_responses(examples, out_texts, lengths))
    results[name] = summarize(per_seed)
    results[name]["example"] = out_texts[0] if out_texts else ""
    logging.info("eval %-9s accuracy %.3f ± %.3f  length %.1f  answered %.2f", name,
                 results[name]["accuracy"], results[name]["stderr"],
                 results[name]["mean_length"], results[name]["answered"])
  return results


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]],
                   conditions: Sequence[str]) -> str:
  """``| method | cond1 | ... |`` with ``acc ± se`` cells (percent)."""
  lines = ["| method | " + " | ".join(conditions) + " |",
           "|---|" + "---|" * len(conditions)]
  for method, res in results.items():
    cells = []
    for c in conditions:
      r = res.get(c)
      cells.append("–" if r is None else
                   f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def details_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """One method's conditions with length and answered fraction."""
  lines = ["| condition | accuracy % | ± se | seed std | mean length | answered % |",
           "|---|---|---|---|---|---|"]
  for c, r in results.items():
    lines.append(f"| {c} | {100 * r['accuracy']:.1f} | {100 * r['stderr']:.1f} | "
                 f"{100 * r['seed_std']:.1f} | {r['mean_length']:.1f} | "
                 f"{100 * r['answered']:.0f} |")
  return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Mapping[str, Any]], out_dir: str,
                  name: str = "eval") -> Dict[str, str]:
  """Writes ``name.json`` and ``name.md`` (atomically); returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, f"{name}.json"),
           "md": os.path.join(out_dir, f"{name}.md")}
  for key, text in (("json", json.dumps(results, indent=2)),
                    ("md", details_table(results))):
    tmp = paths[key] + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, paths[key])
  return paths

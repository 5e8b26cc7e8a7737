"""Rollouts: sample responses under conditions and ask the feedback env about each.

The one sampling path of every stage that generates (the pipeline's collection and
RFT share, the online rounds of FCP bootstrapping and GRPO): ``generate`` formats each
example's question, wraps it in its condition (``chat.encode_prompt``), samples
``num_samples`` responses per prompt with the jitted sampler, and returns them as a
``Rollouts`` with the env's fresh feedback on every response (asked chunk by chunk).
Row ``r`` answers example ``r // num_samples``.

Random streams: with ``chunk_prompts=None`` everything is sampled in one call with
``rng``; otherwise the chunk that starts at example ``s`` uses ``fold_in(rng, s)``, so
results do not depend on what ran before.
"""

import dataclasses
import time
from typing import List, Optional, Sequence

from absl import logging
import jax
import numpy as np

from fcp_jax.data import chat
from fcp_jax.data import tasks as tasks_lib
from fcp_jax.feedback import base as feedback_base
from fcp_jax.sampling import sampler as sampler_lib
from fcp_jax.training import metrics as metrics_lib


@dataclasses.dataclass
class Rollouts:
  """Sampled responses with feedback; row ``r`` answers prompt ``r // group_size``."""
  examples: List[tasks_lib.Example]       # [R] the example of each row
  questions: List[str]                    # [R] formatted question of each row
  prompts: List[List[int]]                # [R] prompt ids each row was sampled under
  sample_conditions: List[Optional[str]]  # [R] condition text each row was sampled under
  responses: List[List[int]]              # [R] response ids, end token included
  texts: List[str]                        # [R] decoded responses (no end token)
  logprobs: np.ndarray                    # [R, N] sampler log-probs per response token
  lengths: np.ndarray                     # [R] response lengths, end token included
  feedback: List[feedback_base.Feedback]  # [R] fresh feedback
  group_size: int
  sample_s: float = 0.0                   # wall seconds in the sampler (compiles included)
  feedback_s: float = 0.0                 # wall seconds waiting for the env's feedback

  def __len__(self) -> int:
    return len(self.texts)

  @property
  def ok(self) -> np.ndarray:
    """[R] bool: whether the env answered (failed feedback is never trained on)."""
    return np.asarray([fb.ok for fb in self.feedback], bool)


def generate(sampler: sampler_lib.Sampler, params, examples: Sequence[tasks_lib.Example],
             conditions: Sequence[Optional[str]], *, env, rng: jax.Array,
             num_samples: int, method: str, max_new_tokens: int, instruction: str,
             system: Optional[str], qlambda=None, chunk_prompts: Optional[int] = None,
             log_progress: bool = True) -> Rollouts:
  """``num_samples`` responses per example, with the env's feedback on each.

  Args:
    conditions: one condition per example (shared by its samples), or one per rollout
      (``len(examples) * num_samples``: each rollout is then sampled from its own
      prompt). ``""`` is the null condition ``<EF></EF>``, ``None`` no wrapper.
    chunk_prompts: examples per sampler call (``None``: all in one call).
  """
  n = int(num_samples)
  per_rollout = len(conditions) == len(examples) * n and n > 1
  if not per_rollout and len(conditions) != len(examples):
    raise ValueError(f"{len(conditions)} conditions for {len(examples)} examples x "
                     f"{n} samples: give one per example or one per rollout.")
  tok = sampler.tokenizer
  row_examples = [e for e in examples for _ in range(n)]
  questions = [tasks_lib.format_question(e, instruction) for e in row_examples]
  row_conditions = list(conditions) if per_rollout else [c for c in conditions
                                                         for _ in range(n)]
  row_prompts = [chat.encode_prompt(tok, q, c, system=system)
                 for q, c in zip(questions, row_conditions)]
  chunk = int(chunk_prompts) if chunk_prompts else max(len(examples), 1)
  # Sampler prompts of a full chunk: a short last chunk is padded to it (one program).
  full_chunk = chunk * (n if per_rollout else 1) if len(examples) > chunk else 0
  responses, texts, logprobs, lengths, feedback = [], [], [], [], []
  progress = metrics_lib.Progress(len(examples))
  sample_s = feedback_s = 0.0
  for start in range(0, len(examples), chunk):
    rows = slice(start * n, min(start + chunk, len(examples)) * n)
    if per_rollout:
      prompts, per_prompt = row_prompts[rows], 1
    else:
      prompts, per_prompt = row_prompts[rows][::n], n
    key = rng if chunk_prompts is None else jax.random.fold_in(rng, start)
    t0 = time.perf_counter()
    out = sampler.sample(params, prompts, key, max_new_tokens=max_new_tokens,
                         method=method, num_samples=per_prompt, qlambda=qlambda,
                         min_prompts=full_chunk)
    responses += [out.response_ids(i) for i in range(len(out.lengths))]
    texts += list(out.text)
    logprobs.append(np.asarray(out.logprobs))
    lengths.append(np.asarray(out.lengths))
    t1 = time.perf_counter()
    feedback += env.feedback(list(zip(row_examples[rows], out.text)))
    sample_s += t1 - t0
    feedback_s += time.perf_counter() - t1
    progress.add_tokens(int(np.sum(out.lengths)))
    if log_progress and chunk_prompts is not None:
      done = min(start + chunk, len(examples))
      speed = progress.report(done)
      logging.info("sampled %d/%d prompts | %s tok/s | ETA %s", done, len(examples),
                   f"{speed['tokens_per_s']:,.0f}",
                   metrics_lib.format_duration(speed["eta_s"]))
  return Rollouts(examples=row_examples, questions=questions, prompts=row_prompts,
                  sample_conditions=row_conditions, responses=responses, texts=texts,
                  logprobs=np.concatenate(logprobs) if logprobs else np.zeros((0, 0)),
                  lengths=np.concatenate(lengths) if lengths else np.zeros((0,), int),
                  feedback=feedback, group_size=n, sample_s=sample_s,
                  feedback_s=feedback_s)


class FeedbackFailedError(RuntimeError):
  """Feedback that the env could not give, after retries; nothing is trained on it."""


def retry_failed(env, queries: Sequence[feedback_base.QueryLike],
                 feedback: Sequence[feedback_base.Feedback], *, where: str,
                 retries: int = 2) -> List[feedback_base.Feedback]:
  """``feedback`` on ``queries`` with every failed answer asked again, up to ``retries``.

  Feedback that still failed raises ``FeedbackFailedError``: the stage stops before it
  is marked done, the answers already given stay in the env's cache, and a re-run asks
  again only about the failed ones. Nothing is trained on failed feedback.
  """
  feedback = list(feedback)
  for _ in range(retries):
    bad = [i for i, fb in enumerate(feedback) if not fb.ok]
    if not bad:
      break
    logging.warning("%s: asking again about %d failed feedback queries.", where, len(bad))
    for i, fb in zip(bad, env.feedback([queries[i] for i in bad])):
      feedback[i] = fb
  failed = sum(not fb.ok for fb in feedback)
  if failed:
    raise FeedbackFailedError(
        f"{where}: the feedback env failed on {failed} of {len(feedback)} responses "
        f"after {retries} retries; the {len(feedback) - failed} answers are cached. "
        "Re-run to ask again about the failed ones.")
  return feedback


def require_feedback(env, ro: Rollouts, *, where: str, retries: int = 2) -> Rollouts:
  """``ro`` with every failed feedback asked again (``retry_failed``)."""
  ro.feedback = retry_failed(env, list(zip(ro.examples, ro.texts)), ro.feedback,
                             where=where, retries=retries)
  return ro

"""The feedback record, the feedback-environment protocol and its registry.

A feedback environment plays ``p_env(c | x, o)`` of FCP: given (example, response) pairs
it returns one ``Feedback`` each, holding the published feedback styles
(``docs/fcp_method.md`` §2) side by side:

* ``user``: colloquial, first-person sentiment; no symbol, number or concept of the task;
* ``reviewer``: a high-level summary in adjectives and adverbs that never says where the
  answer goes wrong (the paper's default condition, "pro");
* ``critique``: detailed; may name the first wrong step or missing value;
* ``score``: an integer 0-10 (used by GRPO/RFT baselines and the condition pools,
  never by the FCP loss);
* ``correct``: the task checker's verdict on the final answer (ground truth, also when a
  judge is noisy or failed).

Environments are registered in ``FEEDBACK_ENVS`` and built from a config string such as
``"critic(noise=0.1, seed=0)"``. Every env has ``config_key()``, the string that keys its
answers in the JSONL cache (``fcp_jax.feedback.cache``).
"""

import dataclasses
from typing import Any, Dict, List, Mapping, NamedTuple, Protocol, Sequence, Tuple, Union
from typing import runtime_checkable

from fcp_jax.data.tasks import Example
from fcp_jax.registry import Registry

FEEDBACK_ENVS = Registry("feedback env")
CONDITION_KINDS = ("reviewer", "user", "critique")


@dataclasses.dataclass(frozen=True)
class Feedback:
  """One piece of verbal feedback on one response.

  ``ok`` is False when the environment could not produce feedback (e.g. the judge's
  reply failed or could not be parsed): the texts are then empty, which trains as the
  null condition ``<EF></EF>``, and the score is the neutral 5.
  """
  user: str
  reviewer: str
  critique: str
  score: int
  correct: bool
  ok: bool = True

  def __post_init__(self):
    if not isinstance(self.score, int) or isinstance(self.score, bool) or not (
        0 <= self.score <= 10):
      raise ValueError(f"Feedback score must be an int in [0, 10], got {self.score!r}.")

  def condition(self, kind: str) -> str:
    """The condition text ``c`` of style ``kind`` (reviewer, user or critique)."""
    if kind not in CONDITION_KINDS:
      raise KeyError(f"Unknown condition kind {kind!r}; known: {CONDITION_KINDS}.")
    return getattr(self, kind)

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Feedback":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def failed_feedback(correct: bool) -> Feedback:
  """What an env returns when it has no answer: empty texts, neutral score 5."""
  return Feedback(user="", reviewer="", critique="", score=5, correct=correct, ok=False)


class Query(NamedTuple):
  """One (example, response) pair to give feedback on; a plain 2-tuple also works."""
  example: Example
  response: str


QueryLike = Union[Query, Tuple[Example, str]]


def as_queries(batch: Sequence[QueryLike]) -> List[Query]:
  """Validates a batch of ``(Example, str)`` pairs and returns them as ``Query``s."""
  out = []
  for i, item in enumerate(batch):
    try:
      example, response = item
    except (TypeError, ValueError):
      raise TypeError(f"Feedback query {i} must be an (Example, response) pair, "
                      f"got {type(item).__name__}.") from None
    if not isinstance(example, Example) or not isinstance(response, str):
      raise TypeError(f"Feedback query {i} must be (Example, str), got "
                      f"({type(example).__name__}, {type(response).__name__}).")
    out.append(Query(example, response))
  return out


@runtime_checkable
class FeedbackEnv(Protocol):
  """What a feedback environment provides."""

  def feedback(self, batch: Sequence[QueryLike]) -> List[Feedback]:
    """One ``Feedback`` per (example, response), in order."""
    ...

  def config_key(self) -> str:
    """A string that changes whenever the env would answer differently."""
    ...


def no_answer_texts(env: Any, kind: str) -> Tuple[str, ...]:
  """The env's verdicts of style ``kind`` on a response without an answer, or ``()``.

  An env may list, in a method ``no_answer_verdicts(kind)``, every text it writes for the
  worst possible response (for the rule-based critic: no final answer at all, score 0),
  free of anything specific to one question. Evaluation's ``no_answer`` condition draws
  from them. Envs that cannot list them (an LLM judge) return ``()``; a cache wrapper
  answers for the env it wraps.
  """
  if kind not in CONDITION_KINDS:
    raise KeyError(f"Unknown condition kind {kind!r}; known: {CONDITION_KINDS}.")
  env = getattr(env, "env", env)
  texts = getattr(env, "no_answer_verdicts", None)
  return tuple(texts(kind)) if texts is not None else ()

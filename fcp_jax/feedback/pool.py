"""Condition pools: feedback texts to condition on at inference.

The positive pool ``{c+}`` is built from collected ``Feedback`` records
(``docs/fcp_method.md`` §1.3 step 5, §1.5); its mirror image, the pool of the worst
verdicts on the same samples, gives evaluation its fully negative condition:

* keep records with ``min_score <= score <= max_score`` (c+: ``min_score`` 8, the
  critic's "correct and clean" band; the paper does not state its threshold, this is
  our documented choice; negatives: ``max_score`` 2) and, with ``require_correct``
  (``require_incorrect``), only correct (incorrect) ones;
* take the condition text of one ``kind`` (reviewer by default, the paper's "pro");
* drop empty texts (failed judge replies) and length-related phrasings (regexes in
  ``DEFAULT_EXCLUDE``: concise, brief, short, ... as in the paper's "no_concise" pools,
  which stop response length from collapsing during bootstrapping);
* deduplicate (case and whitespace insensitive, first spelling kept).

The pool, its build settings and the counts of what each rule removed are saved to and
loaded from one JSON file. ``sample(rng)`` draws one ``c+`` uniformly.
"""

import json
import os
import random
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np

from fcp_jax.feedback.base import CONDITION_KINDS, Feedback

DEFAULT_EXCLUDE = (r"\bconcise", r"\bbrief", r"\bshort", r"\bsuccinct", r"\bterse",
                   r"\blength", r"\bverbos", r"\bwordy", r"\blong\b", r"\blengthy",
                   r"\bcompact", r"\bpadded", r"\bovers?long")

Rng = Union[np.random.Generator, random.Random, int]


class EmptyPoolError(ValueError):
  """No feedback record passed ``ConditionPool.build``'s filters."""


def _normalize(text: str) -> str:
  return " ".join(text.lower().split())


class ConditionPool:
  """An immutable list of conditions plus how it was built."""

  def __init__(self, conditions: Sequence[str], *, kind: str = "reviewer",
               settings: Optional[Dict[str, Any]] = None,
               stats: Optional[Dict[str, int]] = None):
    if kind not in CONDITION_KINDS:
      raise KeyError(f"Unknown condition kind {kind!r}; known: {CONDITION_KINDS}.")
    self.conditions = tuple(conditions)
    self.kind = kind
    self.settings = dict(settings or {})
    self.stats = dict(stats or {})

  def __len__(self) -> int:
    return len(self.conditions)

  @classmethod
  def build(cls, feedback: Iterable[Feedback], *, kind: str = "reviewer",
            min_score: int = 8, max_score: int = 10, require_correct: bool = False,
            require_incorrect: bool = False,
            exclude: Sequence[str] = DEFAULT_EXCLUDE) -> "ConditionPool":
    """Filters ``feedback`` into a pool (rules in the module docstring)."""
    if require_correct and require_incorrect:
      raise ValueError("require_correct and require_incorrect exclude each other.")
    patterns = [re.compile(p, re.IGNORECASE) for p in exclude]
    stats = dict(records=0, below_threshold=0, above_threshold=0, incorrect=0, correct=0,
                 empty=0, excluded=0, duplicates=0)
    seen, kept = set(), []
    for fb in feedback:
      stats["records"] += 1
      text = fb.condition(kind).strip()
      if fb.score < min_score:
        stats["below_threshold"] += 1
      elif fb.score > max_score:
        stats["above_threshold"] += 1
      elif require_correct and not fb.correct:
        stats["incorrect"] += 1
      elif require_incorrect and fb.correct:
        stats["correct"] += 1
      elif not text:
        stats["empty"] += 1
      elif any(p.search(text) for p in patterns):
        stats["excluded"] += 1
      elif _normalize(text) in seen:
        stats["duplicates"] += 1
      else:
        seen.add(_normalize(text))
        kept.append(text)
    if not kept:
      raise EmptyPoolError(f"The condition pool is empty after filtering: {stats}.")
    settings = dict(min_score=min_score, max_score=max_score,
                    require_correct=require_correct, require_incorrect=require_incorrect,
                    exclude=list(exclude))
    return cls(kept, kind=kind, settings=settings, stats=stats)

  def sample(self, rng: Rng) -> str:
    """One condition drawn uniformly with a numpy Generator, a Random or an int seed."""
    n = len(self.conditions)
    if isinstance(rng, np.random.Generator):
      return self.conditions[int(rng.integers(n))]
    if isinstance(rng, random.Random):
      return self.conditions[rng.randrange(n)]
    if isinstance(rng, (int, np.integer)):
      return self.conditions[random.Random(int(rng)).randrange(n)]
    raise TypeError(f"sample() takes a numpy Generator, a random.Random or an int seed, "
                    f"got {type(rng).__name__}.")

  def to_dict(self) -> Dict[str, Any]:
    return dict(kind=self.kind, conditions=list(self.conditions), settings=self.settings,
                stats=self.stats)

  def save(self, path: str) -> str:
    """Writes the pool as JSON (atomically) and returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_dict(), f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str) -> "ConditionPool":
    with open(path, encoding="utf-8") as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a condition pool JSON file ({e}).") from None
    if not isinstance(d, dict) or not isinstance(d.get("conditions"), list) or not all(
        isinstance(c, str) for c in d["conditions"]):
      raise ValueError(f"{path}: expected {{'conditions': [str, ...], ...}}.")
    return cls(d["conditions"], kind=d.get("kind", "reviewer"),
               settings=d.get("settings"), stats=d.get("stats"))

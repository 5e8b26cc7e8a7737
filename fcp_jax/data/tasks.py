"""Task sources: reasoning-gym, GSM8K and the user's JSONL.

Every task is one registered builder in ``TASKS``; a config names it with a string::

    examples = TASKS.build("chain_sum(min_terms=2, max_terms=3, max_digits=1)",
                           split="train", size=1000, seed=0)      # -> list[Example]

Builders are deterministic given ``(knobs, split, size, seed)``, and their ``train`` and
``eval`` splits are disjoint: reasoning-gym examples are assigned to a split by a hash
of their question (``split_by="hash"``) or of their template (``split_by="template"``,
``gsm_symbolic`` only), whatever seed drew them. GSM8K uses its own train/test files.

Reference steps. Each ``Example`` carries ``steps``: the reference ``a op b = c``
calculations, parsed from the expression (arithmetic tasks), from GSM8K's ``<<a*b=c>>``
calculator annotations, or from the reasoning-gym chain of thought. The rule-based critic
checks a response against them. ``reference_response(example)`` turns them into the
compact SFT warm-up target, one step a line then the final-answer marker::

    3+4=7
    7+5=12
    #### 12

Answer format: a response ends with ``#### <answer>`` (``answers.ANSWER_MARKER``);
``format_question`` appends ``INSTRUCTIONS[style]`` to the question to say so
(``style="none"`` leaves the question bare, for small from-scratch models that learn the
format from the SFT warm-up). Extracting and checking answers is ``fcp_jax.data.answers``.
"""

import dataclasses
import hashlib
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from absl import logging

from fcp_jax.data import answers
from fcp_jax.data import jsonl
from fcp_jax.registry import Registry

TASKS = Registry("task")
SPLITS = ("train", "eval")
INSTRUCTIONS = {
    "marker": ("Show each step, then give the final answer as "
               f"'{answers.ANSWER_MARKER} <number>'."),
    "short": f"End with '{answers.ANSWER_MARKER} <answer>'.",
    "none": "",
}
DATA_DIR_ENV = "FCP_JAX_DATA_DIR"


# ---------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Example:
  """One prompt of a task, with what is known of its solution.

  Attributes:
    uid: stable id (content hash for generated tasks, file index for GSM8K).
    question: the task's question text, without any answer-format instruction.
    answer: reference final answer, or None when unknown.
    reference: reference solution text, or None.
    steps: reference intermediate calculations, in solution order.
    metadata: task-specific details (reasoning-gym metadata, source line, ...).
    task: registered task name.
  """
  uid: str
  question: str
  answer: Optional[str] = None
  reference: Optional[str] = None
  steps: Tuple[answers.Step, ...] = ()
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  task: str = ""

  def to_dict(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d["steps"] = [[s.expr, s.value] for s in self.steps]
    d["metadata"] = dict(self.metadata)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Example":
    d = dict(d)
    d["steps"] = tuple(answers.Step(*s) for s in d.get("steps", ()))
    return cls(**d)


def format_question(example: Example, style: str = "marker") -> str:
  """The user-turn text for ``example``: the question plus the answer instruction."""
  if style not in INSTRUCTIONS:
    raise KeyError(f"Unknown instruction style {style!r}; known: {sorted(INSTRUCTIONS)}.")
  instruction = INSTRUCTIONS[style]
  return f"{example.question}\n{instruction}" if instruction else example.question


def reference_response(example: Example, *, direct: bool = False) -> str:
  """Compact reference chain of thought: one ``a op b=c`` step a line, then the marker.

  With ``direct`` only the final-answer line (``#### <answer>``), as in answer-only
  references.
  """
  if example.answer is None:
    raise ValueError(f"Example {example.uid!r} has no reference answer.")
  steps = [] if direct else [s.text for s in example.steps]
  return "\n".join(steps + [f"{answers.ANSWER_MARKER} {example.answer}"])


def wrong_response(example: Example, delta: int, *, direct: bool = False) -> str:
  """A reference response that ends wrong by ``delta`` (a nonzero integer).

  The chain keeps its steps but its last step's value and the final answer are off by
  ``delta`` (an arithmetic slip at the end); ``direct`` gives only the wrong answer line.
  Raises ``ValueError`` when the answer (or the last step's value) is not a number.
  """
  if not delta:
    raise ValueError("delta must be nonzero.")
  answer = answers.parse_number(example.answer)
  if answer is None:
    raise ValueError(f"Example {example.uid!r}: answer {example.answer!r} is not a number.")
  steps = [] if direct else [s.text for s in example.steps]
  if steps:
    last = example.steps[-1]
    value = answers.parse_number(last.value)
    if value is None:
      raise ValueError(f"Example {example.uid!r}: step value {last.value!r} is not a "
                       "number.")
    steps[-1] = answers.Step(last.expr, answers.format_number(value + delta)).text
  final = answers.format_number(answer + delta)
  return "\n".join(steps + [f"{answers.ANSWER_MARKER} {final}"])


# ---------------------------------------------------------------------------------------
# Splits and seeds.
# ---------------------------------------------------------------------------------------


def stable_hash(*parts: Any) -> int:
  """A 64-bit hash of ``parts`` that is the same in every process and Python run."""
  digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big")


def in_eval_split(key: str, eval_fraction: float) -> bool:
  """Deterministic split assignment: ``key`` is in eval with probability ``eval_fraction``."""
  return stable_hash("split", key) / 2.0**64 < eval_fraction


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
  return split


def _unique_uids(examples: List[Example]) -> List[Example]:
  """Suffixes repeated uids with ``#k`` so every uid of a list is unique."""
  seen: Dict[str, int] = {}
  out = []
  for e in examples:
    seen[e.uid] = seen.get(e.uid, 0) + 1
    out.append(e if seen[e.uid] == 1 else dataclasses.replace(e, uid=f"{e.uid}#{seen[e.uid]}"))
  return out


# ---------------------------------------------------------------------------------------
# reasoning-gym tasks.
# ---------------------------------------------------------------------------------------


def _normalize_answer(answer: Any) -> str:
  """``"24.0"`` -> ``"24"``, ``"1,006"`` -> ``"1006"``; non-numbers unchanged."""
  number = answers.parse_number(str(answer))
  return answers.format_number(number) if number is not None else str(answer).strip()


def _expression_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  expression = entry["metadata"]["expression"]
  value, steps = answers.evaluate(expression)
  if answers.format_number(value) != str(entry["answer"]).strip():
    raise ValueError(f"{task}: {expression!r} evaluates to {value}, "
                     f"reasoning-gym says {entry['answer']!r}.")
  question = f"{expression.replace(' ', '')}=?" if compact else entry["question"]
  return Example(uid="", question=question, answer=str(entry["answer"]),
                 reference=None, steps=steps, metadata=entry["metadata"], task=task)


def _leg_counting_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  from reasoning_gym.arithmetic.leg_counting import ANIMALS  # pylint: disable=g-import-not-at-top
  animals = entry["metadata"]["animals"]
  products = [answers.Step(f"{n}*{ANIMALS[a]}", str(n * ANIMALS[a]))
              for a, n in animals.items()]
  steps = list(products)
  if len(products) > 1:
    total = sum(int(s.value) for s in products)
    steps.append(answers.Step("+".join(s.value for s in products), str(total)))
  question = entry["question"]
  if compact:
    question = "Legs: " + ", ".join(f"{n} {a}" for a, n in animals.items()) + "?"
  return Example(uid="", question=question, answer=str(entry["answer"]), reference=None,
                 steps=tuple(steps), metadata=entry["metadata"], task=task)


def _gsm_symbolic_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  del compact  # Word problems have no compact form.
  cot = entry["metadata"]["answer_cot"]
  return Example(uid="", question=entry["question"], answer=_normalize_answer(entry["answer"]),
                 reference=cot, steps=answers.parse_steps(cot),
                 metadata=entry["metadata"], task=task)


def _reasoning_gym(task: str, to_example, *, split: str, size: int, seed: int,
                   eval_fraction: float, split_by: str, unique: bool, compact: bool,
                   max_chunks: int = 64, **knobs) -> List[Example]:
  """Draws reasoning-gym examples in seeded chunks, keeping those of ``split``."""
  import reasoning_gym  # pylint: disable=g-import-not-at-top
  _check_split(split)
  split_keys = {"hash": lambda ds, i, entry: entry["question"],
                "template": lambda ds, i, entry: f"template-{ds.task_indices[i]}"}
  if split_by not in split_keys:
    raise ValueError(f"split_by must be one of {sorted(split_keys)}, got {split_by!r}.")
  if split_by == "template" and task != "gsm_symbolic":
    raise ValueError("split_by='template' is only available for gsm_symbolic.")
  want_eval = split == "eval"
  fraction = eval_fraction if want_eval else 1.0 - eval_fraction
  chunk = max(64, int(2 * size / max(fraction, 1e-3)))
  out, seen = [], set()
  for c in range(max_chunks):
    chunk_seed = stable_hash(task, split, seed, c) % (2**31)
    try:
      ds = reasoning_gym.create_dataset(task, size=chunk, seed=chunk_seed, **knobs)
    except (TypeError, AssertionError) as e:
      raise ValueError(f"Bad knobs for task {task!r} {knobs}: {e}") from e
    for i in range(len(ds)):
      entry = ds[i]
      if in_eval_split(split_keys[split_by](ds, i, entry), eval_fraction) != want_eval:
        continue
      if unique and entry["question"] in seen:
        continue
      seen.add(entry["question"])
      example = to_example(entry, task, compact)
      uid = f"{task}-{stable_hash(entry['question']):016x}"
      metadata = dict(example.metadata)
      if hasattr(ds, "task_indices"):  # gsm_symbolic: which template made it.
        metadata["template"] = ds.task_indices[i]
      out.append(dataclasses.replace(example, uid=uid, metadata=metadata))
      if len(out) == size:
        return _unique_uids(out)
  raise ValueError(
      f"Task {task!r} ({knobs}) yielded only {len(out)} distinct {split} examples of "
      f"{size} requested: the problem space is too small. Lower size, raise the "
      f"difficulty knobs or pass unique=False.")


def _register_rg(task: str, to_example, **defaults):
  """Registers a reasoning-gym task builder with the common split/seed knobs."""

  def build(*, split: str = "train", size: int = 100, seed: int = 0,
            eval_fraction: float = defaults.get("eval_fraction", 0.1),
            split_by: str = defaults.get("split_by", "hash"), unique: bool = True,
            compact: bool = False, **knobs) -> List[Example]:
    return _reasoning_gym(task, to_example, split=split, size=size, seed=seed,
                          eval_fraction=eval_fraction, split_by=split_by, unique=unique,
                          compact=compact, **knobs)

  build.__name__ = task
  build.__doc__ = (f"reasoning-gym {task!r}: knobs are its config fields (difficulty), "
                   "plus split, size, seed, eval_fraction, split_by, unique, compact.")
  TASKS.register(task)(build)


_register_rg("chain_sum", _expression_example)
_register_rg("basic_arithmetic", _expression_example)
_register_rg("products", _expression_example)
_register_rg("leg_counting", _leg_counting_example)
_register_rg("gsm_symbolic", _gsm_symbolic_example, eval_fraction=0.2,
             split_by="template")


# ---------------------------------------------------------------------------------------
# GSM8K and the user's JSONL.
# ---------------------------------------------------------------------------------------


def default_data_dir() -> str:
  """``$FCP_JAX_DATA_DIR``, else ``<repo root>/../shared/data`` (the folder of gsm8k/)."""
  if os.environ.get(DATA_DIR_ENV):
    return os.environ[DATA_DIR_ENV]
  package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  repo_root = os.path.dirname(package_dir)
  return os.path.join(os.path.dirname(repo_root), "shared", "data")


def _subset(items: List[Any], size: Optional[int], seed: int) -> List[Any]:
  """All items (size None), or a seeded random subset of ``size`` in seeded order."""
  if size is None:
    return items
  if size > len(items):
    raise ValueError(f"Asked for {size} examples, only {len(items)} available.")
  order = sorted(range(len(items)), key=lambda i: stable_hash("subset", seed, i))
  return [items[i] for i in order[:size]]


@TASKS.register("gsm8k")
def gsm8k(*, split: str = "train", size: Optional[int] = None, seed: int = 0,
          data_dir: Optional[str] = None, on_error: str = "raise") -> List[Example]:
  """GSM8K from ``<data_dir>/gsm8k/{train,test}.jsonl`` (``eval`` reads ``test``)."""
  file_split = {"train": "train", "eval": "test", "test": "test"}.get(split)
  if file_split is None:
    raise ValueError(f"Unknown GSM8K split {split!r}; use train, eval or test.")
  path = os.path.join(data_dir or default_data_dir(), "gsm8k", f"{file_split}.jsonl")
  fields = [jsonl.Field("question", str, nonempty=True),
            jsonl.Field("answer", str, nonempty=True)]
  examples, unmarked = [], 0
  for row in jsonl.read_jsonl(path, fields, on_error=on_error):
    solution, index = row["answer"], row["_line"] - 1
    final = answers._after_marker(solution)  # pylint: disable=protected-access
    if final is None:
      if on_error == "raise":
        raise jsonl.JsonlError(path, row["_line"], "missing field", "no '#### answer'")
      unmarked += 1
      continue
    examples.append(Example(
        uid=f"gsm8k-{file_split}-{index}", question=row["question"],
        answer=_normalize_answer(final), reference=solution,
        steps=answers.parse_steps(solution),
        metadata={"index": index, "line": row["_line"]}, task="gsm8k"))
  if unmarked:
    logging.warning("Skipped %d GSM8K row(s) of %s without a '####' answer.", unmarked, path)
  return _subset(examples, size, seed)


@TASKS.register("jsonl")
def jsonl_task(*, path: str, split: str = "train", size: Optional[int] = None,
               seed: int = 0, eval_fraction: float = 0.0, on_error: str = "raise",
               name: str = "jsonl") -> List[Example]:
  """The user's prompts: ``{"question"|"prompt", ["answer"], ["reference"], ["uid"|"id"]}``.

  With ``eval_fraction > 0`` the rows are split by a hash of their uid; with 0 every
  row is in ``train`` and ``eval`` is empty.
  """
  _check_split(split)
  fields = [jsonl.Field("question", str, nonempty=True, aliases=("prompt",)),
            jsonl.Field("answer", (str, int, float), required=False),
            jsonl.Field("reference", str, required=False),
            jsonl.Field("uid", (str, int), required=False, aliases=("id",))]
  examples = []
  for row in jsonl.read_jsonl(path, fields, on_error=on_error):
    uid = str(row["uid"]) if row["uid"] is not None else (
        f"{name}-{stable_hash(row['question']):016x}")
    if in_eval_split(uid, eval_fraction) != (split == "eval"):
      continue
    answer, reference = row["answer"], row["reference"]
    examples.append(Example(
        uid=uid, question=row["question"],
        answer=None if answer is None else _normalize_answer(answer), reference=reference,
        steps=answers.parse_steps(reference) if reference else (),
        metadata={"line": row["_line"], "path": os.path.basename(path)}, task=name))
  return _subset(_unique_uids(examples), size, seed)

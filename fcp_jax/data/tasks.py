"""Task sources (reasoning-gym, GSM8K, the user's JSONL), answer extraction and checking.

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

Answer format (decided here, in one place): a response ends with ``#### <answer>``;
``format_question`` appends ``INSTRUCTIONS[style]`` to the question to say so
(``style="none"`` leaves the question bare, for small from-scratch models that learn the
format from the SFT warm-up). ``extract_answer`` also accepts ``\\boxed{}``, "the answer
is n" and, last, the final number of the text; ``check_answer`` compares numerically
first, then with the task's reasoning-gym scorer, then with math-verify.
"""

import dataclasses
import fractions
import hashlib
import math
import operator
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from absl import logging

from fcp_jax.data import jsonl
from fcp_jax.registry import Registry

TASKS = Registry("task")
SPLITS = ("train", "eval")
ANSWER_MARKER = "####"
INSTRUCTIONS = {
    "marker": f"Show each step, then give the final answer as '{ANSWER_MARKER} <number>'.",
    "short": f"End with '{ANSWER_MARKER} <answer>'.",
    "none": "",
}
DATA_DIR_ENV = "FCP_JAX_DATA_DIR"

Fraction = fractions.Fraction


# ---------------------------------------------------------------------------------------
# Records.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
  """One reference calculation ``expr = value`` (e.g. ``Step("48/2", "24")``)."""
  expr: str
  value: str

  @property
  def text(self) -> str:
    return f"{self.expr}={self.value}"


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
  steps: Tuple[Step, ...] = ()
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
    d["steps"] = tuple(Step(*s) for s in d.get("steps", ()))
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
  return "\n".join(steps + [f"{ANSWER_MARKER} {example.answer}"])


def wrong_response(example: Example, delta: int, *, direct: bool = False) -> str:
  """A reference response that ends wrong by ``delta`` (a nonzero integer).

  The chain keeps its steps but its last step's value and the final answer are off by
  ``delta`` (an arithmetic slip at the end); ``direct`` gives only the wrong answer line.
  Raises ``ValueError`` when the answer (or the last step's value) is not a number.
  """
  if not delta:
    raise ValueError("delta must be nonzero.")
  answer = parse_number(example.answer)
  if answer is None:
    raise ValueError(f"Example {example.uid!r}: answer {example.answer!r} is not a number.")
  steps = [] if direct else [s.text for s in example.steps]
  if steps:
    last = example.steps[-1]
    value = parse_number(last.value)
    if value is None:
      raise ValueError(f"Example {example.uid!r}: step value {last.value!r} is not a "
                       "number.")
    steps[-1] = Step(last.expr, format_number(value + delta)).text
  return "\n".join(steps + [f"{ANSWER_MARKER} {format_number(answer + delta)}"])


# ---------------------------------------------------------------------------------------
# Numbers and arithmetic expressions.
# ---------------------------------------------------------------------------------------

_NUM = r"\d+(?:\.\d+)?|\.\d+"
_NUM_RE = re.compile(_NUM)
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_CURRENCY = "$€£"
_STRIP_NUMBER = {ord(c): None for c in _CURRENCY + "% "}
_STRIP_CURRENCY = {ord(c): None for c in _CURRENCY}
_OPS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "·": "*", "/": "/", "÷": "/"}
_TOKEN_RE = re.compile(rf"\s*(?:({_NUM})|([-+*/x×·÷()]))")
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def normalize_text(text: str) -> str:
  """Drops thousands separators (``1,234`` -> ``1234``) so numbers parse as one."""
  return _THOUSANDS_RE.sub("", text)


def parse_number(text: Any) -> Optional[Fraction]:
  """``"1,234"``, ``"$5"``, ``"-3.50"``, ``"3/4"``, ``"12%"`` -> exact Fraction, else None."""
  if isinstance(text, (int, Fraction)) and not isinstance(text, bool):
    return Fraction(text)
  if isinstance(text, float):
    return Fraction(text).limit_denominator(10**9) if math.isfinite(text) else None
  if not isinstance(text, str):
    return None
  s = normalize_text(text).translate(_STRIP_NUMBER).strip()
  s = s.rstrip(".")
  m = re.fullmatch(rf"([-+]?)({_NUM})(?:/({_NUM}))?", s)
  if not m:
    return None
  value = Fraction(m.group(2))
  if m.group(3):
    denominator = Fraction(m.group(3))
    if denominator == 0:
      return None
    value /= denominator
  return -value if m.group(1) == "-" else value


def format_number(value: Fraction) -> str:
  """Exact integers and terminating decimals as written; others rounded to 6 places."""
  if value.denominator == 1:
    return str(value.numerator)
  den = value.denominator
  for p in (2, 5):
    while den % p == 0:
      den //= p
  if den == 1:
    text = f"{float(value):.12f}".rstrip("0")
  else:
    text = f"{float(value):.6f}".rstrip("0")
  return text.rstrip(".")


def number_matches(stated: str, value: Fraction,
                   parsed: Optional[Fraction] = None) -> bool:
  """Whether the written number ``stated`` equals ``value`` up to its shown rounding.

  ``parsed`` is ``parse_number(stated)`` when the caller already has it.
  """
  s = parse_number(stated) if parsed is None else parsed
  if s is None:
    return False
  if s == value:
    return True
  digits = stated.split(".")[1] if "." in stated else ""
  decimals = len(re.match(r"\d*", digits).group(0))
  if decimals == 0:
    return False
  return abs(s - value) <= Fraction(1, 2 * 10**decimals) + Fraction(1, 10**12)


def numbers_in(text: str) -> List[Tuple[str, Fraction]]:
  """All numbers in ``text`` as ``(written, value)``, with signs where a minus is unary."""
  text = normalize_text(text)
  out = []
  for m in _NUM_RE.finditer(text):
    start, written = m.start(), m.group(0)
    before = text[:start].rstrip(" \t" + _CURRENCY)
    if before.endswith("-"):
      prev = before[:-1].rstrip(" \t")
      if not prev or not (prev[-1].isdigit() or prev[-1] in ")]}%"):
        written = "-" + written
    out.append((written, parse_number(written)))
  return out


class _Parser:
  """Recursive-descent evaluator for ``+ - * / ( )`` over exact Fractions.

  Each binary operation is recorded as a ``Step`` (operands formatted, negative right
  operands in parentheses), so ``(2+3)*4`` yields ``2+3=5`` then ``5*4=20``.
  """

  def __init__(self, tokens: Sequence[Tuple[str, str]]):
    self.tokens, self.i, self.steps = list(tokens), 0, []
    self.binary_ops = 0

  def parse(self) -> Fraction:
    value = self._expr()
    if self.i != len(self.tokens):
      raise ValueError("trailing tokens")
    return value

  def _peek(self) -> Optional[str]:
    return self.tokens[self.i][1] if self.i < len(self.tokens) else None

  def _binary(self, a: Fraction, op: str, b: Fraction) -> Fraction:
    self.binary_ops += 1
    if op == "/" and b == 0:
      raise ZeroDivisionError("division by zero")
    value = _APPLY[op](a, b)
    right = format_number(b)
    right = f"({right})" if b < 0 else right
    self.steps.append(Step(f"{format_number(a)}{op}{right}", format_number(value)))
    return value

  def _expr(self) -> Fraction:
    value = self._term()
    while self._peek() in ("+", "-"):
      op = self._peek()
      self.i += 1
      value = self._binary(value, op, self._term())
    return value

  def _term(self) -> Fraction:
    value = self._unary()
    while self._peek() in ("*", "/"):
      op = self._peek()
      self.i += 1
      value = self._binary(value, op, self._unary())
    return value

  def _unary(self) -> Fraction:
    if self._peek() in ("+", "-"):
      op = self._peek()
      self.i += 1
      value = self._unary()
      return -value if op == "-" else value
    return self._atom()

  def _atom(self) -> Fraction:
    if self.i >= len(self.tokens):
      raise ValueError("unexpected end")
    kind, tok = self.tokens[self.i]
    self.i += 1
    if kind == "num":
      return Fraction(tok)
    if tok == "(":
      value = self._expr()
      if self._peek() != ")":
        raise ValueError("missing ')'")
      self.i += 1
      return value
    raise ValueError(f"unexpected {tok!r}")


def tokenize_expression(text: str) -> Optional[List[Tuple[str, str]]]:
  """``"3 x (4+5)"`` -> ``[("num","3"), ("op","*"), ...]``; None if not all arithmetic."""
  text = text.translate(_STRIP_CURRENCY)
  tokens, pos = [], 0
  while pos < len(text):
    m = _TOKEN_RE.match(text, pos)
    if not m:
      if text[pos:].strip():
        return None
      break
    pos = m.end()
    if m.group(1):
      tokens.append(("num", m.group(1)))
    else:
      tokens.append(("op", _OPS.get(m.group(2), m.group(2))))
  return tokens


def evaluate(expression: str) -> Tuple[Fraction, Tuple[Step, ...]]:
  """Evaluates an arithmetic expression exactly; returns its value and binary steps."""
  tokens = tokenize_expression(expression)
  if tokens is None:
    raise ValueError(f"Not an arithmetic expression: {expression!r}.")
  parser = _Parser(tokens)
  return parser.parse(), tuple(parser.steps)


@dataclasses.dataclass(frozen=True)
class Claim:
  """A calculation ``expr = stated`` written in a text, with its true value."""
  expr: str  # Normalised left-hand side, e.g. "7+5".
  stated: str  # The right-hand side as written, e.g. "13".
  value: Optional[Fraction]  # True value of ``expr``; None on division by zero.
  line: int  # 1-based line of the text.

  @property
  def ok(self) -> bool:
    return self.value is not None and number_matches(self.stated, self.value)

  @property
  def text(self) -> str:
    return f"{self.expr}={self.stated}"


_LHS_CHARS = set("0123456789. ()+-*/x×·÷" + _CURRENCY)
_RHS_RE = re.compile(rf"[ \t]*[{_CURRENCY}]?[ \t]*(-?[ \t]?(?:{_NUM}))([ \t]*%)?")
_CONTINUES_RE = re.compile(rf"[ \t]*[-+*/x×÷][ \t]*\(?[ \t]*(?:{_NUM})")


def _claim_lhs(segment: str) -> Optional[Tuple[str, List[Tuple[str, str]]]]:
  """The longest arithmetic suffix of ``segment`` with at least one binary operator."""
  tokens = tokenize_expression(segment)
  if tokens is None:
    # A stray character (e.g. a sentence's full stop): keep what follows the last one.
    tokens = tokenize_expression(re.split(r"\.(?!\d)", segment)[-1])
    if tokens is None:
      return None
  for k in range(len(tokens)):
    parser = _Parser(tokens[k:])
    try:
      parser.parse()
    except ZeroDivisionError:
      pass  # A well-formed claim such as "5/0=3"; it is wrong, not unparsable.
    except ValueError:
      continue
    if parser.binary_ops:
      return "".join(t for _, t in tokens[k:]), tokens[k:]
    return None
  return None


def find_claims(text: str) -> List[Claim]:
  """Every ``a op b [op c ...] = c`` calculation in ``text``, in order of appearance.

  Handles ``+ - * / x × ÷``, parentheses, integers, decimals, ``$`` signs, thousands
  separators and GSM8K ``<<48/2=24>>`` annotations. A chain ``a = b + c`` whose
  right-hand side continues with an operator is not a claim.
  """
  text = normalize_text(text)
  claims = []
  for m in re.finditer(r"(?<![<>!=])=(?!=)", text):
    start = text.rfind("\n", 0, m.start()) + 1
    j = m.start()
    while j > start and text[j - 1] in _LHS_CHARS:
      j -= 1
    lhs = _claim_lhs(text[j:m.start()])
    rhs = _RHS_RE.match(text, m.end())
    if lhs is None or rhs is None or rhs.group(2):
      continue
    if _CONTINUES_RE.match(text, rhs.end()):
      continue
    expr, tokens = lhs
    try:
      value = _Parser(tokens).parse()
    except ZeroDivisionError:
      value = None
    line = text.count("\n", 0, m.start()) + 1
    claims.append(Claim(expr, rhs.group(1).replace(" ", ""), value, line))
  return claims


def parse_steps(text: str) -> Tuple[Step, ...]:
  """Reference steps of a solution: GSM8K ``<<..=..>>`` annotations, else its claims."""
  annotated = re.findall(r"<<([^<>=]+)=([^<>]+)>>", normalize_text(text))
  if annotated:
    steps = []
    for expr, value in annotated:
      number = parse_number(value)
      if number is not None:
        steps.append(Step(expr.replace(" ", ""), format_number(number)))
    return tuple(steps)
  return tuple(Step(c.expr, format_number(c.value)) for c in find_claims(text) if c.ok)


# ---------------------------------------------------------------------------------------
# Final answers.
# ---------------------------------------------------------------------------------------


def _boxed(text: str) -> Optional[str]:
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip()
  return None


def _after_marker(text: str) -> Optional[str]:
  found = re.findall(rf"{ANSWER_MARKER}\s*([^\n]*)", text)
  return found[-1].strip() if found and found[-1].strip() else None


def _answer_is(text: str) -> Optional[str]:
  found = re.findall(r"answer is[:\s]*\$?\s*([-\d.,/]+)", text, flags=re.IGNORECASE)
  found = [f.rstrip(".,") for f in found if re.search(r"\d", f)]
  return found[-1] if found else None


def _last_number(text: str) -> Optional[str]:
  found = numbers_in(text)
  return found[-1][0] if found else None


def _leading_number(answer: str) -> str:
  """``"$12.50 dollars"`` -> ``"12.50"``, ``"1/2."`` -> ``"1/2"``; else its first number."""
  chunk = re.match(rf"[-\d./{_CURRENCY}]*", answer).group(0).rstrip(".")
  chunk = chunk.translate(_STRIP_CURRENCY)
  if parse_number(chunk) is not None:
    return chunk
  number = numbers_in(answer)
  return number[0][0] if number else answer


# In priority order: the first extractor that finds something wins.
ANSWER_EXTRACTORS: Tuple[Tuple[str, Callable[[str], Optional[str]]], ...] = (
    ("marker", _after_marker),
    ("boxed", _boxed),
    ("answer_is", _answer_is),
    ("last_number", _last_number),
)


def find_final_answer(text: str) -> Tuple[Optional[str], Optional[str]]:
  """Returns ``(answer, how)`` with ``how`` the name of the extractor that found it."""
  text = normalize_text(text or "")
  for name, extractor in ANSWER_EXTRACTORS:
    answer = extractor(text)
    if answer:
      return (_leading_number(answer) if name != "boxed" else answer), name
  return None, None


def extract_answer(text: str) -> Optional[str]:
  """The final answer of a response (see ``ANSWER_EXTRACTORS``), or None."""
  return find_final_answer(text)[0]


def answers_equal(predicted: Optional[str], gold: Optional[str]) -> Optional[bool]:
  """Fast numeric comparison; None when either side is not a plain number."""
  p, g = parse_number(predicted), parse_number(gold)
  if p is None or g is None:
    return None
  return p == g or abs(p - g) <= Fraction(1, 10**9) * max(1, abs(g))


def check_answer(example: Example, response: str) -> bool:
  """Whether ``response``'s final answer matches the example's reference answer."""
  if example.answer is None:
    raise ValueError(f"Example {example.uid!r} has no reference answer to check against.")
  predicted = extract_answer(response)
  if predicted is None:
    return False
  numeric = answers_equal(predicted, example.answer)
  if numeric is not None:
    return numeric
  if example.task in _RG_TASKS:
    import reasoning_gym  # pylint: disable=g-import-not-at-top
    entry = {"question": example.question, "answer": example.answer,
             "metadata": dict(example.metadata)}
    return reasoning_gym.get_score_answer_fn(example.task)(predicted, entry) >= 1.0
  import math_verify  # pylint: disable=g-import-not-at-top
  gold = math_verify.parse(f"\\boxed{{{example.answer}}}")
  return bool(math_verify.verify(gold, math_verify.parse(f"\\boxed{{{predicted}}}")))


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

_RG_TASKS = ("chain_sum", "basic_arithmetic", "products", "leg_counting", "gsm_symbolic")


def _normalize_answer(answer: Any) -> str:
  """``"24.0"`` -> ``"24"``, ``"1,006"`` -> ``"1006"``; non-numbers unchanged."""
  number = parse_number(str(answer))
  return format_number(number) if number is not None else str(answer).strip()


def _expression_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  expression = entry["metadata"]["expression"]
  value, steps = evaluate(expression)
  if format_number(value) != str(entry["answer"]).strip():
    raise ValueError(f"{task}: {expression!r} evaluates to {value}, "
                     f"reasoning-gym says {entry['answer']!r}.")
  question = f"{expression.replace(' ', '')}=?" if compact else entry["question"]
  return Example(uid="", question=question, answer=str(entry["answer"]),
                 reference=None, steps=steps, metadata=entry["metadata"], task=task)


def _leg_counting_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  from reasoning_gym.arithmetic.leg_counting import ANIMALS  # pylint: disable=g-import-not-at-top
  animals = entry["metadata"]["animals"]
  products = [Step(f"{n}*{ANIMALS[a]}", str(n * ANIMALS[a])) for a, n in animals.items()]
  steps = list(products)
  if len(products) > 1:
    total = sum(int(s.value) for s in products)
    steps.append(Step("+".join(s.value for s in products), str(total)))
  question = entry["question"]
  if compact:
    question = "Legs: " + ", ".join(f"{n} {a}" for a, n in animals.items()) + "?"
  return Example(uid="", question=question, answer=str(entry["answer"]), reference=None,
                 steps=tuple(steps), metadata=entry["metadata"], task=task)


def _gsm_symbolic_example(entry: Dict[str, Any], task: str, compact: bool) -> Example:
  del compact  # Word problems have no compact form.
  cot = entry["metadata"]["answer_cot"]
  return Example(uid="", question=entry["question"], answer=_normalize_answer(entry["answer"]),
                 reference=cot, steps=parse_steps(cot), metadata=entry["metadata"],
                 task=task)


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
    final = _after_marker(solution)
    if final is None:
      if on_error == "raise":
        raise jsonl.JsonlError(path, row["_line"], "missing field", "no '#### answer'")
      unmarked += 1
      continue
    examples.append(Example(
        uid=f"gsm8k-{file_split}-{index}", question=row["question"],
        answer=_normalize_answer(final), reference=solution, steps=parse_steps(solution),
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
        steps=parse_steps(reference) if reference else (),
        metadata={"line": row["_line"], "path": os.path.basename(path)}, task=name))
  return _subset(_unique_uids(examples), size, seed)

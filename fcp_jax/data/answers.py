"""Answer checking: numbers, arithmetic claims and the final answer of a response.

``find_claims`` finds the ``a op b = c`` calculations of a text and evaluates them
exactly (over Fractions); the rule-based critic checks responses with them.
``extract_answer`` takes a response's final answer: after the ``#### `` marker
(``ANSWER_MARKER``), else from ``\\boxed{}``, "the answer is n" and, last, the final
number of the text; ``check_answer`` compares it with an ``Example``'s reference answer
numerically first, then with the task's reasoning-gym scorer, then with math-verify.
"""

import dataclasses
import fractions
import math
import operator
import re
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
  from fcp_jax.data.tasks import Example

ANSWER_MARKER = "####"
# Tasks whose non-numeric answers reasoning-gym's own scorer checks.
_RG_TASKS = ("chain_sum", "basic_arithmetic", "products", "leg_counting", "gsm_symbolic")

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


def check_answer(example: "Example", response: str) -> bool:
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

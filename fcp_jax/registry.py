"""String registries: turn config strings like ``"absmean(eps=1e-5)"`` into objects.

Every pluggable piece (quantizers, losses, tasks, feedback envs, sampling methods)
lives in a ``Registry`` of its kind. A config names it with a plain string::

    QUANTIZERS = Registry("weight quantizer")

    @QUANTIZERS.register("absmean")
    def absmean(w, *, eps=1e-5): ...

    fn = QUANTIZERS.get("absmean(eps=1e-6)")   # functools.partial(absmean, eps=1e-6)

Arguments in the string are Python literals (numbers, strings, tuples, bools, None).
An unknown name raises ``KeyError`` listing every registered name of that kind.
"""

import ast
import difflib
import functools
from typing import Any, Callable, Dict, Tuple

ALL_REGISTRIES: Dict[str, "Registry"] = {}


def parse_spec(spec: str) -> Tuple[str, Tuple[Any, ...], Dict[str, Any]]:
  """Splits ``"name(1, a=2)"`` into ``("name", (1,), {"a": 2})``."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"Registry spec must be a non-empty string, got {spec!r}.")
  try:
    node = ast.parse(spec.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse registry spec {spec!r}: {e.msg}.") from None
  if isinstance(node, ast.Call):
    func, args, kwargs = node.func, node.args, node.keywords
  else:
    func, args, kwargs = node, [], []
  name = ast.unparse(func)  # Allows dotted names like "gsm8k.test".
  try:
    args = tuple(ast.literal_eval(a) for a in args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in kwargs}
  except ValueError:
    raise ValueError(
        f"Registry spec {spec!r}: arguments must be Python literals.") from None
  return name, args, kwargs


class Registry:
  """A named table of registered callables of one kind."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: Dict[str, Callable[..., Any]] = {}
    ALL_REGISTRIES[kind] = self

  def register(self, name: str):
    """Decorator that registers ``fn`` under ``name``."""

    def decorator(fn):
      if name in self._items:
        raise KeyError(f"{self.kind} {name!r} is already registered.")
      self._items[name] = fn
      return fn

    return decorator

  def names(self):
    return sorted(self._items)

  def __contains__(self, spec: str) -> bool:
    return parse_spec(spec)[0] in self._items

  def lookup(self, name: str) -> Callable[..., Any]:
    """Returns the object registered as ``name`` (no arguments parsed)."""
    if name not in self._items:
      close = difflib.get_close_matches(name, self._items, n=3)
      hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
      raise KeyError(f"Unknown {self.kind} {name!r}.{hint} "
                     f"Registered: {', '.join(self.names())}.")
    return self._items[name]

  def get(self, spec: str, **extra) -> Callable[..., Any]:
    """Returns a partial of the registered object with the spec's arguments."""
    name, args, kwargs = parse_spec(spec)
    return functools.partial(self.lookup(name), *args, **{**kwargs, **extra})

  def build(self, spec: str, *args, **extra) -> Any:
    """Calls the registered object with the spec's arguments plus ``extra``."""
    return self.get(spec, **extra)(*args)

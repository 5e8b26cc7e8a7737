"""Experiment configs: loading ``configs/x.py:arg``, overrides, validation, saving.

Configs follow big_vision: a module with ``get_config(arg)`` returning a locked
``ml_collections.ConfigDict`` of plain values and registry strings. ``arg`` is a
comma-separated list parsed by ``parse_arg``::

    def get_config(arg=None):
      arg = config_lib.parse_arg(arg, variant="small", runlocal=False)

Drivers take ``--config configs/x.py:arg --config.a.b=v --workdir DIR`` through
``define_flags`` / ``config_from_flags``; the resolved config lands in
``DIR/config.json``. An override naming a key that does not exist fails with the nearest
valid keys.
"""

import ast
import difflib
import importlib.util
import json
import logging
import os
from typing import Any, Callable, Iterable, List, Sequence

import ml_collections


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses ``"variant=tiny,runlocal"`` against defaults ``spec`` (big_vision style).

  A bare word sets a boolean default to True. Values are cast to the type of their
  default. Unknown names raise unless ``lazy`` is set (then they are kept as strings).
  """
  out = ml_collections.ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        close = difflib.get_close_matches(key, spec, n=3)
        raise ValueError(f"Unknown config arg {key!r}."
                         + (f" Did you mean {close}?" if close else "")
                         + f" Valid args: {sorted(spec)}.")
      out[key] = value if eq else True
      continue
    default = spec[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"Config arg {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    elif default is None:
      out[key] = value
    else:
      out[key] = type(default)(value)
  return out


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` and returns ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      f"_fcp_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None) if arg else module.get_config()
  config.lock()
  return config


# Sections of an FCP pipeline config that are run configs of their own.
PIPELINE_STAGES = ("warmup", "offline", "rft", "bootstrap", "grpo")


def pipeline_stage(config: ml_collections.ConfigDict, stage: str
                   ) -> ml_collections.ConfigDict:
  """One stage's own config from an FCP pipeline config (the configs' ``stage`` arg).

  ``""`` returns the pipeline config; ``warmup``, ``offline``, ``rft`` (configs of
  ``fcp_jax.train``), ``bootstrap``, ``grpo`` (of ``fcp_jax.bootstrap``) their section;
  ``eval`` a ``fcp_jax.evaluate`` config with the warm-up's model.
  """
  if not stage:
    return config
  if stage == "eval":
    return ml_collections.ConfigDict(dict(
        seed=config.seed, tokenizer=config.tokenizer, init_from="",
        model=config.warmup.model, quant=config.warmup.quant, eval=config.eval))
  if stage not in PIPELINE_STAGES:
    raise ValueError(f"Unknown stage {stage!r}; known: eval, {', '.join(PIPELINE_STAGES)}.")
  return config[stage]


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> List[str]:
  """All leaf keys of ``config`` as dotted paths."""
  keys = []
  for k, v in config.items():
    path = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flat_keys(v, path + "."))
    else:
      keys.append(path)
  return keys


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str) or (current is None and not _looks_literal(text)):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if isinstance(current, bool) or current is None:
      return text
    raise ValueError(f"Cannot parse {text!r} as {type(current).__name__}.") from None
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ValueError(f"Expected a bool, got {text!r}.")
  elif isinstance(current, float) and isinstance(value, int):
    value = float(value)
  elif isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  return value


def _looks_literal(text: str) -> bool:
  try:
    ast.literal_eval(text)
    return True
  except (ValueError, SyntaxError):
    return False


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Applies ``["a.b=v", ...]``; unknown keys raise ``KeyError`` with the nearest keys."""
  valid = flat_keys(config)
  for item in overrides:
    key, eq, text = item.partition("=")
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    if not eq:
      raise ValueError(f"Override {item!r} must look like key=value.")
    if key not in valid:
      close = difflib.get_close_matches(key, valid, n=5, cutoff=0.4)
      raise KeyError(f"Unknown config key {key!r} in override {item!r}. "
                     f"Nearest valid keys: {close or valid[:10]}.")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = _parse_value(text, node[leaf])
    except ValueError as e:
      raise ValueError(f"Override {key}={text!r}: {e}") from None
    with node.ignore_type():
      node[leaf] = value
  return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates ``--config.a.b=v`` / ``--config.a.b v`` items from the other flags."""
  rest, overrides = [], []
  it = iter(argv)
  for a in it:
    if a.startswith("--config."):
      if "=" not in a:
        a = f"{a}={next(it, '')}"
      overrides.append(a[len("--config."):])
    else:
      rest.append(a)
  return rest, overrides


def parse_flags(args: Sequence[str]) -> dict:
  """``["--a=1", "--b", "2"]`` -> ``{"a": "1", "b": "2"}``; anything else raises."""
  flags, it = {}, iter(args)
  for a in it:
    if not a.startswith("--"):
      raise ValueError(f"Unexpected argument {a!r}; flags look like --name=value.")
    name, eq, value = a[2:].partition("=")
    flags[name] = value if eq else next(it, "")
  return flags


def config_from_argv(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, dict]:
  """Parses a driver's command line: ``--config SPEC [--config.k=v ...] [--workdir D]``.

  Returns the locked config and a dict of the remaining ``--name=value`` flags.
  """
  rest, overrides = split_overrides(list(argv))
  flags = parse_flags(rest)
  if "config" not in flags:
    raise ValueError("Missing --config path/to/config.py[:arg].")
  config = load_config(flags.pop("config"))
  apply_overrides(config, overrides)
  return config, flags


def to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def write_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``workdir/config.json`` (atomically) and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


class _QuietLibraries(logging.Filter):
  """Drops orbax's per-save INFO chatter from a run's log (warnings stay)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING
            or f"{os.sep}orbax{os.sep}" not in record.pathname)


def driver_main(argv: Sequence[str], run: Callable[[Any, str], Any]) -> Any:
  """The command line every driver shares: ``--config spec --workdir DIR [--config.k=v]``.

  Parses and validates the flags, sets up absl logging (INFO), then calls
  ``run(config, workdir)`` and returns its result.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  config, rest = config_from_argv(argv)
  workdir = rest.pop("workdir", "")
  if not workdir:
    raise ValueError("Missing --workdir DIR.")
  if rest:
    raise ValueError(f"Unknown flags {sorted(rest)}; expected --config, --config.k=v "
                     "and --workdir.")
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags.
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())
  return run(config, workdir)

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
import copy
import difflib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
import types
from typing import Any, Callable, Iterable, List, Sequence

import ml_collections

from fcp_jax import compile_cache
from fcp_jax import host


BOOL_SPELLINGS = {"true": True, "1": True, "yes": True, "false": False, "0": False,
                  "no": False}


def parse_bool(text: str, what: str) -> bool:
  """``text`` as a bool; anything but ``BOOL_SPELLINGS`` is an error naming ``what``."""
  value = BOOL_SPELLINGS.get(str(text).strip().lower())
  if value is None:
    raise ValueError(f"{what}: {text!r} is not a boolean; use one of "
                     f"{sorted(BOOL_SPELLINGS)}.")
  return value


def parse_arg(arg: str | None, *, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
  """Parses ``"variant=tiny,runlocal"`` against defaults ``spec`` (big_vision style).

  A bare word sets a boolean default to True. Values are cast to the type of their
  default: booleans accept only ``BOOL_SPELLINGS``, numbers must parse as their type;
  anything else raises naming the arg. Unknown names raise unless ``lazy`` is set (then
  they are kept as strings).
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
      out[key] = parse_bool(value, f"Config arg {key!r}")
    elif default is None or isinstance(default, str):
      out[key] = value
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"Config arg {key}={value!r} is not a "
                         f"{type(default).__name__}.") from None
  return out


def load_module(path: str) -> types.ModuleType:
  """Executes the config file ``path`` as a module of a package of its directory.

  The package (one per directory, kept in ``sys.modules``) lets a config import its
  siblings whatever the working directory: ``from . import common``.
  """
  path = os.path.abspath(path)
  directory, filename = os.path.split(path)
  package = f"_fcp_configs_{abs(hash(directory))}"
  if package not in sys.modules:
    package_spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    package_spec.submodule_search_locations = [directory]
    sys.modules[package] = importlib.util.module_from_spec(package_spec)
  module_spec = importlib.util.spec_from_file_location(
      f"{package}.{os.path.splitext(filename)[0]}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:arg]`` and returns ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  module = load_module(path)
  config = module.get_config(arg or None) if arg else module.get_config()
  config.lock()
  return config


# ---------------------------------------------------------------------------------------
# Pipeline configs: shared settings written once, stage configs derived from them.
# ---------------------------------------------------------------------------------------

# Sections of an FCP pipeline config that are run configs of their own, by driver kind.
STAGE_KINDS = {"warmup": "offline", "offline": "offline", "rft": "offline",
               "bootstrap": "online", "grpo": "online", "eval": "eval"}
PIPELINE_STAGES = tuple(k for k in STAGE_KINDS if k != "eval")
_COMMON = {"seed": "seed", "tokenizer": "tokenizer", "model": "model"}
# Per stage kind: {key in the stage's resolved config: shared key of the pipeline
# config}. These keys live only at the top of a pipeline config; resolution copies them
# into every stage, so an override of the shared key reaches every stage.
DERIVED = {
    "offline": {**_COMMON, "parallel": "parallel", "data.system": "data.system"},
    "online": {**_COMMON, "parallel": "parallel", "online.task": "data.task",
               "online.task_seed": "data.task_seed",
               "online.instruction": "data.instruction", "online.system": "data.system",
               "online.condition_kind": "kind", "online.feedback": "feedback"},
    "eval": {**_COMMON, "parallel": "parallel", "eval.task": "data.task",
             "eval.task_seed": "data.task_seed", "eval.instruction": "data.instruction",
             "eval.system": "data.system", "eval.kind": "kind",
             "eval.feedback": "feedback"},
}


# A stage whose ``lr_factor`` is set (and ``optim.lr`` None) trains at that factor times
# the lr of the stage it continues from.
RELATIVE_LR = {"bootstrap": "offline"}


def get(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """``config`` at a dotted key (``"checkpoint.every"``)."""
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _has(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def shared_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of shared ``key`` that stages get (``data.task_seed=None``: the seed)."""
  value = get(config, key)
  if key == "data.task_seed" and value is None:
    return int(config.seed)  # No task seed of its own: the experiment's seed.
  if isinstance(value, ml_collections.ConfigDict):
    return copy.deepcopy(value)
  return value


def stage_fields(*, log_every: int, checkpoint_every: int, keep: int
                 ) -> ml_collections.ConfigDict:
  """The fields every training stage of a pipeline config has besides ``DERIVED`` ones:
  logging, ``init_from`` (filled by the pipeline), plots, the λ schedule (λ = 1: the
  warm-up ramps it), whether elastic activation steps start from the first batch
  (``act_alpha_from_data``) and checkpointing."""
  return ml_collections.ConfigDict(dict(
      log_every=log_every, init_from="", plots=True,
      quant=dict(lambda_start=0, lambda_ramp=0, lambda_stagger=0,
                 act_alpha_from_data=True),
      checkpoint=dict(every=checkpoint_every, keep=keep, async_save=False)))


def derived_from(stage_key: str) -> str | None:
  """The shared key that ``stage_key`` (e.g. ``bootstrap.online.task``) is derived from."""
  stage, _, rest = stage_key.partition(".")
  if stage == "eval":  # The pipeline's eval section is the eval config's own section.
    rest = stage_key
  for key, shared in DERIVED.get(STAGE_KINDS.get(stage, ""), {}).items():
    if rest == key or rest.startswith(key + "."):
      return shared + rest[len(key):]
  return None


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
  return all(name in config for name in PIPELINE_STAGES)


def stage_config(config: ml_collections.ConfigDict, stage: str
                 ) -> ml_collections.ConfigDict:
  """One stage's resolved run config from an FCP pipeline config.

  The stage's own section plus every ``DERIVED`` key copied from the shared settings
  (seed, tokenizer, model, parallelism, task, feedback env, condition kind, system
  prompt, instruction); a stage with ``lr_factor`` gets its ``optim.lr`` from the
  stage it continues from (``RELATIVE_LR``). ``eval`` gives a ``fcp_jax.evaluate``
  config; its λ schedule is the warm-up's (evaluation runs the final λ). A stage
  section that holds a derived key itself is an error naming both keys.
  """
  if stage not in STAGE_KINDS:
    raise ValueError(f"Unknown stage {stage!r}; known: {', '.join(STAGE_KINDS)}.")
  if stage == "eval":
    out = ml_collections.ConfigDict(dict(init_from="", quant=copy.deepcopy(
        config.warmup.quant), eval=copy.deepcopy(config.eval)))
  else:
    out = copy.deepcopy(config[stage])
  out.unlock()
  for key, shared in DERIVED[STAGE_KINDS[stage]].items():
    if _has(out, key):
      raise ValueError(f"config.{stage}.{key} is set, but it is derived from the shared "
                       f"config.{shared}; set config.{shared} instead.")
    *parents, leaf = key.split(".")
    node = out
    for p in parents:
      node = node[p]
    node[leaf] = shared_value(config, shared)
  if STAGE_KINDS[stage] == "offline" and not out.data.system:
    out.data.system = None
  if out.get("lr_factor") is not None:  # lr relative to the stage it continues from.
    base = RELATIVE_LR[stage]
    if out.optim.lr is not None:
      raise ValueError(f"config.{stage}.optim.lr and config.{stage}.lr_factor are both "
                       f"set; keep one (lr_factor scales config.{base}.optim.lr).")
    out.optim.lr = float(config[base].optim.lr) * float(out.lr_factor)
  out.lock()
  return out


def pipeline_stage(config: ml_collections.ConfigDict, stage: str
                   ) -> ml_collections.ConfigDict:
  """The configs' ``stage`` arg: ``""`` is the pipeline config, else ``stage_config``."""
  return stage_config(config, stage) if stage else config


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
  """``text`` parsed as a value of ``current``'s type; a mismatch raises ``ValueError``.

  Strings take the text as is (or a quoted string literal's value); booleans take
  ``BOOL_SPELLINGS``; ints take integer literals only (``2.5``, ``'7'`` and ``True``
  raise); floats take int or float literals; tuples take list or tuple literals; a
  field whose default is ``None`` takes any literal, else the text.
  """
  if isinstance(current, str):
    quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
    return ast.literal_eval(text) if quoted else text
  if isinstance(current, bool):
    return parse_bool(text, "expected a bool")
  if isinstance(current, ml_collections.ConfigDict):
    raise ValueError("is a config section; override its fields (section.field=value).")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ValueError(f"cannot parse {text!r} as {type(current).__name__}.") from None
  if current is None:
    return value
  if isinstance(current, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(current, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(current, (tuple, list)):
    ok = isinstance(value, (tuple, list))
    value = type(current)(value) if ok else value
  else:
    ok = isinstance(value, type(current))
  if not ok:
    raise ValueError(f"expected a {type(current).__name__}, got {text!r} "
                     f"({type(value).__name__}).")
  return value


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
      shared = derived_from(key) if is_pipeline(config) else None
      if shared is not None:
        raise KeyError(f"Override {item!r}: config.{key} is derived from the shared "
                       f"config.{shared}, which sets it in every stage; override "
                       f"config.{shared} instead.")
      close = difflib.get_close_matches(key, valid, n=5, cutoff=0.4)
      raise KeyError(f"Unknown config key {key!r} in override {item!r}. "
                     f"Nearest valid keys: {close or valid[:10]}.")
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = _parse_value(text, node[leaf])
    except (ValueError, SyntaxError) as e:
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


def init_process():
  """What a driver's process does first: the host malloc settings (``host.tune_malloc``:
  before any JAX computation starts XLA's threads; ``FCP_JAX_MALLOC=system`` skips them),
  the persistent compilation cache (``compile_cache.enable``; ``FCP_JAX_COMPILE_CACHE=off``
  skips it), absl flags marked parsed (grain's worker processes read them) and absl
  logging at INFO without the checkpointing library's chatter."""
  host.tune_malloc()
  compile_cache.enable()
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  flags.FLAGS.mark_as_parsed()
  absl_logging.use_absl_handler()
  absl_logging.set_verbosity(absl_logging.INFO)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def driver_main(argv: Sequence[str], run: Callable[[Any, str], Any]) -> Any:
  """The command line every driver shares: ``--config spec --workdir DIR [--config.k=v]``.

  First ``init_process``, then parses and validates the flags, initialises
  ``jax.distributed`` when ``config.parallel`` (or the environment) asks for it, before
  any JAX call, then calls ``run(config, workdir)`` and returns its result.
  """
  init_process()
  from fcp_jax.training import sharding  # pylint: disable=g-import-not-at-top
  config, rest = config_from_argv(argv)
  workdir = rest.pop("workdir", "")
  if not workdir:
    raise ValueError("Missing --workdir DIR.")
  if rest:
    raise ValueError(f"Unknown flags {sorted(rest)}; expected --config, --config.k=v "
                     "and --workdir.")
  if "parallel" in config:  # Before any JAX call: jax.distributed when asked.
    sharding.initialize_distributed(config.parallel)
  return run(config, workdir)

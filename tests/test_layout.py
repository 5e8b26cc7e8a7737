"""The repository's layering: drivers are leaves that no module imports."""

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-len(".py")]
  return rel.replace(os.sep, ".")


def _imports(path: str):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
      yield from (f"{node.module}.{a.name}" for a in node.names)


def _is_driver(path: str) -> bool:
  return '__name__ == "__main__"' in open(path).read()


def test_no_module_imports_a_driver():
  files = (glob.glob(os.path.join(REPO, "fcp_jax", "**", "*.py"), recursive=True)
           + glob.glob(os.path.join(REPO, "experiments", "**", "*.py"), recursive=True))
  drivers = {_module_name(f) for f in files if _is_driver(f)}
  # The helper module that runs learners under test callbacks is not a workflow.
  drivers.discard("fcp_jax.testing")
  assert {"fcp_jax.train", "fcp_jax.bootstrap", "fcp_jax.evaluate",
          "fcp_jax.pipeline"} <= drivers
  offenders = [(_module_name(f), name) for f in files for name in _imports(f)
               if name in drivers and name != _module_name(f)]
  assert not offenders, offenders

"""Test setup: 8 fake CPU devices for sharding tests, absl flags parsed for grain, and
one persistent compilation cache for the session (shared by the xdist workers and the
drivers the tests start; removed at the end)."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The controller imports this first and its workers inherit the variable; a
# FCP_JAX_COMPILE_CACHE set by the caller (a directory, or ``off``) is kept.
_OWN_CACHE = "FCP_JAX_COMPILE_CACHE" not in os.environ
if _OWN_CACHE:
  os.environ["FCP_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="fcp_jax_test_xla_")

from absl import flags  # pylint: disable=g-import-not-at-top

from fcp_jax import compile_cache  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()
compile_cache.enable()


def pytest_collection_modifyitems(config, items):
  """The colabs notebooks (collected with --nbmake) run whole experiments: slow."""
  del config
  for item in items:
    if item.path.suffix == ".ipynb":
      item.add_marker("slow")


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):  # The controller, last.
    shutil.rmtree(os.environ["FCP_JAX_COMPILE_CACHE"], ignore_errors=True)

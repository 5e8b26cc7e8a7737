"""Test setup: 8 fake CPU devices for sharding tests, absl flags parsed for grain."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
  """The colabs notebooks (collected with --nbmake) run whole experiments: slow."""
  del config
  for item in items:
    if item.path.suffix == ".ipynb":
      item.add_marker("slow")

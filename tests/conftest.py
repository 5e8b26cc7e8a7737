"""Test setup: 8 fake CPU devices for sharding tests, absl flags parsed for grain."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()

"""Offline driver: FCP, SFT or RFT by masked NLL (``fcp_jax.training.offline``).

    python -m fcp_jax.train --config configs/offline_fcp.py:runlocal --workdir DIR \
        [--config.data.data_dir=TFDS_DIR] [--config.a.b=v ...]

Re-running the same command resumes from the newest complete checkpoint in
``DIR/checkpoints``; see ``fcp_jax.training.offline`` for the objectives and outputs.
"""

import sys
from typing import Any, Dict, Sequence

from fcp_jax import config_lib
from fcp_jax.training import offline


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """``--config spec --workdir DIR [--config.k=v ...]``."""
  return config_lib.driver_main(argv, offline.run)


if __name__ == "__main__":
  main(sys.argv[1:])

"""Online driver: FCP bootstrapping or the GRPO baseline (``fcp_jax.training.online``).

    python -m fcp_jax.bootstrap --config configs/arith_fcp.py:runlocal,stage=bootstrap \
        --workdir DIR --config.init_from=OFFLINE_RUN --config.online.pool=POOL.json

Re-running the same command resumes at the last checkpointed round; see
``fcp_jax.training.online`` for what a round does.
"""

import sys
from typing import Any, Dict, Sequence

from fcp_jax import config_lib
from fcp_jax.training import online


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """``--config spec --workdir DIR [--config.k=v ...]``."""
  return config_lib.driver_main(argv, online.run)


if __name__ == "__main__":
  main(sys.argv[1:])

"""The end-to-end FCP experiment driver (stages in ``fcp_jax.experiment``).

    python -m fcp_jax.pipeline --config configs/arith_fcp.py --workdir runs/x \
        [--config.k=v ...]

Runs warm-up → collect → offline FCP → bootstrap → RFT and GRPO baselines → evaluation,
each stage keyed by the settings and inputs it consumed: re-running the command skips
the stages that are done, resumes an interrupted one from its checkpoints, and
recomputes exactly the stages that a changed override reaches
(``--config.on_change=refuse`` lists the changes instead). Results go to
``WORKDIR/results.{json,md}`` and ``WORKDIR/plots/``.
"""

import sys
from typing import Any, Dict, Sequence

from fcp_jax import config_lib
from fcp_jax import experiment


def main(argv: Sequence[str]) -> Dict[str, Any]:
  """``--config spec --workdir DIR [--config.k=v ...]``."""
  return config_lib.driver_main(argv, experiment.run)


if __name__ == "__main__":
  main(sys.argv[1:])

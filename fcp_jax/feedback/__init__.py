"""Feedback environments; importing the package registers every env in FEEDBACK_ENVS."""

from fcp_jax.feedback import critic  # noqa: F401  (registers "critic")
from fcp_jax.feedback import llm_judge  # noqa: F401  (registers "llm_judge")

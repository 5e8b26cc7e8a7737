"""fcp_jax: Feedback-Conditional Policy training of (ternary) transformers in JAX."""

from fcp_jax import host as _host

_host.tune_malloc()  # Before JAX starts its threads; see fcp_jax/host.py.

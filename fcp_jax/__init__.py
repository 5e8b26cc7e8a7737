"""fcp_jax: Feedback-Conditional Policy training of (ternary) transformers in JAX.

Importing the package has no side effects on the process; the drivers' entry point
(``config_lib.driver_main``) applies the host malloc settings of ``fcp_jax/host.py`` and
turns on the persistent compilation cache of ``fcp_jax/compile_cache.py``.
"""

"""fcp_jax: Feedback-Conditional Policy training on ternary-ready Flax transformers."""

import setuptools

setuptools.setup(
    name="fcp_jax",
    version="0.1.0",
    description=("Feedback-Conditional Policy (learning from verbal feedback) on Flax "
                 "transformers with 1.58-bit quantization-aware training."),
    packages=setuptools.find_packages(include=["fcp_jax", "fcp_jax.*"]),
    # The ternary CPU kernel's source, compiled on first use (models/ternary_kernel.py).
    package_data={"fcp_jax.models": ["*.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "jaxlib>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "chex>=0.1.92",
        "ml-collections>=1.1.0,<1.2",
        "tensorflow-datasets>=4.9.10,<4.10",
        "importlib_resources>=6",
        "grain>=0.2.18,<0.3",
        "tensorboardX>=2.6.5,<2.7",
        "safetensors>=0.8.0,<0.9",
        "tokenizers>=0.23,<0.24",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=2.0",
        "reasoning-gym>=0.1.25,<0.2",
        "math-verify>=0.9.0,<0.10",
        "gguf>=0.19,<0.20",
        "openai>=3.63,<4",
        "httpx2>=2.16,<3",  # The judge's own HTTP client, also openai's.
        "filelock>=3.12",  # Locks the persistent compilation cache (compile_cache.py).
    ],
    extras_require={
        "test": [
            "pytest>=9.0",
            "pytest-xdist>=3.8",
            "nbmake>=1.5.5",
            "nbclient>=0.11.0",
            "ipykernel>=7.0",
            # Reference implementations for checkpoint-equivalence tests (CPU wheel).
            "torch==2.13.0",
            "transformers==5.24.0",
        ],
    },
)

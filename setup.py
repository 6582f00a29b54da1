"""kimi_jax: the Kimi k1.5 reinforcement-learning system in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "grain==0.2.18",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "aiohttp==3.14.5",
    "math-verify[antlr4_13_2]==0.9.0",
    "cyaron==0.7.0",
    "pyarrow==26.0.1",
    "matplotlib==3.11.2",
    "tqdm==4.70.1",
    "tensorboardX==2.6.5",
]

EXTRAS = {
    # torch must be the CPU build (pip takes torch==2.13.0 from local disk here);
    # the Makefile installs it before this extra so nothing pulls a CUDA build.
    "test": [
        "pytest==9.2.0",
        "chex==0.1.92",
        "openai==3.57.0",
        "pytest-xdist==3.8.0",
        "torch==2.13.0",
        "transformers==5.24.0",
    ],
    "notebooks": ["nbclient==0.11.0", "nbformat==5.11.1", "ipykernel==7.4.0"],
    "sglang": ["sglang[all]"],
}

setup(
    name="kimi_jax",
    version="0.1.0",
    description="Kimi k1.5 RL (online policy mirror descent, Muon, partial rollouts) in JAX",
    packages=find_packages(include=["kimi_jax", "kimi_jax.*", "launch", "experiments"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)

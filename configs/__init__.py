"""Training configs (ml_collections): `kat-jax train --config NAME.py:VARIANT`, one file per stage
(mid_training, sft, rft, rl) and quickstart (a pipeline of all four).

setup.py installs this directory as the package kat_jax.configs, so a bare name (`sft.py:tiny`)
resolves from any directory after `pip install .` (kat_jax.training.config_lib). Each file is
loaded by path, not imported as part of this package.
"""

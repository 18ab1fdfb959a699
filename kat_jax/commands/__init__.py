"""The `kat-jax` subcommands, one module each (registered in order by kat_jax.cli).

Each module has `add_parser(subparsers) -> argparse.ArgumentParser` (its name, help, description
and arguments) and `run(args) -> int` (the exit status). Modules import only the standard library
at the top (and jax-free registries such as kat_jax.ops.attention_impls, for choices): the library
they drive (training, rollout, models, envs, data) is imported inside `run`, so `kat-jax --help`
stays fast and optional backends load only for the command that needs them. This package is the
top layer: it may import any kat_jax package; none imports it.
"""

CHECKPOINT_HELP = ("kat_jax checkpoint dir, Hugging Face model dir (config.json + safetensors), "
                   "or preset:NAME[@SEED] (random init; e.g. preset:tiny)")

"""The `kat-jax` command: one entry point, one subcommand per job.

    kat-jax train      train a stage (mid, sft, rft, rl) or a pipeline of stages from a config
    kat-jax score      per-token log-probs and entropies of JSONL token sequences
    kat-jax import-hf  Hugging Face directory -> kat_jax (orbax) checkpoint
    kat-jax export-hf  kat_jax checkpoint -> Hugging Face directory (config.json + safetensors)
    kat-jax prune      what an entropy-pruning token budget keeps of groups of rollouts
    kat-jax rollout    sample agent trajectories in an environment (JSONL for prune / score / training)
    kat-jax eval       pass@k of a checkpoint on an environment's test tasks (E.json + E.md)
    kat-jax serve      the built-in sampler as an OpenAI-compatible /v1/completions endpoint
    kat-jax env check  every bundled (or given) environment task scores 1 with its gold answer, 0 without
    kat-jax swe mine   a repository's history -> verified SWE-bench-format tasks (gold 1, empty 0)
    kat-jax plot       PNG plots of a run's metrics (WORKDIR/plots/<metric>.png)
    kat-jax presets    list the model presets
    kat-jax compile-check  compile a train step for a Cloud TPU topology from this host (libtpu)

Every `--checkpoint` accepts a kat_jax checkpoint, a Hugging Face directory, or preset:NAME[@SEED]
(a randomly initialised preset; preset:tiny is the embedded default).
Errors print one line `kat-jax: error: ...` naming the file, line or key, and exit with status 1.

Each subcommand is a module of kat_jax.commands (`add_parser`, `run`); this file only lists them.
"""

from __future__ import annotations

import argparse
import sys

from kat_jax.commands import (
    compile_check,
    env,
    eval,
    export_hf,
    import_hf,
    plot,
    presets,
    prune,
    rollout,
    score,
    serve,
    swe,
    train,
)

COMMANDS = (train, score, import_hf, export_hf, prune, rollout, eval, serve, env, swe,
            compile_check, plot, presets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kat-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub).set_defaults(command_module=module, overrides=[])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args.command_module, "CONFIG_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.command_module.run(args)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"kat-jax: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

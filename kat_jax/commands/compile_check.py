"""`kat-jax compile-check --config F.py:VARIANT --topology v5p-128`: compile a stage's train step for
a Cloud TPU topology from this host (libtpu; kat_jax.training.aot)."""

from __future__ import annotations

import argparse
import sys

NAME = "compile-check"
CONFIG_OVERRIDES = True  # extra --config.KEY=VALUE arguments reach args.overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="compile a stage's train step for a Cloud TPU topology (no TPU)",
        description="Lower and compile the train step of --config for the abstract devices of a "
        "Cloud TPU topology (needs libtpu: pip install -e '.[aot]'), with abstract inputs (nothing "
        "is materialised); print per-device memory against the chip's HBM, the shardings of the "
        "largest arrays, the step's FLOPs, and a JSON summary line last. Exit status 0: fits, 3: "
        "does not fit, 2: libtpu missing, 1: bad config or topology. Overrides: "
        "--config.KEY=VALUE.")
    p.add_argument("--config", required=True,
                   help="config file and variant, e.g. configs/sft.py:kat_dev_32b")
    p.add_argument("--topology", required=True,
                   help="Cloud TPU slice (v5p-128, v5e-16, v6e-64, v4-32: v4/v5p count "
                   "TensorCores, v5e/v6e chips) or a libtpu topology string (v5p:2x2x1)")
    p.add_argument("--top", type=int, default=8, help="largest arrays listed (default 8)")
    return p


def run(args: argparse.Namespace) -> int:
    import os

    # Abstract TPU devices come from libtpu's topology API; the host's own backend stays CPU.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from kat_jax.training import config_lib
    from kat_jax.training.aot import compile_check, format_report, summary_line
    from kat_jax.training.trainer import TrainingError

    cfg = config_lib.load_train_config(args.config, args.overrides)
    if "stages" in cfg:
        raise ValueError(f"{args.config} is a pipeline; compile-check takes one stage's config")
    split = "rl" in cfg and cfg.rl.env and cfg.rl.get("rollout_devices", 0) > 0
    try:
        if split:  # the online loop's rollout split: train sub-mesh + one sampler replica
            from kat_jax.flow.split_check import format_split, split_compile_check

            report = split_compile_check(cfg, args.topology, top=args.top)
        else:
            report = compile_check(cfg, args.topology, top=args.top)
    except ImportError as e:
        print(f"kat-jax: error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        raise ValueError(str(e)) from None
    print(format_report(report))
    if split:
        print(format_split(report))
    print(summary_line(report))
    return 0 if report["fits"] else 3

"""`kat-jax train --config F.py:VARIANT --workdir DIR [--config.KEY=VALUE ...]`."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "train"
CONFIG_OVERRIDES = True  # extra --config.KEY=VALUE arguments reach args.overrides


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="train from an ml_collections config (kat-jax train --config F.py:VARIANT)",
        description="Train a stage or a pipeline of stages. Overrides: --config.KEY=VALUE (e.g. "
        "--config.train.steps=20 --config.optimizer.learning_rate=1e-4); unknown keys and wrong "
        "types are errors. Running again on the same --workdir resumes.")
    p.add_argument("--config", required=True,
                   help="config file and variant, e.g. configs/sft.py:tiny or configs/quickstart.py")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, model)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return p


def run(args: argparse.Namespace) -> int:
    import logging

    import kat_jax.flow.online  # noqa: F401  (registers the online rl loop with the trainer)
    from kat_jax.training import config_lib
    from kat_jax.training.trainer import PREEMPTED_EXIT, Preempted, TrainingError, run_train

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_lib.load_train_config(args.config, args.overrides)
    try:
        summary = run_train(cfg, args.workdir)
    except Preempted as e:
        print(f"kat-jax: preempted: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except TrainingError as e:
        raise ValueError(str(e)) from None
    print(json.dumps(summary, default=str))
    return 0

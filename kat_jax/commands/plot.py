"""`kat-jax plot`: PNG figures of a run's metrics.jsonl, one per metric against step
(kat_jax.training.plots; a pipeline workdir gets one line per stage)."""

from __future__ import annotations

import argparse
import json

NAME = "plot"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="PNG plots of a run's metrics (loss, reward, ...) against step",
        description="Draw WORKDIR/metrics.jsonl (or, for a pipeline workdir, each stage's, one "
        "line per stage, steps following each other) as one PNG per metric; print the written "
        "paths as one JSON line.")
    p.add_argument("workdir", metavar="WORKDIR", help="a stage or pipeline workdir (local or gs://)")
    p.add_argument("--output", default=None, help="directory of the PNGs (default WORKDIR/plots)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metric names (default: those logged of loss, reward, "
                   "pass_rate, eval_loss, kl_ref, entropy, clip_fraction)")
    p.add_argument("--stages", default=None,
                   help="pipeline workdir: comma-separated stage directories, in order (default: "
                   "every one with a metrics.jsonl, ordered mid, sft, rft, rl, then by name)")
    return p


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"{text!r}: expected comma-separated names")
    return names


def run(args: argparse.Namespace) -> int:
    from kat_jax.training.plots import plot_metrics

    paths = plot_metrics(args.workdir, args.output, metrics=_names(args.metrics),
                         stages=_names(args.stages))
    print(json.dumps(paths))
    return 0

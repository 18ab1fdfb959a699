"""`kat-jax eval`: pass@k of a checkpoint in an environment (kat_jax.rollout.evaluation)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP

NAME = "eval"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="pass@k of a checkpoint on an environment's (test) tasks",
        description="Run the agent --samples-per-task (K) times on each task; write E.json "
        "(pass@1, pass@2, pass@4, ... up to K: powers of two, the unbiased estimator of Chen et "
        "al. 2021; mean turns, tool calls, statuses, per-task counts) and E.md beside it, both "
        "atomically; the last stdout line is a JSON summary.")
    p.add_argument("--checkpoint", required=True,
                   help=CHECKPOINT_HELP + ", or a training workdir (its model/)")
    p.add_argument("--env", required=True, help="environment: calculator, maths, swe")
    p.add_argument("--tasks", default=None, help="tasks file (default: the environment's bundled "
                   "or generated tasks)")
    p.add_argument("--split", default=None, metavar="{train,test,all}",
                   help="tasks of a split: calculator and maths hold out ~20%% as test (a hash "
                   "of the question, kat_jax.envs.registry.task_split); default test for them, "
                   "all for an environment without a split (swe), where train/test are errors")
    p.add_argument("--samples-per-task", type=int, default=4, help="K samples per task")
    p.add_argument("--output", required=True, help="E.json (written atomically; E.md beside it)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="trajectory length limit (default: the checkpoint's context)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per assistant turn")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--max-tasks", type=int, default=None, help="only the first N tasks")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json dir (default: the checkpoint's, else bytes)")
    return p


def run(args: argparse.Namespace) -> int:
    from kat_jax.rollout.evaluation import run_eval

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1 (default: the checkpoint's context), got "
                         f"{args.max_tokens}")
    summary = run_eval(args.checkpoint, args.env, args.output, tasks_file=args.tasks,
                       split=args.split, samples_per_task=args.samples_per_task,
                       temperature=args.temperature, seed=args.seed, max_turns=args.max_turns,
                       max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
                       concurrency=args.concurrency, max_tasks=args.max_tasks,
                       tokenizer=args.tokenizer)
    print(json.dumps(summary))
    return 0

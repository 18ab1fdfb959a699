"""`kat-jax rollout`: sample agent trajectories in an environment, one rollout record per line
(kat_jax.rollout.runner; the record schema is kat_jax.data.records)."""

from __future__ import annotations

import argparse
import json

from kat_jax.commands import CHECKPOINT_HELP

NAME = "rollout"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        NAME, help="sample agent trajectories in an environment",
        description="Run --samples-per-task episodes per task (the policy, the environment's "
        "tools, the reward); write one JSONL line per trajectory; the last stdout line is a JSON "
        "summary.")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--env", required=True, help="environment: calculator, maths, swe")
    p.add_argument("--tasks", default=None, help="tasks file (default: the environment's bundled)")
    p.add_argument("--samples-per-task", type=int, default=4, help="G samples per task (a group)")
    p.add_argument("--output", required=True, help="output JSONL (written atomically)")
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="trajectory length limit (default: the checkpoint's context, "
                   "max_position_embeddings; a larger value is clamped to it). An episode that "
                   "reaches the end of the context ends with status context_limit")
    p.add_argument("--max-new-tokens", type=int, default=512, help="per assistant turn")
    p.add_argument("--concurrency", type=int, default=8, help="episodes in flight")
    p.add_argument("--max-tasks", type=int, default=None, help="only the first N tasks")
    p.add_argument("--tokenizer", default=None,
                   help="'bytes' or a tokenizer.json dir (default: the checkpoint's, else bytes)")
    p.add_argument("--backend", default="local", choices=["local", "docker"],
                   help="sandbox backend of --env swe (default local)")
    p.add_argument("--sandbox-image", default=None,
                   help="with --backend docker: the image of tasks without their own `image` "
                   "(default $KAT_JAX_SANDBOX_IMAGE, else kat-jax-sandbox:latest)")
    p.add_argument("--sandbox-pool", type=int, default=0, metavar="N",
                   help="--env swe: keep N set-up sandboxes per task warm, so instance setup "
                   "runs ahead of the episodes and gradings (default 0: none)")
    return p


def swe_env_kwargs(args: argparse.Namespace) -> dict:
    """``make_env`` kwargs from --backend / --sandbox-image / --sandbox-pool (--env swe only)."""
    if args.sandbox_image and args.backend != "docker":
        raise ValueError("--sandbox-image needs --backend docker")
    if args.sandbox_pool < 0:
        raise ValueError(f"--sandbox-pool must be >= 0, got {args.sandbox_pool}")
    if args.env != "swe":
        if args.backend != "local":
            raise ValueError(f"--backend applies to --env swe, not {args.env}")
        if args.sandbox_pool:
            raise ValueError(f"--sandbox-pool applies to --env swe, not {args.env}")
        return {}
    sandbox = {"image": args.sandbox_image} if args.sandbox_image else {}
    return {"backend": args.backend, "sandbox_kwargs": sandbox, "pool_size": args.sandbox_pool}


def run(args: argparse.Namespace) -> int:
    from kat_jax.rollout.runner import run_rollout_cmd

    if args.max_tokens is not None and args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1 (default: the checkpoint's context), got "
                         f"{args.max_tokens}")
    env_kwargs = swe_env_kwargs(args)
    summary = run_rollout_cmd(args.checkpoint, args.env, args.output, tasks_file=args.tasks,
                              samples_per_task=args.samples_per_task,
                              temperature=args.temperature, seed=args.seed,
                              max_turns=args.max_turns, max_tokens=args.max_tokens,
                              max_new_tokens=args.max_new_tokens, concurrency=args.concurrency,
                              max_tasks=args.max_tasks, tokenizer=args.tokenizer,
                              env_kwargs=env_kwargs)
    print(json.dumps(summary))
    return 0

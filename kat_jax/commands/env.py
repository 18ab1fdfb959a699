"""`kat-jax env check`: every bundled (or given) environment task must score 1 with its gold answer
and 0 without (the audit is kat_jax.envs.check)."""

from __future__ import annotations

import argparse
import sys

NAME = "env"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="environment tools (env check)",
                              description="Environment tools.")
    env_sub = p.add_subparsers(dest="env_command", required=True, metavar="ENV_COMMAND")
    pc = env_sub.add_parser("check", help="gold answers score 1 and empty ones 0 on every task",
                            description="Audit an environment's tasks: each must score 1 with its "
                            "gold answer (SWE: the gold patch) and 0 without; prints a table, exits "
                            "1 when any task is broken.")
    pc.add_argument("--env", default="swe",
                    help="a registered environment with a check (swe, maths, calculator, ...)")
    pc.add_argument("--tasks", default=None, help="tasks file (default: the bundled ones)")
    pc.add_argument("--instances-from", default=None, metavar="JSONL",
                    help="--env swe: SWE-bench instances whose repositories are checked out under "
                    "--repos (repo_path relative to it; without one, the checkout named after "
                    "`repo`: owner__name, owner/name or name)")
    pc.add_argument("--repos", default=None, metavar="DIR",
                    help="with --instances-from: the directory holding the checkouts "
                    "(default: the JSONL's directory)")
    pc.add_argument("--specs", default=None, metavar="JSON",
                    help="--env swe: setup steps per repository and version, SWE-bench harness "
                    "style ({repo: {version: {pre_install, install, pip_packages, ...}}})")
    pc.add_argument("--sandbox-pool", type=int, default=0, metavar="N",
                    help="--env swe: keep N set-up sandboxes per instance warm (setup ahead of "
                    "the gradings; default 0: none)")
    pc.add_argument("--backend", default="local", choices=["local", "docker"],
                    help="sandbox backend of --env swe (default local)")
    pc.add_argument("--sandbox-image", default=None,
                    help="with --backend docker: the image of tasks without their own `image` "
                    "(default $KAT_JAX_SANDBOX_IMAGE, else kat-jax-sandbox:latest, built from "
                    "docker/Dockerfile.sandbox)")
    pc.add_argument("--workers", type=int, default=2)
    return p


def run(args: argparse.Namespace) -> int:
    return {"check": run_check}[args.env_command](args)


def run_check(args: argparse.Namespace) -> int:
    """`env check`: the table on stdout, each distinct error on stderr; 0 when every task is ok."""
    from kat_jax.envs.check import check, format_table

    if args.sandbox_image and args.backend != "docker":
        raise ValueError("--sandbox-image needs --backend docker")
    swe_only = {"--instances-from": args.instances_from, "--specs": args.specs,
                "--sandbox-pool": args.sandbox_pool}
    for flag, value in swe_only.items():
        if value and args.env != "swe":
            raise ValueError(f"{flag} applies to --env swe, not {args.env}")
    if args.sandbox_pool < 0:
        raise ValueError(f"--sandbox-pool must be >= 0, got {args.sandbox_pool}")
    if args.repos and not args.instances_from:
        raise ValueError("--repos needs --instances-from")
    if args.instances_from and args.tasks:
        raise ValueError("give --tasks or --instances-from, not both")
    kwargs = {"image": args.sandbox_image} if args.sandbox_image else {}
    if args.sandbox_pool:
        kwargs["pool_size"] = args.sandbox_pool
    tasks = None
    if args.instances_from or args.specs:
        from kat_jax.envs.swe import load_tasks

        tasks = load_tasks(args.instances_from or args.tasks, repos_dir=args.repos,
                           specs=args.specs)
    rows = check(args.env, args.tasks, args.backend, args.workers, kwargs, tasks=tasks)
    print(format_table(rows))
    for err in dict.fromkeys(r["error"] for r in rows if r["error"] and not r["ok"]):
        print(f"error: {err}", file=sys.stderr)
    return 0 if rows and all(r["ok"] for r in rows) else 1

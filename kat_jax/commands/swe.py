"""`kat-jax swe mine`: a repository's history (or its pull requests) -> verified SWE-bench-format
tasks (the mining is kat_jax.envs.swe_mining; synthesis of mutation bugs kat_jax.envs.swe_mutations).

    kat-jax swe mine --repo PATH [--since REV] [--until REV] [--prs PRS.jsonl] --output TASKS.jsonl
        [--backend local|docker] [--workers N] [--spec SPEC.json] [--runs N] [--synthesize K]

Prints one line per candidate on stderr, then the count per filter; writes TASKS.jsonl and
TASKS.repos/ (the instances' base trees) whole or not at all, and ``--stats FILE`` (JSON: counts,
skipped candidates with their filter and detail). Exits 1 when no instance was produced.
"""

from __future__ import annotations

import argparse
import json
import sys

NAME = "swe"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="SWE task tools (swe mine)", description="SWE task tools.")
    sub = p.add_subparsers(dest="swe_command", required=True, metavar="SWE_COMMAND")
    m = sub.add_parser("mine", help="turn a repository's history into verified SWE tasks",
                       description="Mine SWE-bench-format tasks from a git repository: each "
                       "first-parent commit (or PR merge commit) touching tests and source whose "
                       "tests fail before and pass after the change becomes an instance "
                       "(FAIL_TO_PASS / PASS_TO_PASS from repeated runs in a sandbox).")
    m.add_argument("--repo", required=True, help="the git repository (its top directory)")
    m.add_argument("--output", required=True, help="TASKS.jsonl (TASKS.repos/ is written beside it)")
    m.add_argument("--since", default=None, metavar="REV",
                   help="only commits after REV (default: the whole history)")
    m.add_argument("--until", default="HEAD", metavar="REV",
                   help="the last commit (default HEAD); --synthesize mutates this tree")
    m.add_argument("--prs", default=None, metavar="JSONL",
                   help="pull requests instead of the history: number, merge_commit, title, body, "
                   "issue (linked issue text), labels, stars")
    m.add_argument("--min-stars", type=int, default=None, help="with --prs: leave out PRs whose "
                   "`stars` is below this")
    m.add_argument("--backend", default="local", choices=["local", "docker"])
    m.add_argument("--sandbox-image", default=None,
                   help="with --backend docker: the base sandbox image")
    m.add_argument("--workers", type=int, default=1, help="candidates mined at once")
    m.add_argument("--spec", default=None, metavar="JSON",
                   help="the repository's environment: a JSON object of SWE-bench harness spec "
                   "keys (pre_install, install, pip_packages, setup_cmds, eval_commands, "
                   "test_env, python), recorded in every instance")
    m.add_argument("--cache-dir", default=None,
                   help="local backend: where environments with pip_packages are cached "
                   "(default $KAT_JAX_SWE_ENV_CACHE, else ~/.cache/kat_jax/swe_envs)")
    m.add_argument("--runs", type=int, default=2,
                   help="runs of the suite per state; a test whose outcomes differ is flaky "
                   "(excluded); default 2")
    m.add_argument("--test-globs", default=None,
                   help="comma-separated globs of test paths (default: tests/*, test/*, "
                   "*/tests/*, test_*.py, *_test.py, conftest.py, ...)")
    m.add_argument("--source-globs", default=None,
                   help="comma-separated globs of source paths (default *.py)")
    m.add_argument("--min-statement-words", type=int, default=8)
    m.add_argument("--keep-flagged", action="store_true",
                   help="keep instances whose statement is too short or leaks the patch "
                   "(flagged in mined.flags)")
    m.add_argument("--no-verify", action="store_true",
                   help="skip grading each instance with its gold and an empty patch")
    m.add_argument("--synthesize", type=int, default=0, metavar="K",
                   help="also make up to K instances by mutating the code at --until "
                   "(--since REV with REV = --until: synthesis only)")
    m.add_argument("--seed", type=int, default=0, help="--synthesize: which sites are tried")
    m.add_argument("--max-candidates", type=int, default=None)
    m.add_argument("--repo-name", default=None,
                   help="the instances' `repo` (default local/<directory name>)")
    m.add_argument("--test-timeout", type=float, default=600.0)
    m.add_argument("--stats", default=None, metavar="JSON", help="write the counts here")
    return p


def run(args: argparse.Namespace) -> int:
    return {"mine": run_mine}[args.swe_command](args)


def _globs(text: str | None, default):
    return tuple(g.strip() for g in text.split(",") if g.strip()) if text else default


def run_mine(args: argparse.Namespace) -> int:
    from kat_jax.atomic_io import atomic_file
    from kat_jax.envs import swe_mining as sm

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.synthesize < 0:
        raise ValueError(f"--synthesize must be >= 0, got {args.synthesize}")
    if args.sandbox_image and args.backend != "docker":
        raise ValueError("--sandbox-image needs --backend docker")
    spec = {}
    if args.spec:
        try:
            with open(args.spec) as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.spec}: not JSON: {e}") from None
        sm.check_spec(spec, args.spec)
    opts = sm.MineOptions(
        test_globs=_globs(args.test_globs, sm.DEFAULT_TEST_GLOBS),
        source_globs=_globs(args.source_globs, sm.DEFAULT_SOURCE_GLOBS), runs=args.runs,
        min_statement_words=args.min_statement_words, keep_flagged=args.keep_flagged,
        verify=not args.no_verify, backend=args.backend, workers=args.workers, spec=spec,
        sandbox_kwargs={"image": args.sandbox_image} if args.sandbox_image else {},
        cache_dir=args.cache_dir, test_timeout=args.test_timeout, repo_name=args.repo_name,
        min_stars=args.min_stars)
    res = sm.mine(args.repo, args.output, since=args.since, until=args.until, prs=args.prs,
                  synthesize=args.synthesize, opts=opts, max_candidates=args.max_candidates,
                  seed=args.seed, progress=lambda line: print(line, file=sys.stderr))
    counts = dict(sorted(res.stats.items()))
    print(f"{len(res.instances)} instances -> {args.output}; "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.stats:
        with atomic_file(args.stats) as f:
            json.dump({"stats": counts, "instances": len(res.instances),
                       "skipped": [{"id": i, "filter": r, "detail": d[:500]}
                                   for i, r, d in res.skipped]}, f, indent=1)
    return 0 if res.instances else 1

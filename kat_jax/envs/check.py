"""``kat-jax env check``: every bundled (or given) task must score 1 with its gold answer and 0 without.

Audits of SWE-bench found many "unsolvable" instances were broken environments; this catches them
before training. Run ``python -m kat_jax.envs.check --env swe [--tasks FILE] [--backend local|docker]
[--sandbox-image IMAGE]``. It prints a table (and each distinct error in full on stderr) and exits
non-zero when any task is broken.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kat_jax.envs.base import EpisodeStatus, EvalResult, Task, make_env


def _swe_rows(tasks_file: str | None, backend: str, workers: int,
              sandbox_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    from kat_jax.envs.swe import grade_patch, load_instances

    def one(inst: dict[str, Any]) -> dict[str, Any]:
        t = time.monotonic()
        gold = grade_patch(inst, inst.get("patch", ""), backend, **sandbox_kwargs)
        empty = grade_patch(inst, "", backend, **sandbox_kwargs)
        return _row(inst["instance_id"], gold, empty, time.monotonic() - t)

    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(one, load_instances(tasks_file)))


def _answer_rows(env_name: str, tasks: Sequence[Task]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        t = time.monotonic()
        results = []
        for content in (f"The answer is \\boxed{{{task.metadata['answer']}}}.", "I don't know."):
            env = make_env(env_name)
            env.reset(task)
            results.append(env.evaluate([*task.messages, {"role": "assistant", "content": content}]))
            env.close()
        rows.append(_row(task.id, results[0], results[1], time.monotonic() - t))
    return rows


def _row(task_id: str, gold: EvalResult, empty: EvalResult, seconds: float) -> dict[str, Any]:
    ok = (gold.reward == 1.0 and empty.reward == 0.0 and gold.status == EpisodeStatus.OK
          and empty.status == EpisodeStatus.OK)
    return {"id": task_id, "gold": gold.reward, "empty": empty.reward, "gold_status": gold.status.value,
            "empty_status": empty.status.value, "ok": ok, "seconds": round(seconds, 2),
            "error": gold.details.get("error") or empty.details.get("error") or ""}


def check(env_name: str, tasks_file: str | None = None, backend: str = "local",
          workers: int = 2, sandbox_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per task: gold and empty rewards, statuses, and ``ok`` (gold 1, empty 0, no env_error).

    ``backend`` and ``sandbox_kwargs`` (e.g. ``image``: the docker sandbox image) apply to ``swe``."""
    if env_name == "swe":
        return _swe_rows(tasks_file, backend, workers, dict(sandbox_kwargs or {}))
    if env_name == "maths":
        from kat_jax.envs.maths import load_tasks
    elif env_name == "calculator":
        from kat_jax.envs.calculator import load_tasks
    else:
        raise ValueError(f"no check for environment {env_name!r} (swe, maths, calculator)")
    return _answer_rows(env_name, load_tasks(tasks_file))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    width = max([len(r["id"]) for r in rows] + [4])
    lines = [f"{'task':<{width}}  gold  empty  status        ok    secs"]
    for r in rows:
        status = r["gold_status"] if r["gold_status"] != "ok" else r["empty_status"]
        lines.append(f"{r['id']:<{width}}  {r['gold']:>4.1f}  {r['empty']:>5.1f}  {status:<12}  "
                     f"{'yes' if r['ok'] else 'NO':<4}  {r['seconds']:>5.2f}"
                     + (f"  {r['error'][:80]}" if r["error"] and not r["ok"] else ""))
    broken = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows)} tasks, {broken} broken")
    return "\n".join(lines)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--env", default="swe", choices=["swe", "maths", "calculator"])
    ap.add_argument("--tasks", default=None, help="tasks file (default: the bundled ones)")
    ap.add_argument("--backend", default="local", choices=["local", "docker"],
                    help="sandbox backend of --env swe (default local)")
    ap.add_argument("--sandbox-image", default=None,
                    help="with --backend docker: the image of tasks without their own `image` "
                    "(default $KAT_JAX_SANDBOX_IMAGE, else kat-jax-sandbox:latest, built from "
                    "docker/Dockerfile.sandbox)")
    ap.add_argument("--workers", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    if args.sandbox_image and args.backend != "docker":
        raise ValueError("--sandbox-image needs --backend docker")
    kwargs = {"image": args.sandbox_image} if args.sandbox_image else {}
    rows = check(args.env, args.tasks, args.backend, args.workers, kwargs)
    print(format_table(rows))
    for err in dict.fromkeys(r["error"] for r in rows if r["error"] and not r["ok"]):
        print(f"error: {err}", file=sys.stderr)
    return 0 if rows and all(r["ok"] for r in rows) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kat-jax env check", description=__doc__.split("\n")[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

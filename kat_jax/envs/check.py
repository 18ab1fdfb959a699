"""The environment audit: every bundled (or given) task must score 1 with its gold answer and 0
without.

    rows = check("swe", tasks_file=None, backend="local")    # one row per task; row["ok"]
    print(format_table(rows))

Audits of SWE-bench found many "unsolvable" instances were broken environments; this catches them
before training. The command is ``kat-jax env check --env swe [--tasks FILE] [--backend
local|docker] [--sandbox-image IMAGE]`` (kat_jax.commands.env): it prints the table (and each
distinct error in full on stderr) and exits non-zero when any task is broken.
"""

from __future__ import annotations

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

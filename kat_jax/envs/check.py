"""The environment audit: every bundled (or given) task must score 1 with its gold answer and 0
without, and its gold answer must not be empty.

    rows = check("swe", tasks_file=None, backend="local")    # one row per task; row["ok"]
    print(format_table(rows))

Audits of SWE-bench found many "unsolvable" instances were broken environments; this catches them
before training. A broken row's ``reason`` says why, the first that applies of:
``env_error: MESSAGE`` (an infrastructure failure grading either answer), ``gold answer empty`` (the
environment's check_task sets ``gold.details["gold_empty"]``: a blank answer or patch would reward
a policy for saying nothing), ``gold and empty score the same (R)``, ``gold reward R, not 1``,
``empty reward R, not 0``.

The command is ``kat-jax env check --env swe [--tasks FILE] [--backend local|docker]
[--sandbox-image IMAGE]`` (kat_jax.commands.env): it prints the table (a broken task's line ends
with its reason; each distinct error in full on stderr) and exits non-zero when any task is broken.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kat_jax.envs.base import EpisodeStatus, EvalResult, Task
from kat_jax.envs.registry import ENVS


def broken_reason(gold: EvalResult, empty: EvalResult) -> str:
    """Why a task graded ``gold`` with its gold answer and ``empty`` with none is broken ("" when
    it is not); the order is the module docstring's."""
    for result in (gold, empty):
        if result.status == EpisodeStatus.ENV_ERROR:
            return f"env_error: {result.details.get('error') or 'no message'}"
    if gold.details.get("gold_empty"):
        return "gold answer empty"
    if gold.reward == empty.reward:
        return f"gold and empty score the same ({gold.reward:g})"
    if gold.reward != 1.0:
        return f"gold reward {gold.reward:g}, not 1"
    if empty.reward != 0.0:
        return f"empty reward {empty.reward:g}, not 0"
    return ""


def _row(task_id: str, gold: EvalResult, empty: EvalResult, seconds: float) -> dict[str, Any]:
    reason = broken_reason(gold, empty)
    return {"id": task_id, "gold": gold.reward, "empty": empty.reward, "gold_status": gold.status.value,
            "empty_status": empty.status.value, "ok": not reason, "reason": reason,
            "seconds": round(seconds, 2),
            "error": gold.details.get("error") or empty.details.get("error") or ""}


def checkable_envs() -> list[str]:
    """The registered environments that `env check` can grade (their EnvSpec has check_task)."""
    return sorted(name for name, spec in ENVS.items() if spec.check_task is not None)


def check(env_name: str, tasks_file: str | None = None, backend: str = "local",
          workers: int = 2, sandbox_kwargs: dict[str, Any] | None = None,
          tasks: Sequence[Task] | None = None) -> list[dict[str, Any]]:
    """One row per task: gold and empty rewards, statuses, ``ok`` (gold 1, empty 0, no env_error,
    a gold answer that is not empty) and ``reason`` (why not; "" when ok).

    The environment's registry entry (kat_jax.envs.registry) reads the tasks and grades each one;
    ``backend`` and ``sandbox_kwargs`` (e.g. ``image``: the docker sandbox image) apply to
    environments that run sandboxes (``swe``). ``tasks`` (already loaded, e.g. SWE-bench instances
    read with a repositories directory) replaces reading ``tasks_file``."""
    spec = ENVS.get(env_name)
    if spec is None or spec.check_task is None:
        raise ValueError(f"no check for environment {env_name!r} ({', '.join(checkable_envs())})")
    check_task = spec.check_task
    options = {"backend": backend, "sandbox_kwargs": dict(sandbox_kwargs or {})}

    def one(task: Task) -> dict[str, Any]:
        t = time.monotonic()
        gold, empty = check_task(task, **options)
        return _row(task.id, gold, empty, time.monotonic() - t)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(one, spec.load_tasks(tasks_file) if tasks is None else tasks))


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The audit as text: one line per task (a broken one ends with its reason, cut at 100
    characters), then "N tasks, M broken"."""
    width = max([len(r["id"]) for r in rows] + [4])
    lines = [f"{'task':<{width}}  gold  empty  status        ok    secs  reason"]
    for r in rows:
        status = r["gold_status"] if r["gold_status"] != "ok" else r["empty_status"]
        lines.append(f"{r['id']:<{width}}  {r['gold']:>4.1f}  {r['empty']:>5.1f}  {status:<12}  "
                     f"{'yes' if r['ok'] else 'NO':<4}  {r['seconds']:>5.2f}"
                     + (f"  {r['reason'][:100]}" if r["reason"] else ""))
    broken = sum(not r["ok"] for r in rows)
    lines.append(f"{len(rows)} tasks, {broken} broken")
    return "\n".join(lines)

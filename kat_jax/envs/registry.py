"""Environments by name: the one registry that `make_env`, `kat-jax env check` and
`kat-jax rollout` read.

An entry (`EnvSpec`) says how to build the environment, how to read its tasks, and, optionally,
how `env check` grades a task with its gold solution and with an empty one, and whether its tasks
have a train/test split (`task_split`: a fixed rule per task, for `kat-jax eval`). The built-in
environments (calculator, maths, swe) are registered below, explicitly; the environment modules
register nothing when imported. A user adds one with `register_env` (see kat_jax.envs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import kat_jax.envs.calculator as calculator
import kat_jax.envs.maths as maths
import kat_jax.envs.swe as swe
from kat_jax.envs.base import Env, EvalResult, Task

# task, options of `env check` (backend, sandbox_kwargs) -> (gold result, empty result)
TaskCheck = Callable[..., tuple[EvalResult, EvalResult]]


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What kat_jax knows about an environment kind.

    factory: ``factory(**env_kwargs) -> Env`` (a subclass of Env, or a function).
    load_tasks: ``load_tasks(path) -> list[Task]`` from a tasks file (path None: the bundled or
      generated default tasks; a bad line is an error naming ``file:line``).
    check_task: ``check_task(task, backend=..., sandbox_kwargs=...) -> (gold, empty)``: the task
      graded with its gold solution and with an empty one (`env check` wants rewards 1 and 0);
      ``gold.details["gold_empty"] = True`` says the gold solution itself is blank (the task is
      then broken whatever the rewards); None: `env check` does not apply to this environment.
    test_fraction: the share of tasks held out as the "test" split (task_split); None: the
      environment has no split (e.g. swe, whose bundled instances are few and all for evaluation).
    split_pool: ``split_pool() -> list[Task]``: the tasks that "train" / "test" partition when no
      tasks file is given (None: ``load_tasks(None)``); the calculator's is larger than its default
      tasks so that its test split has at least 64 tasks.
    """

    factory: Callable[..., Env]
    load_tasks: Callable[[str | None], list[Task]]
    check_task: TaskCheck | None = None
    test_fraction: float | None = None
    split_pool: Callable[[], list[Task]] | None = None


SPLITS = ("train", "test")
TEST_FRACTION = 0.2  # of the calculator and maths tasks


def task_split(task: Task, test_fraction: float) -> str:
    """The task's split, "test" or "train": it is held out iff the first 8 bytes of the SHA-256 of its
    messages (JSON, sorted keys), read as a fraction of 2**64, are below ``test_fraction``.

    Exact and stable (no Python hash(), no seed, no dependence on the other tasks or their order);
    it reads the messages, not the id, so the same question under two ids lands in one split."""
    text = json.dumps(task.messages, sort_keys=True, ensure_ascii=False)
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return "test" if h < test_fraction * 2**64 else "train"


ENVS: dict[str, EnvSpec] = {
    "calculator": EnvSpec(calculator.CalculatorEnv, calculator.load_tasks,
                          calculator.CalculatorEnv.check_task, TEST_FRACTION,
                          calculator.split_pool),
    # the compact family for the tiny byte-level model (kat_jax.envs.calculator)
    "calculator_small": EnvSpec(calculator.SmallCalculatorEnv, calculator.load_small_tasks,
                                calculator.SmallCalculatorEnv.check_task, TEST_FRACTION),
    "maths": EnvSpec(maths.MathEnv, maths.load_tasks, maths.MathEnv.check_task, TEST_FRACTION),
    "swe": EnvSpec(swe.SweEnv, swe.load_tasks, swe.check_task),
}


def register_env(name: str, factory: Callable[..., Env],
                 load_tasks: Callable[[str | None], list[Task]] | None = None,
                 check_task: TaskCheck | None = None,
                 test_fraction: float | None = None) -> EnvSpec:
    """Makes ``make_env(name, **kwargs)`` call ``factory(**kwargs)``; ``load_tasks`` (tasks file ->
    tasks) lets `kat-jax rollout` / `env check` read its tasks, ``check_task`` lets `env check`
    grade them, ``test_fraction`` gives its tasks a train/test split (EnvSpec). A name belongs to
    one factory: registering it again with another is an error (with the same factory, the new
    entry replaces the old one)."""
    old = ENVS.get(name)
    if old is not None and old.factory is not factory:
        raise ValueError(f"environment {name!r} is already registered")
    if test_fraction is not None and not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ENVS[name] = EnvSpec(factory, load_tasks or _no_tasks(name), check_task, test_fraction)
    return ENVS[name]


def _no_tasks(name: str) -> Callable[[str | None], list[Task]]:
    def load(path: str | None) -> list[Task]:
        raise ValueError(f"environment {name!r} was registered without load_tasks")
    return load


def env_spec(name: str) -> EnvSpec:
    """The registry entry of ``name``; KeyError naming the known environments otherwise."""
    if name not in ENVS:
        raise KeyError(f"unknown environment {name!r}; known: {sorted(ENVS)}")
    return ENVS[name]


def make_env(name: str, **kwargs: Any) -> Env:
    """Builds a registered environment by name (``calculator``, ``maths``, ``swe``, or one added
    with register_env); ``kwargs`` go to its factory (e.g. ``backend`` for swe)."""
    return env_spec(name).factory(**kwargs)


def has_split(name: str) -> bool:
    """Whether the tasks of environment ``name`` have a train/test split (EnvSpec.test_fraction)."""
    return env_spec(name).test_fraction is not None


def load_env_tasks(name: str, path: str | None = None, split: str | None = None) -> list[Task]:
    """The tasks of environment ``name`` from ``path`` (None: its bundled / generated ones).

    split: None: all of them (as loaded, in order); "train" / "test": those of that split
    (task_split with the environment's test_fraction; without a tasks file, of its split_pool),
    in order. The two splits are disjoint and together are the whole pool. A split of an
    environment without one (swe), or another value, is a ValueError naming the environment."""
    spec = env_spec(name)
    if split is None:
        return spec.load_tasks(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)} or None (all tasks), got {split!r}")
    if spec.test_fraction is None:
        raise ValueError(f"environment {name!r} has no train/test split; take all its tasks")
    pool = spec.split_pool() if path is None and spec.split_pool else spec.load_tasks(path)
    return [t for t in pool if task_split(t, spec.test_fraction) == split]


def list_envs() -> list[str]:
    """The registered environment names, sorted."""
    return sorted(ENVS)

"""Environments by name: the one registry that `make_env`, `kat-jax env check` and
`kat-jax rollout` read.

An entry (`EnvSpec`) says how to build the environment, how to read its tasks, and, optionally,
how `env check` grades a task with its gold solution and with an empty one. The built-in
environments (calculator, maths, swe) are registered below, explicitly; the environment modules
register nothing when imported. A user adds one with `register_env` (see kat_jax.envs).
"""

from __future__ import annotations

import dataclasses
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
    """

    factory: Callable[..., Env]
    load_tasks: Callable[[str | None], list[Task]]
    check_task: TaskCheck | None = None


ENVS: dict[str, EnvSpec] = {
    "calculator": EnvSpec(calculator.CalculatorEnv, calculator.load_tasks,
                          calculator.CalculatorEnv.check_task),
    "maths": EnvSpec(maths.MathEnv, maths.load_tasks, maths.MathEnv.check_task),
    "swe": EnvSpec(swe.SweEnv, swe.load_tasks, swe.check_task),
}


def register_env(name: str, factory: Callable[..., Env],
                 load_tasks: Callable[[str | None], list[Task]] | None = None,
                 check_task: TaskCheck | None = None) -> EnvSpec:
    """Makes ``make_env(name, **kwargs)`` call ``factory(**kwargs)``; ``load_tasks`` (tasks file ->
    tasks) lets `kat-jax rollout` / `env check` read its tasks, ``check_task`` lets `env check`
    grade them (EnvSpec). A name belongs to one factory: registering it again with another is an
    error (with the same factory, the new entry replaces the old one)."""
    old = ENVS.get(name)
    if old is not None and old.factory is not factory:
        raise ValueError(f"environment {name!r} is already registered")
    ENVS[name] = EnvSpec(factory, load_tasks or _no_tasks(name), check_task)
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


def load_env_tasks(name: str, path: str | None = None) -> list[Task]:
    """The tasks of environment ``name`` from ``path`` (None: its bundled / generated ones)."""
    return env_spec(name).load_tasks(path)


def list_envs() -> list[str]:
    """The registered environment names, sorted."""
    return sorted(ENVS)

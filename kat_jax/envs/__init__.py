"""Environments behind one interface (reset / step / evaluate / close) and the sandboxes they run in.

Built-in environments, by registry name: ``calculator`` (arithmetic with a calculator tool),
``maths`` (problems with verifiable answers), ``swe`` (repository + issue + hidden tests). Sandboxes:
``local`` (isolated process on this machine) and ``docker`` (needs the ``docker`` extra). See
docs/environments.md.
"""

from kat_jax.envs import calculator, maths, swe  # noqa: E402,F401,I001  (registers the environments)
from kat_jax.envs.base import (
    Env,
    EnvError,
    EpisodeStatus,
    EvalResult,
    Task,
    function_schema,
    list_envs,
    make_env,
    parse_tool_call,
    register_env,
    tool_message,
)
from kat_jax.envs.sandbox import ExecResult, Sandbox, SandboxError, SandboxPool, make_sandbox

__all__ = [
    "Env", "EnvError", "EpisodeStatus", "EvalResult", "ExecResult", "Sandbox", "SandboxError",
    "SandboxPool", "Task", "function_schema", "list_envs", "make_env", "make_sandbox",
    "parse_tool_call", "register_env", "tool_message",
]

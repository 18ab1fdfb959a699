"""envs: environments behind one interface (reset / step / evaluate / close) and the sandboxes
they run in.

Owns the interface (base: Task, Env, EvalResult, EpisodeStatus, tool calls), the registry of
environments by name (registry), the built-in environments ``calculator`` (arithmetic with a
calculator tool), ``maths`` (problems with verifiable answers) and ``swe`` (repository + issue +
hidden tests), the sandbox protocol (sandbox), its backends ``local`` and ``docker`` and their
registry (sandbox_backends), the bash / editor tools, the audit behind `kat-jax env check`
(check), and the RFT teachers (teachers: bundled ground-truth transcripts, the reward relative to
them, the divergence of a partial rollout). See docs/environments.md.

May import: the root utilities (jsonl, storage, atomic_io) and the standard library; docker is
imported lazily by the docker backend. Never kat_jax.ops, models, trees, data, training, rollout
or the commands: agents (rollout) drive environments, never the reverse
(tests/test_import_layers.py checks the layers).

Registries are explicit: kat_jax.envs.registry.ENVS lists the built-in environments and
kat_jax.envs.sandbox_backends.SANDBOX_BACKENDS the built-in backends; importing an environment
or backend module registers nothing. Adding your own environment::

    from kat_jax.envs import Env, EvalResult, Task, register_env

    class EchoEnv(Env):
        name = "echo"

        def reset(self, task):
            self.task = task
            return list(task.messages), []            # messages, tool schemas

        def evaluate(self, messages=()):
            ok = messages[-1]["content"] == self.task.metadata["answer"]
            return EvalResult(float(ok), ok)

    def load_echo_tasks(path):                        # tasks file (None: your default) -> tasks
        return [Task(id="t0", messages=[{"role": "user", "content": "say hi"}],
                     metadata={"answer": "hi"})]

    register_env("echo", EchoEnv, load_tasks=load_echo_tasks)
    env = make_env("echo")                            # kwargs of make_env go to EchoEnv

Registered before the run starts, the environment is available to `make_env`, to the rollout
runner (kat_jax.rollout.runner: it reads tasks through `load_tasks`) and, with
``check_task=fn`` (``fn(task, **options) -> (gold EvalResult, empty EvalResult)``), to the
environment audit (kat_jax.envs.check). A new sandbox backend (a class following the Sandbox
protocol) is added with ``register_sandbox_backend(name, cls)``.
"""

from kat_jax.envs.base import (
    Env,
    EnvError,
    EpisodeStatus,
    EvalResult,
    Task,
    function_schema,
    parse_tool_call,
    tool_message,
)
from kat_jax.envs.registry import (
    ENVS,
    EnvSpec,
    env_spec,
    list_envs,
    load_env_tasks,
    make_env,
    register_env,
)
from kat_jax.envs.sandbox import ExecResult, Sandbox, SandboxError, SandboxPool
from kat_jax.envs.sandbox_backends import (
    SANDBOX_BACKENDS,
    make_sandbox,
    register_sandbox_backend,
    sandbox_backend_names,
)
from kat_jax.envs.teachers import (
    RelativeRewardConfig,
    divergence,
    load_teachers,
    normalize_group,
    relative_reward,
)

__all__ = [
    "ENVS", "SANDBOX_BACKENDS", "Env", "EnvError", "EnvSpec", "EpisodeStatus", "EvalResult",
    "ExecResult", "Sandbox", "SandboxError", "SandboxPool", "Task", "env_spec", "function_schema",
    "list_envs", "load_env_tasks", "make_env", "make_sandbox", "parse_tool_call", "register_env",
    "register_sandbox_backend", "sandbox_backend_names", "tool_message",
    # RFT teachers (teachers): ground-truth transcripts and the reward relative to them
    "RelativeRewardConfig", "divergence", "load_teachers", "normalize_group", "relative_reward",
]

"""SWE environment: a repository at a commit, an issue to resolve, hidden tests that grade the fix.

Instances use the SWE-bench JSONL fields: ``repo, instance_id, base_commit, problem_statement, patch,
test_patch, FAIL_TO_PASS, PASS_TO_PASS`` (the two test lists as JSON lists or JSON strings of lists),
plus optional ``image`` and ``workdir`` (docker backend: an image holding the repository at
``workdir``, default ``/testbed``), ``repo_path`` (a directory or git repository, relative to the JSONL
file: the local backend copies it; the docker backend copies it into the sandbox image
``kat-jax-sandbox:latest`` when the instance has no ``image``), ``test_cmd`` (a per-test command
template with ``{test}``; passing = exit code 0) and ``test_env`` (environment variables of the test
run). Without ``test_cmd`` the tests are pytest node ids (``tests/test_x.py::TestC::test_y``) run by
pytest when the sandbox's python has it, else by unittest.

Episode: the agent works in a sandbox on a copy at ``base_commit`` with ``bash``, ``str_replace_editor``
and ``submit``. Grading (``evaluate``) happens in a *fresh* sandbox: the agent's diff is applied on
``base_commit``, then ``test_patch``, then FAIL_TO_PASS and PASS_TO_PASS run; resolved (reward 1) iff all
pass. ``test_patch`` never enters the agent's sandbox. ``Task.metadata["instance"]`` holds the full
instance (gold patch and hidden tests included): an agent loop must never show metadata to the model.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from typing import Any

from kat_jax.envs.base import (
    Env,
    EnvError,
    EpisodeStatus,
    EvalResult,
    Message,
    Task,
    ToolSchema,
    function_schema,
)
from kat_jax.envs.sandbox import Sandbox, SandboxError
from kat_jax.envs.sandbox_backends import make_sandbox
from kat_jax.envs.tools import BashTool, EditorTool, bash_schema
from kat_jax.jsonl import JsonlError, read_jsonl

BUNDLED_SWE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "swe",
                           "instances.jsonl")
_RESULTS_MARK = "__KAT_TEST_RESULTS__"
_KAT_DIR = ".kat_grading"

SYSTEM_PROMPT = (
    "You are a software engineer working in a repository at {workdir}. Resolve the issue the user "
    "describes by editing the source code (not the tests). Use the `bash` tool to explore and run "
    "commands and `str_replace_editor` to view and edit files. When you are done, call `submit`.")

SUBMIT_SCHEMA = function_schema("submit", "Submit your changes; this ends the episode.", {})

# Runs the listed tests and prints {test id: "passed" | "failed" | ...} after a marker line.
TEST_RUNNER = r'''
import json, os, sys
ids = json.load(open(sys.argv[1]))
sys.path.insert(0, os.getcwd())
results = {}
try:
    import pytest
except ImportError:
    pytest = None
if pytest is not None and os.environ.get("KAT_TEST_RUNNER") != "unittest":
    class Collect:
        def pytest_runtest_logreport(self, report):
            if report.outcome != "passed" or report.when == "call":
                if results.get(report.nodeid) in (None, "passed"):
                    results[report.nodeid] = report.outcome
    pytest.main(["-q", "-p", "no:cacheprovider", *ids], plugins=[Collect()])
else:
    import unittest
    for tid in ids:
        path, *rest = tid.split("::")
        mod = path[:-3].replace("/", ".") if path.endswith(".py") else path
        try:
            suite = unittest.defaultTestLoader.loadTestsFromName(".".join([mod, *rest]))
            res = unittest.TestResult()
            suite.run(res)
            results[tid] = "passed" if res.testsRun and res.wasSuccessful() else "failed"
        except Exception as e:
            results[tid] = "error: %s" % e
print("\n__KAT_TEST_RESULTS__" + json.dumps(results))
'''


def _as_list(x: Any) -> list[str]:
    """A test list given as a list, a JSON string of one, or nothing (an empty list)."""
    if isinstance(x, str):
        x = json.loads(x) if x.strip() else []
    if x is None:
        return []
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"expected a list of test ids, got {type(x).__name__}")
    return [str(t) for t in x]


def load_instances(path: str | None = None) -> list[dict[str, Any]]:
    """Reads SWE-bench JSONL (default: the bundled instances); ``repo_path`` becomes absolute. A bad
    line (not a JSON object, no ``instance_id`` or ``problem_statement``, test lists that are not
    lists) is a ValueError naming ``file:line``."""
    path = path or BUNDLED_SWE
    out = []
    for inst, where in read_jsonl(path):
        for key in ("instance_id", "problem_statement"):
            if not isinstance(inst.get(key), str):
                raise JsonlError(f"{where}: {key!r} must be a string (a SWE-bench instance line)")
        for key in ("FAIL_TO_PASS", "PASS_TO_PASS"):
            try:
                inst[key] = _as_list(inst.get(key))
            except (ValueError, TypeError):
                raise JsonlError(f"{where}: {key!r} must be a list of test ids or a JSON string "
                                 f"of one, got {inst.get(key)!r:.80}") from None
        if inst.get("repo_path") and not os.path.isabs(inst["repo_path"]):
            inst["repo_path"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                             inst["repo_path"])
        out.append(inst)
    return out


def task_from_instance(inst: dict[str, Any]) -> Task:
    """A Task whose user message is the issue; the instance (with hidden tests) goes to metadata."""
    return Task(id=inst["instance_id"],
                messages=[{"role": "user", "content": inst["problem_statement"]}],
                metadata={"instance": inst})


def load_tasks(path: str | None = None) -> list[Task]:
    return [task_from_instance(i) for i in load_instances(path)]


def start_sandbox(inst: dict[str, Any], backend: str = "local", **kwargs: Any) -> Sandbox:
    """A sandbox holding the instance's repository at ``base_commit``.

    Local backend: a copy of ``repo_path``. Docker backend: the instance's ``image`` (holding the
    repository at ``workdir``), or, without one, the sandbox image (``kwargs["image"]``, else
    ``$KAT_JAX_SANDBOX_IMAGE``, else ``kat-jax-sandbox:latest``) with ``repo_path`` copied into
    ``workdir``. A plain (non-git) ``repo_path`` must hash to ``base_commit`` as a baseline commit.
    """
    iid, src = inst["instance_id"], inst.get("repo_path")
    if backend == "docker":
        workdir = inst.get("workdir", "/testbed")
        if inst.get("image"):
            kwargs.pop("image", None)
            return make_sandbox(backend, image=inst["image"], workdir=workdir,
                                base_commit=inst.get("base_commit"), **kwargs)
        kwargs = {**kwargs, "workdir": workdir}
    if not src:
        need = "`image` or `repo_path`" if backend == "docker" else "`repo_path`"
        raise SandboxError(f"{iid}: the {backend} backend needs {need}")
    is_git = os.path.isdir(os.path.join(src, ".git"))
    sb = make_sandbox(backend, source=src, base_commit=inst.get("base_commit") if is_git else None,
                      **kwargs)
    if not is_git and inst.get("base_commit") and sb.base != inst["base_commit"]:
        sb.close()
        raise SandboxError(f"{iid}: the tree at {src} does not hash to base_commit "
                           f"{inst['base_commit']} (got {sb.base})")
    return sb


def grade_patch(inst: dict[str, Any], diff: str, backend: str = "local", timeout: float = 600.0,
                **sandbox_kwargs: Any) -> EvalResult:
    """Applies ``diff`` then ``test_patch`` on ``base_commit`` in a fresh sandbox and runs the tests."""
    f2p, p2p = _as_list(inst.get("FAIL_TO_PASS")), _as_list(inst.get("PASS_TO_PASS"))
    details: dict[str, Any] = {"instance_id": inst["instance_id"], "patch_bytes": len(diff)}
    try:
        sb = start_sandbox(inst, backend, **sandbox_kwargs)
    except (SandboxError, OSError) as e:
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {**details, "error": str(e)})
    try:
        for name, patch in (("agent", diff), ("test", inst.get("test_patch") or "")):
            if not patch.strip():
                continue
            sb.write_file(f"{_KAT_DIR}/{name}.patch", patch.encode())
            r = sb.exec(f"git apply --whitespace=nowarn {_KAT_DIR}/{name}.patch", timeout=120)
            if r.exit_code != 0:
                details[f"{name}_patch_error"] = r.output[-2000:]
                if name == "agent" or diff.strip():
                    return EvalResult(0.0, False, EpisodeStatus.OK, details)
                return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, details)
        outcomes = _run_tests(sb, inst, f2p + p2p, timeout)
    except SandboxError as e:
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {**details, "error": str(e)})
    finally:
        sb.close()
    if outcomes is None:
        details["error"] = "test runner crashed"
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, details)
    if "__timeout__" in outcomes:
        details["tests_timed_out"] = True
    details["FAIL_TO_PASS"] = {t: outcomes.get(t, "missing") for t in f2p}
    details["PASS_TO_PASS"] = {t: outcomes.get(t, "missing") for t in p2p}
    resolved = all(outcomes.get(t) == "passed" for t in f2p + p2p)
    details["resolved"] = resolved
    return EvalResult(float(resolved), resolved, EpisodeStatus.OK, details)


def _run_tests(sb: Sandbox, inst: dict[str, Any], tests: list[str],
               timeout: float) -> dict[str, str] | None:
    if inst.get("test_cmd"):
        out = {}
        for t in tests:
            r = sb.exec(inst["test_cmd"].format(test=shlex.quote(t)), timeout=timeout)
            out[t] = "passed" if r.exit_code == 0 and not r.timed_out else "failed"
        return out
    sb.write_file(f"{_KAT_DIR}/run_tests.py", TEST_RUNNER.encode())
    sb.write_file(f"{_KAT_DIR}/tests.json", json.dumps(tests).encode())
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (inst.get("test_env") or {}).items())
    r = sb.exec(f"{'env ' + env if env else ''} python {_KAT_DIR}/run_tests.py {_KAT_DIR}/tests.json",
                timeout=timeout,
                output_limit=8 << 20)
    if r.timed_out:
        return {"__timeout__": "timeout"}
    pos = r.output.rfind(_RESULTS_MARK)
    if pos < 0:
        return None
    line = r.output[pos + len(_RESULTS_MARK):].split("\n", 1)[0]
    return json.loads(line)


def check_task(task: Task, backend: str = "local", sandbox_kwargs: dict[str, Any] | None = None,
               **_options: Any) -> tuple[EvalResult, EvalResult]:
    """`env check`: the instance graded with its gold ``patch``, then with an empty patch."""
    inst = task.metadata["instance"]
    kwargs = dict(sandbox_kwargs or {})
    return (grade_patch(inst, inst.get("patch", ""), backend, **kwargs),
            grade_patch(inst, "", backend, **kwargs))


class SweEnv(Env):
    """Software-engineering episodes on SWE-bench-style instances (see the module docstring).

    Args:
      backend: ``local`` or ``docker``.
      sandbox_kwargs: passed to the sandbox (rlimits, docker limits, a docker client, ``image``: the
        docker sandbox image of instances without their own...).
      bash_timeout, max_bash_timeout: default and largest per-command timeout of ``bash`` (seconds).
      grade_timeout: seconds for the hidden test run.
    """

    name = "swe"

    def __init__(self, backend: str = "local", sandbox_kwargs: dict[str, Any] | None = None,
                 bash_timeout: float = 60.0, max_bash_timeout: float = 300.0,
                 grade_timeout: float = 600.0, output_limit: int = 16_384) -> None:
        super().__init__()
        self.backend, self.sandbox_kwargs = backend, dict(sandbox_kwargs or {})
        self.bash_timeout, self.max_bash_timeout = bash_timeout, max_bash_timeout
        self.grade_timeout, self.output_limit = grade_timeout, output_limit
        self.sb: Sandbox | None = None
        self.task: Task | None = None
        self._tools: dict[str, Any] = {}
        self.done = False

    def reset(self, task: Task) -> tuple[list[Message], list[ToolSchema]]:
        self.close()
        super().__init__()
        self.task, self.done, self._tools = task, False, {}
        inst = task.metadata["instance"]
        workdir = inst.get("workdir", "/testbed")
        try:
            self.sb = start_sandbox(inst, self.backend, **self.sandbox_kwargs)
            workdir = self.sb.workdir
            bash = BashTool(self.sb, self.bash_timeout, self.max_bash_timeout, self.output_limit)
            editor = EditorTool(self.sb, self.output_limit)
            self._tools = {"bash": bash, "str_replace_editor": editor, "submit": self._submit}
        except (SandboxError, OSError) as e:
            self.mark_env_error(f"sandbox failed to start: {e}")
        system = {"role": "system", "content": SYSTEM_PROMPT.format(workdir=workdir)}
        schemas = [bash_schema(self.max_bash_timeout), EditorTool.schema, SUBMIT_SCHEMA]
        return [system, *task.messages], schemas

    def tools(self) -> dict[str, Any]:
        if not self._tools:
            return {n: self._unavailable for n in ("bash", "str_replace_editor", "submit")}
        # A sandbox failure inside a tool is an infrastructure error (env_error), not the agent's.
        return {n: (lambda a, f=f: self._guard(f, a)) for n, f in self._tools.items()}

    def _unavailable(self, args: dict[str, Any]) -> str:
        raise EnvError(self.env_error or "sandbox unavailable")

    @staticmethod
    def _guard(fn: Any, args: dict[str, Any]) -> str:
        try:
            return fn(args)
        except SandboxError as e:
            raise EnvError(str(e)) from e

    def _submit(self, args: dict[str, Any]) -> str:
        self.done = True
        return "Submitted. The episode is over."

    def evaluate(self, messages: Sequence[Message] = ()) -> EvalResult:
        """Grades the sandbox's diff against the hidden tests in a fresh sandbox."""
        inst = self.task.metadata["instance"] if self.task else {}
        if self.status == EpisodeStatus.ENV_ERROR or self.sb is None:
            return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR,
                              {"error": self.env_error or "no sandbox"})
        try:
            diff = self.sb.diff()
        except SandboxError as e:
            return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {"error": f"diff failed: {e}"})
        res = grade_patch(inst, diff, self.backend, self.grade_timeout, **self.sandbox_kwargs)
        res.details["submitted"] = self.done
        res.details["diff"] = diff
        return res

    def close(self) -> None:
        if self.sb is not None:
            self.sb.close()
            self.sb = None


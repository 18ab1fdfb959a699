"""SWE environment: a repository at a commit, an issue to resolve, hidden tests that grade the fix.

Instances use the SWE-bench JSONL fields: ``repo, instance_id, base_commit, problem_statement, patch,
test_patch, FAIL_TO_PASS, PASS_TO_PASS`` (the two test lists as JSON lists or JSON strings of lists),
plus optional:

- ``image`` and ``workdir`` (docker backend: an image holding the repository at ``workdir``, default
  ``/testbed``); ``repo_path`` (a directory or git repository, relative to the JSONL file or to the
  repositories directory given to load_instances: the local backend copies it; the docker backend
  copies it into the sandbox image ``kat-jax-sandbox:latest`` when the instance has no ``image``);
- setup, run once per sandbox before the episode (and before grading) in the working copy:
  ``pre_install``, ``install``, ``pip_packages`` (SWE-bench's harness spec fields, also read from a
  specs file keyed by repository and version: load_specs) and ``setup_cmds``; a failing step is an
  infrastructure failure (env_error); the set-up tree is the start of the agent's diff. A warm pool
  (``SweEnv(pool_size=N)``) runs it ahead of time;
- ``python`` (the interpreter of the instance's own environment), ``eval_commands`` (shell lines run
  before the tests), ``test_env`` (environment variables of the test run), ``test_cmd`` (a per-test
  command template with ``{test}``, passing = exit code 0, instead of the runner).

Tests are pytest node ids (``tests/test_x.py::TestC::test_y``, ``tests/test_x.py::test_p[1-2]``, or a
whole file) run by kat_jax.envs.swe_test_runner: with the sandbox python's pytest, else with a
read-only pytest that kat_jax copies into the sandbox, else with a built-in collector that runs
plain test functions and classes as pytest does. A test id that does not exist is ``not_found``
(reported, scores 0); a runner that cannot run at all is env_error, never reward 0.

Episode: the agent works in a sandbox on a copy at ``base_commit`` with ``bash``, ``str_replace_editor``
and ``submit``. Grading (``evaluate``) happens in a *fresh* sandbox: the agent's diff is applied on
``base_commit``, then ``test_patch``, then FAIL_TO_PASS and PASS_TO_PASS run; resolved (reward 1) iff all
pass. ``test_patch`` and the grading files never enter the agent's sandbox (they are copied, read-only,
outside the grading sandbox's working copy). ``Task.metadata["instance"]`` holds the full instance
(gold patch and hidden tests included): an agent loop must never show metadata to the model.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shlex
import shutil
import tempfile
import threading
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
from kat_jax.envs.sandbox import Sandbox, SandboxError, SandboxPool, git_commit_all
from kat_jax.envs.sandbox_backends import make_sandbox
from kat_jax.envs.tools import BashTool, EditorTool, bash_schema
from kat_jax.jsonl import JsonlError, read_jsonl

BUNDLED_SWE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "swe",
                           "instances.jsonl")
_RESULTS_MARK = "__KAT_TEST_RESULTS__"

SYSTEM_PROMPT = (
    "You are a software engineer working in a repository at {workdir}. Resolve the issue the user "
    "describes by editing the source code (not the tests). Use the `bash` tool to explore and run "
    "commands and `str_replace_editor` to view and edit files. When you are done, call `submit`.")

SUBMIT_SCHEMA = function_schema("submit", "Submit your changes; this ends the episode.", {})

TEST_RUNNER_SCRIPT = os.path.join(os.path.dirname(__file__), "swe_test_runner.py")
# What the provided read-only pytest needs besides itself (those missing on this host are skipped:
# exceptiongroup and tomli only matter to sandbox pythons older than 3.11).
PYTEST_MODULES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py",
                  "exceptiongroup", "tomli")
# Instance keys that name setup steps (SWE-bench harness spec fields plus kat_jax's setup_cmds).
SPEC_KEYS = ("pre_install", "install", "pip_packages", "setup_cmds", "eval_commands", "test_cmd",
             "test_env", "python")
_bundle_lock = threading.Lock()
_pools_lock = threading.Lock()
_POOLS: dict[Any, SandboxPool] = {}
_BUNDLE: str | None = None     # pytest_bundle's directory, made once per process


def _as_list(x: Any) -> list[str]:
    """A test list given as a list, a JSON string of one, or nothing (an empty list)."""
    if isinstance(x, str):
        x = json.loads(x) if x.strip() else []
    if x is None:
        return []
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"expected a list of test ids, got {type(x).__name__}")
    return [str(t) for t in x]


def _commands(x: Any, key: str, where: str) -> list[str]:
    """A command list given as a list of strings, one string (one command), or nothing."""
    if x is None or x == "":
        return []
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and all(isinstance(c, str) for c in x):
        return list(x)
    raise JsonlError(f"{where}: {key!r} must be a command string or a list of them, got {x!r:.80}")


def load_specs(path: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Reads a specs file: JSON ``{repo: {version: {spec key: value}}}`` as in SWE-bench's harness
    (keys: ``pre_install``, ``install``, ``pip_packages``, ``eval_commands``, ``test_cmd``,
    ``test_env``, ``python``, ``setup_cmds``; version ``"*"`` applies to every version)."""
    try:
        with open(path) as f:
            specs = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise JsonlError(f"{path}: cannot read the specs file: {e}") from None
    if not isinstance(specs, dict) or not all(isinstance(v, dict) for v in specs.values()):
        raise JsonlError(f"{path}: expected {{repo: {{version: spec}}}}")
    for repo, versions in specs.items():
        for version, spec in versions.items():
            if not isinstance(spec, dict):
                raise JsonlError(f"{path}: the spec of {repo} {version} must be an object")
            unknown = sorted(set(spec) - set(SPEC_KEYS))
            if unknown:
                raise JsonlError(f"{path}: the spec of {repo} {version} has unknown keys {unknown} "
                                 f"(known: {list(SPEC_KEYS)})")
    return specs


def setup_commands(inst: dict[str, Any]) -> list[str]:
    """The instance's setup, in order: ``pre_install`` commands, ``install`` (e.g. ``python -m pip
    install -e .``), ``pip_packages`` (one ``python -m pip install`` of them), then ``setup_cmds``."""
    where = inst.get("instance_id", "instance")
    cmds = _commands(inst.get("pre_install"), "pre_install", where)
    cmds += _commands(inst.get("install"), "install", where)
    pkgs = inst.get("pip_packages") or []
    if isinstance(pkgs, str):
        pkgs = pkgs.split()
    if pkgs:
        cmds.append("python -m pip install " + " ".join(shlex.quote(p) for p in pkgs))
    return cmds + _commands(inst.get("setup_cmds"), "setup_cmds", where)


def _find_repo(repos_dir: str, repo: str | None) -> str | None:
    """A checkout of ``repo`` ("owner/name") under ``repos_dir``: owner__name (SWE-bench's naming),
    owner/name or name."""
    if not repo:
        return None
    owner, _, name = repo.rpartition("/")
    for cand in (f"{owner}__{name}" if owner else name, repo, name):
        full = os.path.join(repos_dir, cand)
        if os.path.isdir(full):
            return full
    return None


def load_instances(path: str | None = None, repos_dir: str | None = None,
                   specs: str | dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Reads SWE-bench JSONL (default: the bundled instances).

    ``repo_path`` becomes absolute: relative to ``repos_dir`` when given (an instance without one
    then uses the checkout of its ``repo`` found there, see _find_repo), else to the JSONL file.
    ``specs`` (a specs file or its dict, see load_specs) fills each instance's setup keys from the
    entry of its ``repo`` and ``version`` (the instance's own keys win). A bad line (not a JSON
    object, no ``instance_id`` or ``problem_statement``, test lists that are not lists, setup
    commands that are not strings, a ``repo_path`` that does not exist) is an error naming
    ``file:line``."""
    path = path or BUNDLED_SWE
    if isinstance(specs, str):
        specs = load_specs(specs)
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
        if specs:
            by_version = specs.get(inst.get("repo"), {})
            spec = by_version.get(str(inst.get("version")), by_version.get("*", {}))
            for key, value in spec.items():
                inst.setdefault(key, value)
        setup_commands({**inst, "instance_id": where})     # type-checks the setup keys
        base = repos_dir if repos_dir else os.path.dirname(os.path.abspath(path))
        if inst.get("repo_path"):
            if not os.path.isabs(inst["repo_path"]):
                inst["repo_path"] = os.path.join(base, inst["repo_path"])
        elif repos_dir and not inst.get("image"):
            inst["repo_path"] = _find_repo(repos_dir, inst.get("repo"))
            if inst["repo_path"] is None:
                raise JsonlError(f"{where}: no repo_path and no checkout of {inst.get('repo')!r} "
                                 f"under {repos_dir} (tried owner__name, owner/name, name)")
        if inst.get("repo_path") and not os.path.isdir(inst["repo_path"]):
            raise JsonlError(f"{where}: repo_path {inst['repo_path']} is not a directory")
        out.append(inst)
    return out


def task_from_instance(inst: dict[str, Any]) -> Task:
    """A Task whose user message is the issue; the instance (with hidden tests) goes to metadata."""
    return Task(id=inst["instance_id"],
                messages=[{"role": "user", "content": inst["problem_statement"]}],
                metadata={"instance": inst})


def load_tasks(path: str | None = None, repos_dir: str | None = None,
               specs: str | dict[str, Any] | None = None) -> list[Task]:
    return [task_from_instance(i) for i in load_instances(path, repos_dir, specs)]


def start_sandbox(inst: dict[str, Any], backend: str = "local", setup_timeout: float = 1800.0,
                  **kwargs: Any) -> Sandbox:
    """A sandbox holding the instance's repository at ``base_commit``, set up.

    Local backend: a copy of ``repo_path``. Docker backend: the instance's ``image`` (holding the
    repository at ``workdir``), or, without one, the sandbox image (``kwargs["image"]``, else
    ``$KAT_JAX_SANDBOX_IMAGE``, else ``kat-jax-sandbox:latest``) with ``repo_path`` copied into
    ``workdir``. A plain (non-git) ``repo_path`` must hash to ``base_commit`` as a baseline commit.
    Then the instance's setup commands (setup_commands) run in the working copy, each within
    ``setup_timeout`` seconds; a failing one is a SandboxError naming it (an infrastructure failure:
    env_error). The set-up tree is committed and becomes the start of the diff.
    """
    iid, src = inst["instance_id"], inst.get("repo_path")
    if backend == "docker":
        workdir = inst.get("workdir", "/testbed")
        if inst.get("image"):
            kwargs.pop("image", None)
            sb = make_sandbox(backend, image=inst["image"], workdir=workdir,
                              base_commit=inst.get("base_commit"), **kwargs)
            return _set_up(sb, inst, setup_timeout)
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
    return _set_up(sb, inst, setup_timeout)


def _set_up(sb: Sandbox, inst: dict[str, Any], timeout: float) -> Sandbox:
    cmds = setup_commands(inst)
    if not cmds:
        return sb
    try:
        for cmd in cmds:
            r = sb.exec(cmd, timeout=timeout, output_limit=64 << 10)
            if not r.ok:
                why = "timed out" if r.timed_out else f"exit code {r.exit_code}"
                raise SandboxError(f"{inst['instance_id']}: setup command {cmd!r} failed ({why}): "
                                   f"{r.output[-2000:]}")
        sb.base = git_commit_all(sb, "kat_jax instance setup", timeout)
    except BaseException:
        sb.close()
        raise
    return sb


def sandbox_pool(inst: dict[str, Any], backend: str, size: int, **kwargs: Any) -> SandboxPool:
    """The process-wide warm pool of set-up sandboxes of one instance (made on first use): episodes
    and gradings of the instance take a fresh sandbox from it, so its setup runs ahead of time.
    ``close_pools`` closes them all (also at exit)."""
    key = (inst["instance_id"], backend, size, repr(sorted(kwargs.items())))
    with _pools_lock:
        if key not in _POOLS:
            if not _POOLS:
                atexit.register(close_pools)
            _POOLS[key] = SandboxPool(lambda: start_sandbox(inst, backend, **kwargs), size=size)
        return _POOLS[key]


def close_pools() -> None:
    """Closes every warm pool of sandbox_pool (and the sandboxes they hold)."""
    with _pools_lock:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close()


def _sandbox(inst: dict[str, Any], backend: str, pool_size: int, kwargs: dict[str, Any]) -> Sandbox:
    if pool_size > 0:
        return sandbox_pool(inst, backend, pool_size, **kwargs).acquire()
    return start_sandbox(inst, backend, **kwargs)


def pytest_bundle() -> str:
    """A directory holding pytest and what it imports, copied once per process from this host's
    installation (kat_jax depends on pytest): the grader makes it available read-only in sandboxes
    whose python has no pytest (a sandbox python too old for it gets the built-in collector)."""
    global _BUNDLE
    with _bundle_lock:
        if _BUNDLE is None:
            root = tempfile.mkdtemp(prefix="kat-jax-pytest-")
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            for name in PYTEST_MODULES:
                spec = importlib.util.find_spec(name)
                if spec is None or spec.origin in (None, "built-in", "frozen"):
                    continue
                if spec.submodule_search_locations:
                    shutil.copytree(list(spec.submodule_search_locations)[0],
                                    os.path.join(root, name),
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(spec.origin, os.path.join(root, os.path.basename(spec.origin)))
            _BUNDLE = root
        return _BUNDLE


def grade_patch(inst: dict[str, Any], diff: str, backend: str = "local", timeout: float = 600.0,
                pool_size: int = 0, **sandbox_kwargs: Any) -> EvalResult:
    """Applies ``diff`` then ``test_patch`` on the set-up ``base_commit`` in a fresh sandbox and runs
    the tests (from a warm pool of ``pool_size`` when positive). Resolved (reward 1) iff every
    FAIL_TO_PASS and PASS_TO_PASS test passes (or xfails, as SWE-bench counts it). A diff that does
    not apply scores 0; a sandbox, setup or test runner that fails is env_error."""
    f2p, p2p = _as_list(inst.get("FAIL_TO_PASS")), _as_list(inst.get("PASS_TO_PASS"))
    details: dict[str, Any] = {"instance_id": inst["instance_id"], "patch_bytes": len(diff)}
    try:
        sb = _sandbox(inst, backend, pool_size, sandbox_kwargs)
    except (SandboxError, OSError) as e:
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {**details, "error": str(e)})
    try:
        with tempfile.TemporaryDirectory(prefix="kat-grading-") as tmp:
            patches = [(n, p) for n, p in (("agent", diff), ("test", inst.get("test_patch") or ""))
                       if p.strip()]
            for name, patch in patches:
                with open(os.path.join(tmp, f"{name}.patch"), "w") as f:
                    f.write(patch)
            shutil.copy(TEST_RUNNER_SCRIPT, os.path.join(tmp, "run_tests.py"))
            with open(os.path.join(tmp, "tests.json"), "w") as f:
                json.dump(f2p + p2p, f)
            grading = sb.add_readonly_dir(tmp, "grading")
        for name, _ in patches:
            r = sb.exec(f"git apply --whitespace=nowarn {grading}/{name}.patch", timeout=120)
            if r.exit_code != 0:
                details[f"{name}_patch_error"] = r.output[-2000:]
                if name == "agent" or diff.strip():
                    return EvalResult(0.0, False, EpisodeStatus.OK, details)
                return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, details)
        run = _run_tests(sb, inst, f2p + p2p, grading, timeout)
    except SandboxError as e:
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {**details, "error": str(e)})
    finally:
        sb.close()
    if "error" in run:
        return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {**details, **run})
    outcomes = run["results"]
    details.update(runner=run["runner"], runner_exit_code=run.get("exit_code"))
    if run.get("timed_out"):
        details["tests_timed_out"] = True
    details["FAIL_TO_PASS"] = {t: outcomes.get(t, "missing") for t in f2p}
    details["PASS_TO_PASS"] = {t: outcomes.get(t, "missing") for t in p2p}
    not_found = [t for t in f2p + p2p if outcomes.get(t) == "not_found"]
    if not_found:
        details["not_found"] = not_found
    resolved = all(outcomes.get(t) in ("passed", "xfailed") for t in f2p + p2p)
    details["resolved"] = resolved
    return EvalResult(float(resolved), resolved, EpisodeStatus.OK, details)


def _run_tests(sb: Sandbox, inst: dict[str, Any], tests: list[str], grading: str,
               timeout: float) -> dict[str, Any]:
    """{"results": {test id: outcome}, "runner", "exit_code"} of the hidden tests, or {"error"}
    when the runner could not run at all (an infrastructure failure). ``test_cmd`` (a per-test
    command with ``{test}``, passing = exit code 0) replaces the runner when the instance gives
    one; ``eval_commands`` run first in the same shell; ``python`` names the interpreter of the
    instance's own environment (default: python3, else python, of the sandbox's PATH)."""
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (inst.get("test_env") or {}).items())
    prefix = "".join(f"{c}\n" for c in _commands(inst.get("eval_commands"), "eval_commands",
                                                   inst["instance_id"]))
    if env:
        prefix += f"export {env}\n"
    if inst.get("test_cmd"):
        out = {}
        for t in tests:
            r = sb.exec(prefix + inst["test_cmd"].format(test=shlex.quote(t)), timeout=timeout)
            out[t] = "passed" if r.exit_code == 0 and not r.timed_out else "failed"
        return {"results": out, "runner": "test_cmd", "exit_code": None}
    bundle = sb.add_readonly_dir(pytest_bundle(), "pytest")
    python = shlex.quote(inst["python"]) if inst.get("python") else \
        '"$(command -v python3 || command -v python)"'
    r = sb.exec(f"{prefix}{python} {grading}/run_tests.py {grading}/tests.json {bundle}",
                timeout=timeout, output_limit=8 << 20)
    if r.timed_out:
        return {"results": {}, "runner": "timeout", "exit_code": None, "timed_out": True}
    pos = r.output.rfind(_RESULTS_MARK)
    if pos < 0:
        return {"error": "the test runner could not run (no results): " + r.output[-2000:]}
    return json.loads(r.output[pos + len(_RESULTS_MARK):].split("\n", 1)[0])


def check_task(task: Task, backend: str = "local", sandbox_kwargs: dict[str, Any] | None = None,
               **_options: Any) -> tuple[EvalResult, EvalResult]:
    """`env check`: the instance graded with its gold ``patch``, then with an empty patch (the gold
    result's ``gold_empty`` says whether the gold patch is blank)."""
    inst = task.metadata["instance"]
    kwargs = dict(sandbox_kwargs or {})
    patch = inst.get("patch") or ""
    gold = grade_patch(inst, patch, backend, **kwargs)
    gold.details["gold_empty"] = not patch.strip()
    return gold, grade_patch(inst, "", backend, **kwargs)


class SweEnv(Env):
    """Software-engineering episodes on SWE-bench-style instances (see the module docstring).

    Args:
      backend: ``local`` or ``docker``.
      sandbox_kwargs: passed to the sandbox (rlimits, docker limits, a docker client, ``image``: the
        docker sandbox image of instances without their own, ``setup_timeout``...).
      bash_timeout, max_bash_timeout: default and largest per-command timeout of ``bash`` (seconds).
      grade_timeout: seconds for the hidden test run.
      pool_size: when positive, the episode's sandbox and the grading sandbox come from a warm pool
        of that many set-up sandboxes per instance (sandbox_pool), so setup runs ahead of time.
    """

    name = "swe"

    def __init__(self, backend: str = "local", sandbox_kwargs: dict[str, Any] | None = None,
                 bash_timeout: float = 60.0, max_bash_timeout: float = 300.0,
                 grade_timeout: float = 600.0, output_limit: int = 16_384,
                 pool_size: int = 0) -> None:
        super().__init__()
        self.backend, self.sandbox_kwargs = backend, dict(sandbox_kwargs or {})
        self.bash_timeout, self.max_bash_timeout = bash_timeout, max_bash_timeout
        self.grade_timeout, self.output_limit = grade_timeout, output_limit
        self.pool_size = pool_size
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
            self.sb = _sandbox(inst, self.backend, self.pool_size, self.sandbox_kwargs)
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
        res = grade_patch(inst, diff, self.backend, self.grade_timeout, self.pool_size,
                          **self.sandbox_kwargs)
        res.details["submitted"] = self.done
        res.details["diff"] = diff
        return res

    def close(self) -> None:
        if self.sb is not None:
            self.sb.close()
            self.sb = None


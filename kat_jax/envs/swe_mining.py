"""SWE task mining: a git repository's history (or its pull requests) -> verified SWE-bench instances.

    res = mine("path/to/repo", "tasks.jsonl", since="v1.0")   # or: kat-jax swe mine ...
    res.instances, res.stats                                   # what was kept, counts per filter

Candidates are the first-parent commits of ``since..until`` (or, with a PRs file, the merge commits
it names). A candidate must touch at least one test path and one source path; its diff against its
first parent splits, by path rules, into the gold ``patch`` (every non-test path) and the
``test_patch`` (the test paths). Path rules (``MineOptions.test_globs``, fnmatch over the whole
repository-relative path, where ``*`` also matches ``/``): a path is a test path when it matches one
of them (default DEFAULT_TEST_GLOBS: anything under a ``tests``/``test``/``testing`` directory,
``test_*.py``, ``*_test.py``, ``conftest.py``); a source path is any other path matching
``source_globs`` (default ``*.py``).

Each candidate's base tree (its parent commit, exported without history so the agent cannot read
the fix from ``git log``) runs in a sandbox (local or docker backend) with the spec's setup; the
runner kat_jax.envs.swe_mine_runner runs the whole suite ``runs`` times at base + test patch, then
applies the gold patch and runs it ``runs`` times again (pytest: the sandbox's own or the read-only
copy the grader also uses; the runs of one state share one interpreter). A test is:

- **flaky** (excluded, counted) when its outcome differs between runs of the same state;
- **FAIL_TO_PASS** when it lies in a file of the test patch, fails or errors (its file may fail to
  import) at base + test patch and passes (or xfails) at base + gold + test patch;
- **PASS_TO_PASS** when it passes in both states (any file);
- left out when it fails in both, or, outside the test patch's files, fails before and passes after.

Filters, in order (MineResult.stats counts each, see FILTERS): ``bad_revision`` (a PR's merge
commit does not exist), ``no_test_change``, ``no_source_change``, ``statement_too_short`` (fewer
than ``min_statement_words`` words) and ``statement_leaks_patch`` (the statement holds a line the
gold patch adds, stripped, of at least 10 characters, or a diff header): those two flag the
candidate (``mined.flags``) and drop it before any test runs unless ``keep_flagged``; then
``setup_failed`` (the spec's setup did not run), ``run_failed`` (a patch does not apply, or the
runner could not run), ``gold_breaks_tests`` (a test passing at base + test patch fails with the
gold patch: the change is not a clean fix), ``no_fail_to_pass``, and ``verify_failed`` (the
instance, graded as `kat-jax env check` does, does not score gold 1 and empty 0).

Problem statement: the linked issue's text when the PRs file gives one, else the PR's title and
body, else the commit message.

Environment (``spec``: the setup keys of a SWE-bench harness spec, swe.SPEC_KEYS, except
``test_cmd``): its setup commands run in every sandbox and are recorded in each instance, so the
environment rebuilds the same sandbox. ``pip_packages`` are installed once per spec, outside the
sandboxes (which have no network): local backend: a virtual environment in ``cache_dir``
(``venv-<key>``, key = hash of the spec's environment keys), the instances' ``python``, its
``bin`` first on the PATH of their setup and test commands (prefixed ``export PATH=...``); docker
backend: an image ``kat-jax-swe-env:<key>`` built on the sandbox image (the environment layer over
the base), recorded as ``mined.sandbox_image``; on it, each instance gets its own image
``kat-jax-swe-inst:<key>`` (the instance layer: the instance's base tree in ``/testbed``; key = hash
of the environment image's id, the instance id and its ``base_commit``, so the same instance on the
same environment is built once and reused), recorded as the instance's ``image`` (with ``workdir``),
so its sandboxes start from it with nothing copied in, the tests run while mining included; the
setup commands still run when a sandbox starts. A candidate that is not kept has its instance image
removed. Layers, as SWE-bench builds them: base (kat-jax-sandbox) -> environment (per repository
and spec, shared by its instances) -> instance. ``tests/test_swe_mining_docker.py`` mines with a
real engine.

Output: the JSONL and, beside it, ``<output name>.repos/<instance_id>/``: each instance's base tree
(``repo_path``, relative to the JSONL). ``base_commit`` is that tree's baseline commit (what the
sandbox commits a plain directory as), ``mined.commit`` the original commit. Both are written
whole or not at all. Synthesised instances (``synthesize``: mutations of the code, see
kat_jax.envs.swe_mutations) use the same format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kat_jax.atomic_io import check_output_file, write_jsonl_atomic
from kat_jax.envs.check import broken_reason
from kat_jax.envs.sandbox import BASELINE_ENV, COPY_IGNORE, GIT, Sandbox, SandboxError
from kat_jax.envs.swe import (
    SPEC_KEYS,
    check_task,
    pytest_bundle,
    setup_commands,
    start_sandbox,
    task_from_instance,
)
from kat_jax.envs.swe_mutations import Mutation, apply_mutation, file_diff, mutation_sites
from kat_jax.envs.swe_mutations import statement as mutation_statement
from kat_jax.jsonl import read_jsonl

RUNNER_SCRIPT = os.path.join(os.path.dirname(__file__), "swe_mine_runner.py")
_MARK = "__KAT_MINE_RESULTS__"
DEFAULT_TEST_GLOBS = ("tests/*", "test/*", "testing/*", "*/tests/*", "*/test/*", "*/testing/*",
                      "test_*.py", "*/test_*.py", "*_test.py", "conftest.py", "*/conftest.py")
DEFAULT_SOURCE_GLOBS = ("*.py",)
PASSING = ("passed", "xfailed")
# The filters of the module docstring, in the order they apply (MineResult.stats keys).
FILTERS = ("bad_revision", "no_test_change", "no_source_change", "statement_too_short",
           "statement_leaks_patch", "setup_failed", "run_failed", "gold_breaks_tests",
           "no_fail_to_pass", "verify_failed")
ENV_KEYS = ("python", "pip_packages")        # what the cached environment (venv / image) holds
DOCKER_ENV_REPO = "kat-jax-swe-env"
DOCKER_INSTANCE_REPO = "kat-jax-swe-inst"
INSTANCE_WORKDIR = "/testbed"


class MiningError(ValueError):
    """Bad input to mining (not a git repository, a revision that does not exist, a bad spec)."""


@dataclasses.dataclass
class MineOptions:
    """How candidates are split, run and filtered (see the module docstring)."""

    test_globs: Sequence[str] = DEFAULT_TEST_GLOBS
    source_globs: Sequence[str] = DEFAULT_SOURCE_GLOBS
    runs: int = 2
    min_statement_words: int = 8
    keep_flagged: bool = False
    verify: bool = True
    backend: str = "local"
    workers: int = 1
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    sandbox_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None
    test_timeout: float = 600.0
    setup_timeout: float = 1800.0
    repo_name: str | None = None
    min_stars: int | None = None


@dataclasses.dataclass
class Change:
    """One candidate: the change from ``parent`` to ``commit``."""

    commit: str
    parent: str
    instance_id: str
    statement: str
    created_at: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MineResult:
    """Instances (in candidate order), counts per filter (``stats``: ``candidates``, each of
    FILTERS, ``kept``, ``flaky_tests``) and ``skipped``: (instance id, filter, detail) rows."""

    instances: list[dict[str, Any]]
    stats: Counter
    skipped: list[tuple[str, str, str]]


# -- git --------------------------------------------------------------------------------------------
def git(repo: str, *args: str) -> str:
    """stdout of ``git -C repo ARGS`` (a MiningError with git's message when it fails)."""
    r = subprocess.run([*shlex.split(GIT), "-C", repo, *args], capture_output=True, text=True,
                       env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"})
    if r.returncode != 0:
        raise MiningError(f"git {' '.join(args)} in {repo}: {r.stderr.strip()[-500:]}")
    return r.stdout


def open_repo(path: str) -> str:
    """The top directory of the git repository at ``path`` (a MiningError when it is not one)."""
    if not os.path.isdir(path):
        raise MiningError(f"{path}: no such directory")
    try:
        top = git(path, "rev-parse", "--show-toplevel").strip()
    except MiningError:
        raise MiningError(f"{path}: not a git repository") from None
    if os.path.realpath(top) != os.path.realpath(path):
        raise MiningError(f"{path}: not the top of a git repository (that is {top})")
    return top


def resolve_rev(repo: str, rev: str) -> str:
    """The commit ``rev`` names (a MiningError naming it when there is none)."""
    try:
        return git(repo, "rev-parse", "--verify", "-q", f"{rev}^{{commit}}").strip()
    except MiningError:
        raise MiningError(f"{repo}: revision {rev!r} does not exist") from None


def _safe_id(repo_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", repo_name.replace("/", "__"))


def history_changes(repo: str, repo_name: str, since: str | None = None,
                    until: str = "HEAD") -> list[Change]:
    """The first-parent commits of ``since..until`` (all of ``until``'s history without
    ``since``), oldest first; root commits (no parent) are left out."""
    head = resolve_rev(repo, until)
    spec = f"{resolve_rev(repo, since)}..{head}" if since else head
    out = []
    log = git(repo, "log", "--first-parent", "--reverse", "--format=%H %P%x00%cI%x00%B%x01", spec)
    for entry in log.split("\x01"):
        entry = entry.strip("\n")
        if not entry:
            continue
        ids, date, message = entry.split("\x00", 2)
        commit, *parents = ids.split()
        if parents:
            out.append(Change(commit, parents[0], f"{_safe_id(repo_name)}-{commit[:10]}",
                              message.strip(), date))
    return out


def _issue_text(issue: Any) -> str:
    if isinstance(issue, dict):
        return "\n\n".join(str(issue[k]) for k in ("title", "body") if issue.get(k))
    return str(issue or "")


def pr_changes(repo: str, repo_name: str, prs_path: str, min_stars: int | None,
               stats: Counter, skipped: list) -> list[Change]:
    """The pull requests of a JSONL file (``number``, ``merge_commit``, ``title``, ``body``,
    ``issue``: the linked issue's text or ``{title, body}``, ``labels``, ``stars``): each merge
    commit against its first parent. A merge commit that does not exist is counted (bad_revision);
    PRs of a repository below ``min_stars`` are left out (not counted as candidates)."""
    out = []
    for pr, where in read_jsonl(prs_path):
        if not isinstance(pr, dict) or "merge_commit" not in pr or "number" not in pr:
            raise MiningError(f"{where}: a PR line needs `number` and `merge_commit`")
        if min_stars is not None and int(pr.get("stars") or 0) < min_stars:
            continue
        iid = f"{_safe_id(repo_name)}-{pr['number']}"
        try:
            commit = resolve_rev(repo, str(pr["merge_commit"]))
            parent = resolve_rev(repo, f"{commit}^1")
        except MiningError as e:
            stats["candidates"] += 1
            stats["bad_revision"] += 1
            skipped.append((iid, "bad_revision", str(e)))
            continue
        statement = _issue_text(pr.get("issue")) or "\n\n".join(
            str(pr[k]) for k in ("title", "body") if pr.get(k))
        date = git(repo, "log", "-1", "--format=%cI", commit).strip()
        meta = {k: pr[k] for k in ("number", "labels", "stars") if k in pr}
        out.append(Change(commit, parent, iid, statement, date, {"pr": meta}))
    return out


def is_test_path(path: str, globs: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, g) for g in globs)


def split_change(repo: str, change: Change, opts: MineOptions) -> tuple[str, str, list[str]] | str:
    """(gold patch, test patch, test files of the test patch that exist after the change) or the
    filter that rejects the change (``no_test_change`` / ``no_source_change``)."""
    names = [n for n in git(repo, "diff", "--name-only", "--no-renames", change.parent,
                            change.commit).splitlines() if n]
    tests = [n for n in names if is_test_path(n, opts.test_globs)]
    other = [n for n in names if n not in tests]
    if not tests:
        return "no_test_change"
    if not any(is_test_path(n, opts.source_globs) for n in other):
        return "no_source_change"
    diff = ("diff", "--binary", "--no-renames", "--full-index", change.parent, change.commit, "--")
    added = set(git(repo, "diff", "--name-only", "--no-renames", "--diff-filter=d", change.parent,
                    change.commit, "--", *tests).split())
    return git(repo, *diff, *other), git(repo, *diff, *tests), sorted(added)


# -- trees ------------------------------------------------------------------------------------------
def export_tree(repo: str, rev: str, dest: str) -> None:
    """The tree of ``rev`` as a plain directory ``dest`` (no history; ``git archive``, so no
    submodules), without what sandboxes leave out when they copy a tree (sandbox.COPY_IGNORE:
    ``__pycache__``, ``*.pyc``, ``.pytest_cache``), so that its baseline hash is the sandbox's."""
    os.makedirs(dest)
    archive = subprocess.run([*shlex.split(GIT), "-C", repo, "archive", "--format=tar", rev],
                             capture_output=True)
    if archive.returncode != 0:
        raise MiningError(f"git archive {rev}: {archive.stderr.decode(errors='replace')[-500:]}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    ignored = lambda name: any(fnmatch.fnmatchcase(name, g) for g in COPY_IGNORE)  # noqa: E731
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in [d for d in dirnames if ignored(d)]:
            shutil.rmtree(os.path.join(dirpath, name))
            dirnames.remove(name)
        for name in filenames:
            if ignored(name):
                os.unlink(os.path.join(dirpath, name))


def baseline_hash(tree: str) -> str:
    """The commit a sandbox makes of the plain directory ``tree`` (sandbox.git_baseline_script:
    fixed author, dates and message), i.e. the instance's ``base_commit``. Leaves no ``.git``."""
    env = {**os.environ, **BASELINE_ENV, "GIT_CONFIG_NOSYSTEM": "1"}
    try:
        for cmd in ("init -q", "add -A", "commit -q --allow-empty -m baseline"):
            subprocess.run([*shlex.split(GIT), *shlex.split(cmd)], cwd=tree, env=env, check=True,
                           capture_output=True)
        return subprocess.run([*shlex.split(GIT), "rev-parse", "HEAD"], cwd=tree, env=env,
                              check=True, capture_output=True, text=True).stdout.strip()
    finally:
        shutil.rmtree(os.path.join(tree, ".git"), ignore_errors=True)


# -- statements -------------------------------------------------------------------------------------
def statement_flags(statement: str, gold_patch: str, min_words: int) -> list[str]:
    """The quality flags of a problem statement: ``statement_too_short`` (fewer than
    ``min_words`` words), ``statement_leaks_patch`` (it holds a line the gold patch adds, stripped,
    of at least 10 characters, or a diff header)."""
    flags = []
    if len(statement.split()) < min_words:
        flags.append("statement_too_short")
    added = [ln[1:].strip() for ln in gold_patch.splitlines()
             if ln.startswith("+") and not ln.startswith("+++")]
    if ("diff --git" in statement or re.search(r"^@@ -\d", statement, re.M)
            or any(len(a) >= 10 and a in statement for a in added)):
        flags.append("statement_leaks_patch")
    return flags


# -- running the suite ------------------------------------------------------------------------------
def _outcome(run: dict[str, Any], test: str) -> str:
    if test in run["results"]:
        return run["results"][test]
    path = test.split("::")[0]
    return "error" if any(path == e or test.startswith(e + "::") for e in run["collect_errors"]) \
        else "missing"


@dataclasses.dataclass
class Split:
    f2p: list[str]
    p2p: list[str]
    flaky: list[str]
    broken: list[str]       # passing at base + test patch, not with the gold patch


def classify(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]],
             test_files: Sequence[str]) -> Split:
    """FAIL_TO_PASS / PASS_TO_PASS / flaky / broken tests from the runner's runs at base + test patch
    (``before``) and base + gold + test patch (``after``); rules in the module docstring."""
    tests = sorted({t for r in [*before, *after] for t in r["results"]})
    split = Split([], [], [], [])
    for t in tests:
        b = {_outcome(r, t) for r in before}
        a = {_outcome(r, t) for r in after}
        if len(b) > 1 or len(a) > 1:
            split.flaky.append(t)
            continue
        (b,), (a,) = b, a
        if a in PASSING:
            if b in PASSING:
                split.p2p.append(t)
            elif b in ("failed", "error") and t.split("::")[0] in test_files:
                split.f2p.append(t)
        elif b in PASSING:
            split.broken.append(t)
    return split


def _shell_prefix(inst: dict[str, Any]) -> str:
    env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (inst.get("test_env") or {}).items())
    cmds = inst.get("eval_commands") or []
    prefix = "".join(f"{c}\n" for c in ([cmds] if isinstance(cmds, str) else cmds))
    return prefix + (f"export {env}\n" if env else "")


def run_plan(sb: Sandbox, inst: dict[str, Any], plan: list[dict[str, Any]],
             files: dict[str, str | bytes], timeout: float) -> dict[str, Any]:
    """Runs swe_mine_runner's ``plan`` in ``sb`` with ``files`` (name -> text) beside it; returns
    its result (``runs``) or raises SandboxError when the runner did not run or reported an error."""
    with tempfile.TemporaryDirectory(prefix="kat-mine-") as tmp:
        for name, data in {**files, "plan.json": json.dumps(plan)}.items():
            with open(os.path.join(tmp, name), "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        shutil.copy(RUNNER_SCRIPT, os.path.join(tmp, "runner.py"))
        ro = sb.add_readonly_dir(tmp, "mining")
    bundle = sb.add_readonly_dir(pytest_bundle(), "pytest")
    python = shlex.quote(inst["python"]) if inst.get("python") else \
        '"$(command -v python3 || command -v python)"'
    r = sb.exec(f"{_shell_prefix(inst)}{python} {ro}/runner.py {ro}/plan.json {bundle}",
                timeout=timeout, output_limit=32 << 20)
    if r.timed_out:
        raise SandboxError(f"the test runs timed out after {timeout:g}s")
    pos = r.output.rfind(_MARK)
    if pos < 0:
        raise SandboxError("the mining runner did not run: " + r.output[-2000:])
    out = json.loads(r.output[pos + len(_MARK):].split("\n", 1)[0])
    if out.get("error"):
        raise SandboxError(out["error"])
    return out


# -- environments -----------------------------------------------------------------------------------
def check_spec(spec: dict[str, Any], where: str = "spec") -> dict[str, Any]:
    """A mining spec: an object of swe.SPEC_KEYS, without ``test_cmd`` (mining runs pytest)."""
    if not isinstance(spec, dict):
        raise MiningError(f"{where}: expected a JSON object of setup keys")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise MiningError(f"{where}: unknown keys {unknown} (known: {list(SPEC_KEYS)})")
    if "test_cmd" in spec:
        raise MiningError(f"{where}: `test_cmd` is not supported by mining (it runs pytest)")
    try:
        setup_commands({**spec, "instance_id": where})
    except ValueError as e:
        raise MiningError(str(e)) from None
    return dict(spec)


def env_key(spec: dict[str, Any], backend: str) -> str:
    """The cache key of a spec's environment (its ENV_KEYS and the backend)."""
    keep = {k: spec[k] for k in ENV_KEYS if spec.get(k)}
    blob = json.dumps([backend, keep], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> str:
    return os.environ.get("KAT_JAX_SWE_ENV_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kat_jax", "swe_envs")


def ensure_venv(spec: dict[str, Any], cache_dir: str, base_python: str | None = None,
                run: Callable[..., Any] = subprocess.run) -> str:
    """The python of the cached virtual environment of ``spec`` (``pip_packages`` installed),
    built on first use: ``python -m venv --without-pip`` of ``base_python`` (default: the local
    sandbox's interpreter), then ``base_python -m pip --python VENV install PACKAGES`` (network
    needed once), in a temporary directory renamed into place (a failed build leaves nothing)."""
    from kat_jax.envs.local_sandbox import probe_isolation

    base = spec.get("python") or base_python or probe_isolation().python
    pkgs = spec.get("pip_packages") or []
    pkgs = pkgs.split() if isinstance(pkgs, str) else list(pkgs)
    dest = os.path.join(cache_dir, f"venv-{env_key(spec, 'local')}")
    py = os.path.join(dest, "bin", "python")
    if os.path.exists(py):
        return py
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".", dir=cache_dir)
    try:
        for argv in ([base, "-m", "venv", "--without-pip", tmp],
                     [base, "-m", "pip", "--python", os.path.join(tmp, "bin", "python"),
                      "install", "--no-input", "-q", *pkgs]):
            r = run(argv, capture_output=True, text=True)
            if r.returncode != 0:
                raise SandboxError(f"building the environment {dest}: {' '.join(argv)} failed: "
                                   f"{(r.stderr or r.stdout)[-1500:]}")
        for dirpath, _dirs, _files in os.walk(tmp):
            os.chmod(dirpath, 0o755)              # readable by the sandbox's own uid
        try:
            os.rename(tmp, dest)
        except OSError:                           # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return py


def ensure_docker_env_image(spec: dict[str, Any], base_image: str | None = None) -> str:
    """The tag of the docker environment image of ``spec`` (``kat-jax-swe-env:<key>``: the sandbox
    image plus ``pip install`` of ``pip_packages``), built unless it exists (not tested here)."""
    import io

    import docker  # lazy: the docker extra
    from kat_jax.envs.docker_sandbox import default_image

    base = base_image or default_image()
    tag = f"{DOCKER_ENV_REPO}:{env_key({**spec, 'python': base}, 'docker')}"
    client = docker.from_env()
    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    pkgs = spec.get("pip_packages") or []
    pkgs = pkgs.split() if isinstance(pkgs, str) else list(pkgs)
    dockerfile = f"FROM {base}\nUSER root\nRUN python3 -m pip install --no-cache-dir " \
                 f"{' '.join(shlex.quote(p) for p in pkgs)}\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    return tag


def _docker_client(kwargs: dict[str, Any]) -> Any:
    if kwargs.get("client") is not None:
        return kwargs["client"]
    import docker  # lazy: the docker extra
    return docker.from_env()


def instance_image_tag(env_image_id: str, inst: dict[str, Any]) -> str:
    """The deterministic tag of an instance's docker image (module docstring)."""
    blob = json.dumps([env_image_id, inst["instance_id"], inst["base_commit"]])
    return f"{DOCKER_INSTANCE_REPO}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def ensure_docker_instance_image(inst: dict[str, Any], tree: str, env_image: str,
                                 client: Any = None) -> tuple[str, bool]:
    """(tag, built now): the instance layer, ``env_image`` plus ``tree`` (the instance's base tree,
    COPY_IGNORE left out) in INSTANCE_WORKDIR, built unless the engine has the tag already."""
    import io
    import tarfile

    from kat_jax.envs.docker_sandbox import missing_image_message

    client = client if client is not None else _docker_client({})
    try:
        env_id = client.images.get(env_image).id
    except Exception as e:  # noqa: BLE001  (docker.errors.ImageNotFound, APIError)
        raise SandboxError(missing_image_message(env_image) + f" ({e})") from None
    tag = instance_image_tag(env_id, inst)
    try:
        client.images.get(tag)
        return tag, False
    except Exception:  # noqa: BLE001  (ImageNotFound: build it)
        pass
    dockerfile = (f"FROM {env_image}\nUSER root\nCOPY tree/ {INSTANCE_WORKDIR}/\n"
                  f"LABEL kat_jax.swe_instance={json.dumps(inst['instance_id'])} "
                  f"kat_jax.base_commit={inst['base_commit']}\n").encode()
    ignore = shutil.ignore_patterns(*COPY_IGNORE)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(tree, arcname="tree", recursive=False)
        for dirpath, dirs, files in os.walk(tree):
            skip = ignore(dirpath, dirs + files)
            dirs[:] = sorted(d for d in dirs if d not in skip)
            for name in sorted(dirs + [f for f in files if f not in skip]):
                full = os.path.join(dirpath, name)
                tar.add(full, arcname=os.path.join("tree", os.path.relpath(full, tree)),
                        recursive=False)
    buf.seek(0)
    try:
        client.images.build(fileobj=buf, custom_context=True, tag=tag, rm=True, forcerm=True)
    except Exception as e:  # noqa: BLE001  (docker.errors.BuildError, APIError)
        raise SandboxError(f"{inst['instance_id']}: building its image {tag} on {env_image} "
                           f"failed: {e}") from None
    return tag, True


def _instance_layer(inst: dict[str, Any], tree: str, ctx: _Ctx) -> Callable[[], None]:
    """With the docker backend, gives ``inst`` its own image (ensure_docker_instance_image) and
    returns what removes it again (a no-op when the image existed before); else a no-op."""
    if ctx.opts.backend != "docker":
        return lambda: None
    from kat_jax.envs.docker_sandbox import default_image

    client = _docker_client(ctx.sandbox_kwargs)
    tag, built = ensure_docker_instance_image(
        inst, tree, ctx.sandbox_kwargs.get("image") or default_image(), client)
    inst.update(image=tag, workdir=INSTANCE_WORKDIR)

    def remove() -> None:
        if built:
            with contextlib.suppress(Exception):
                client.images.remove(tag, force=True)
    return remove


def prepare_environment(opts: MineOptions) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(the setup keys every instance records, the sandbox kwargs, the environment key)."""
    spec = check_spec(opts.spec)
    key = env_key(spec, opts.backend)
    kwargs = dict(opts.sandbox_kwargs)
    if spec.get("pip_packages"):
        if opts.backend == "local":
            spec["python"] = ensure_venv(spec, opts.cache_dir or default_cache_dir())
            path = f"export PATH={shlex.quote(os.path.dirname(spec['python']))}:\"$PATH\""
            for k in ("pre_install", "install", "setup_cmds", "eval_commands"):
                cmds = spec.get(k) or []
                cmds = [cmds] if isinstance(cmds, str) else cmds
                spec[k] = [f"{path} && {c}" for c in cmds] if k != "eval_commands" \
                    else [path, *cmds]
        elif opts.backend == "docker":
            kwargs["image"] = ensure_docker_env_image(spec, kwargs.get("image"))
        spec.pop("pip_packages")
    return spec, kwargs, key


# -- mining one change ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Ctx:
    repo: str
    repo_name: str
    opts: MineOptions
    spec: dict[str, Any]
    sandbox_kwargs: dict[str, Any]
    key: str
    trees: str        # where the instances' base trees are written


def _env_meta(ctx: _Ctx) -> dict[str, Any]:
    """``env_key``, and with the docker backend ``sandbox_image``: the image `env check` needs
    (``--sandbox-image``) for instances without their own."""
    image = ctx.sandbox_kwargs.get("image") if ctx.opts.backend == "docker" else None
    return {"env_key": ctx.key, **({"sandbox_image": image} if image else {})}


def _verify(inst: dict[str, Any], ctx: _Ctx) -> str:
    gold, empty = check_task(task_from_instance(inst), ctx.opts.backend, ctx.sandbox_kwargs)
    return broken_reason(gold, empty)


def _start(inst: dict[str, Any], ctx: _Ctx) -> Sandbox:
    return start_sandbox(inst, ctx.opts.backend, setup_timeout=ctx.opts.setup_timeout,
                         **ctx.sandbox_kwargs)


def mine_change(change: Change, ctx: _Ctx) -> tuple[dict[str, Any] | None, str, str]:
    """(instance, "kept", "") or (None, filter, detail): one candidate through every filter."""
    opts = ctx.opts
    split = split_change(ctx.repo, change, opts)
    if isinstance(split, str):
        return None, split, ""
    gold, test_patch, test_files = split
    flags = statement_flags(change.statement, gold, opts.min_statement_words)
    if flags and not opts.keep_flagged:
        return None, flags[0], change.statement[:200]
    tree = os.path.join(ctx.trees, change.instance_id)
    export_tree(ctx.repo, change.parent, tree)
    inst = {"repo": ctx.repo_name, "instance_id": change.instance_id,
            "base_commit": baseline_hash(tree), "problem_statement": change.statement,
            "patch": gold, "test_patch": test_patch, "FAIL_TO_PASS": [], "PASS_TO_PASS": [],
            "created_at": change.created_at, "repo_path": tree, **ctx.spec}
    reason, detail = "kept", ""
    remove_image: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:
            remove_image = _instance_layer(inst, tree, ctx)
            sb = _start(inst, ctx)
        except (SandboxError, OSError) as e:
            reason, detail = "setup_failed", str(e)
            return None, reason, detail
        try:
            plan = [{"op": "apply", "patch": "test.patch"},
                    {"op": "run", "label": "before", "repeat": opts.runs},
                    {"op": "apply", "patch": "gold.patch"},
                    {"op": "run", "label": "after", "repeat": opts.runs}]
            out = run_plan(sb, inst, plan, {"test.patch": test_patch, "gold.patch": gold},
                           opts.test_timeout)
        except SandboxError as e:
            reason, detail = "run_failed", str(e)
            return None, reason, detail
        finally:
            sb.close()
        s = classify(out["runs"]["before"], out["runs"]["after"], test_files)
        inst.update(FAIL_TO_PASS=s.f2p, PASS_TO_PASS=s.p2p)
        inst["mined"] = {"from": "pr" if change.meta.get("pr") else "commit",
                         "commit": change.commit, "parent": change.parent, "runs": opts.runs,
                         "flaky": s.flaky, "flags": flags, **_env_meta(ctx), **change.meta}
        if s.broken:
            reason, detail = "gold_breaks_tests", ", ".join(s.broken)
        elif not s.f2p:
            reason = "no_fail_to_pass"
        elif opts.verify:
            why = _verify(inst, ctx)
            if why:
                reason, detail = "verify_failed", why
        return (inst if reason == "kept" else None), reason, detail
    finally:
        if reason != "kept":
            shutil.rmtree(tree, ignore_errors=True)
            remove_image()


# -- synthesis ------------------------------------------------------------------------------------
SYNTH_BATCH = 4             # mutations per runner process (a hung one costs at most a batch)
SYNTH_TRIES_PER_BUG = 8     # sites tried per wanted bug, at most


def _stable(runs: Sequence[dict[str, Any]]) -> tuple[set[str], list[str]]:
    """(tests passing in every run, flaky tests) of repeated runs of one state."""
    tests = sorted({t for r in runs for t in r["results"]})
    flaky = [t for t in tests if len({_outcome(r, t) for r in runs}) > 1]
    passing = {t for t in tests if t not in flaky and _outcome(runs[0], t) in PASSING}
    return passing, flaky


def synthesize_instances(ctx: _Ctx, rev: str, k: int, seed: int, stats: Counter,
                         skipped: list[tuple[str, str, str]],
                         progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Up to ``k`` instances whose bug is a mutation (kat_jax.envs.swe_mutations) of the tree of
    ``rev``: the suite runs ``runs`` times on the clean tree with a profile of the repository
    functions it calls; the mutation sites of the called functions in source files are shuffled
    (``seed``), and at most SYNTH_TRIES_PER_BUG * k of them are tried, SYNTH_BATCH per runner
    process, each with one run of the suite. A mutation is kept when at least one test passing on
    the clean tree fails: FAIL_TO_PASS are those, PASS_TO_PASS the clean-passing tests that still
    pass (flaky ones excluded). The instance's tree is the mutated tree, its gold patch the reverse
    of the mutation, its test patch empty, its statement swe_mutations.statement; a statement that
    leaks the patch drops it (unless ``keep_flagged``), then the verification as for mined ones.
    Counts go to ``stats`` as ``synth_*`` keys (``synth_tried``, ``synth_no_failure``,
    ``synth_statement_leaks_patch``, ``synth_verify_failed``, ``synth_kept`` ...)."""
    opts = ctx.opts
    clean = os.path.join(ctx.trees, "_clean")
    export_tree(ctx.repo, rev, clean)
    try:
        base = {"repo": ctx.repo_name, "instance_id": f"{_safe_id(ctx.repo_name)}-synth-base",
                "base_commit": baseline_hash(clean), "repo_path": clean, **ctx.spec}
        try:
            sb = _start(base, ctx)
        except (SandboxError, OSError) as e:
            stats["synth_setup_failed"] += 1
            skipped.append((base["instance_id"], "setup_failed", str(e)))
            return []
        try:
            t0 = time.monotonic()
            out = run_plan(sb, base, [{"op": "run", "label": "clean", "repeat": opts.runs,
                                       "profile": True}], {}, opts.test_timeout)
            per_run = (time.monotonic() - t0) / opts.runs
            passing, flaky = _stable(out["runs"]["clean"])
            covered: dict[str, set[tuple[str, int]]] = {}
            for r in out["runs"]["clean"]:
                for path, name, line in r["called"]:
                    covered.setdefault(path, set()).add((name, line))
            sites: list[Mutation] = []
            for path in sorted(covered):
                if is_test_path(path, opts.test_globs) or \
                        not is_test_path(path, opts.source_globs):
                    continue
                with open(os.path.join(clean, path), encoding="utf-8") as f:
                    sites += mutation_sites(f.read(), path, covered[path])
            random.Random(seed).shuffle(sites)
            sites = sites[:SYNTH_TRIES_PER_BUG * k]
            kept: list[tuple[Mutation, str, list[str], list[str], str]] = []
            for i in range(0, len(sites), SYNTH_BATCH):
                if len(kept) >= k:
                    break
                batch, files, plan = [], {}, []
                for j, m in enumerate(sites[i:i + SYNTH_BATCH]):
                    with open(os.path.join(clean, m.path), encoding="utf-8") as f:
                        original = f.read()
                    text = apply_mutation(original, m)
                    if text is None:
                        continue
                    files[f"m{j}.py"], files[f"o{j}.py"] = text, original
                    plan += [{"op": "write", "path": m.path, "from": f"m{j}.py"},
                             {"op": "run", "label": f"m{j}", "longrepr": True},
                             {"op": "write", "path": m.path, "from": f"o{j}.py"}]
                    batch.append((j, m, text))
                stats["synth_tried"] += len(batch)
                # a mutation may loop forever: a batch gets 60 s + 10x a clean run per mutation
                timeout = min(opts.test_timeout, 60 + 10 * per_run * len(batch))
                try:
                    res = run_plan(sb, base, plan, files, timeout)
                except SandboxError as e:
                    stats["synth_run_failed"] += len(batch)
                    skipped.append((base["instance_id"], "run_failed", str(e)))
                    for j, m, _ in batch:         # the runner may have stopped mid-mutation
                        sb.write_file(m.path, files[f"o{j}.py"].encode())
                    continue
                for j, m, text in batch:
                    run = res["runs"][f"m{j}"][0]
                    f2p = sorted(t for t in passing if _outcome(run, t) not in PASSING)
                    p2p = sorted(t for t in passing if _outcome(run, t) in PASSING)
                    if not f2p:
                        stats["synth_no_failure"] += 1
                        continue
                    kept.append((m, text, f2p, p2p, run["longrepr"].get(f2p[0], "")))
        finally:
            sb.close()
        instances = []
        for m, text, f2p, p2p, report in kept[:k]:
            inst, reason = _mutation_instance(ctx, clean, m, text, f2p, p2p, report, flaky, rev)
            if inst is None:
                stats[f"synth_{reason}"] += 1
                skipped.append((m.description, reason, ""))
                continue
            instances.append(inst)
            stats["synth_kept"] += 1
            if progress:
                progress(f"{inst['instance_id']}: {m.description}")
        return instances
    finally:
        shutil.rmtree(clean, ignore_errors=True)


def _mutation_instance(ctx: _Ctx, clean: str, m: Mutation, text: str, f2p: list[str],
                       p2p: list[str], report: str, flaky: list[str], rev: str
                       ) -> tuple[dict[str, Any] | None, str]:
    """(instance, "kept") or (None, "statement_leaks_patch" / "verify_failed")."""
    key = hashlib.sha256(f"{rev}:{m}".encode()).hexdigest()[:10]
    iid = f"{_safe_id(ctx.repo_name)}-synth-{key}"
    tree = os.path.join(ctx.trees, iid)
    shutil.copytree(clean, tree)
    with open(os.path.join(tree, m.path), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(clean, m.path), encoding="utf-8") as f:
        original = f.read()
    statement, patch = mutation_statement(f2p, report), file_diff(m.path, text, original)
    flags = statement_flags(statement, patch, 0)
    inst = {"repo": ctx.repo_name, "instance_id": iid, "base_commit": baseline_hash(tree),
            "problem_statement": statement, "patch": patch, "test_patch": "",
            "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "repo_path": tree, **ctx.spec,
            "mined": {"from": "mutation", "commit": rev, "mutation": m.description,
                      "kind": m.kind, "runs": ctx.opts.runs, "flaky": flaky, "flags": flags,
                      **_env_meta(ctx)}}
    reason, remove_image = "kept", (lambda: None)
    if flags and not ctx.opts.keep_flagged:
        reason = flags[0]
    else:
        try:
            remove_image = _instance_layer(inst, tree, ctx)
        except SandboxError:
            reason = "setup_failed"
        if reason == "kept" and ctx.opts.verify and _verify(inst, ctx):
            reason = "verify_failed"
    if reason != "kept":
        shutil.rmtree(tree, ignore_errors=True)
        remove_image()
        return None, reason
    return inst, reason


# -- the whole job ----------------------------------------------------------------------------------
def _repos_dir(output: str) -> str:
    base = os.path.basename(output)
    stem = base[:-len(".jsonl")] if base.endswith(".jsonl") else base
    return os.path.join(os.path.dirname(os.path.abspath(output)), stem + ".repos")


def write_output(output: str, instances: list[dict[str, Any]], trees: str) -> list[dict[str, Any]]:
    """Moves the base trees into place beside ``output`` and writes the JSONL (``repo_path``
    relative to it); an earlier output of the same name is replaced only once this one is whole.
    Returns the instances with ``repo_path`` the trees' final absolute paths."""
    final = _repos_dir(output)
    rel = os.path.basename(final)
    lines = []
    for inst in instances:
        inst = dict(inst)
        inst["repo_path"] = os.path.join(rel, os.path.basename(inst["repo_path"]))
        lines.append(inst)
    old = None
    if os.path.exists(final):
        old = final + f".old-{os.getpid()}"
        os.rename(final, old)
    try:
        os.rename(trees, final)
        write_jsonl_atomic(output, lines)
    except BaseException:
        if os.path.isdir(final):
            shutil.rmtree(final, ignore_errors=True)
        if old:
            os.rename(old, final)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return [{**inst, "repo_path": os.path.join(final, os.path.basename(inst["repo_path"]))}
            for inst in instances]


@contextlib.contextmanager
def _trees_dir(output: str):
    d = tempfile.mkdtemp(prefix=os.path.basename(_repos_dir(output)) + ".tmp-",
                         dir=os.path.dirname(os.path.abspath(output)))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def mine(repo: str, output: str, since: str | None = None, until: str = "HEAD",
         prs: str | None = None, synthesize: int = 0, opts: MineOptions | None = None,
         max_candidates: int | None = None, seed: int = 0,
         progress: Callable[[str], None] | None = None) -> MineResult:
    """Mines ``repo`` (history, or the PRs file ``prs``; plus ``synthesize`` mutation instances at
    ``until``, see swe_mutations) into ``output`` (module docstring). Bad input (not a git
    repository, a missing revision, a bad spec, an output path that cannot be written) raises a
    MiningError or OSError before any work; per-candidate failures are counted in ``stats``."""
    opts = opts or MineOptions()
    repo = open_repo(os.path.abspath(repo))
    check_output_file(output)
    if opts.runs < 1:
        raise MiningError(f"runs must be >= 1, got {opts.runs}")
    repo_name = opts.repo_name or f"local/{os.path.basename(repo)}"
    stats: Counter = Counter()
    skipped: list[tuple[str, str, str]] = []
    if prs:
        changes = pr_changes(repo, repo_name, prs, opts.min_stars, stats, skipped)
    else:
        changes = history_changes(repo, repo_name, since, until)
    if max_candidates is not None:
        changes = changes[:max_candidates]
    until_sha = resolve_rev(repo, until)
    try:
        spec, kwargs, key = prepare_environment(opts)
    except SandboxError as e:                 # the environment (venv / image) could not be built
        raise MiningError(str(e)) from None
    instances = []
    with _trees_dir(output) as trees:
        ctx = _Ctx(repo, repo_name, opts, spec, kwargs, key, trees)
        ex = ThreadPoolExecutor(max_workers=max(1, opts.workers))
        try:
            for change, (inst, reason, detail) in zip(changes, ex.map(
                    lambda c: mine_change(c, ctx), changes)):
                stats["candidates"] += 1
                stats[reason] += 1
                if inst is not None:
                    instances.append(inst)
                    stats["flaky_tests"] += len(inst["mined"]["flaky"])
                else:
                    skipped.append((change.instance_id, reason, detail))
                if progress:
                    progress(f"{change.instance_id}: {reason}")
        finally:
            ex.shutdown(wait=True, cancel_futures=True)      # an error stops what has not started
        if synthesize:
            instances += synthesize_instances(ctx, until_sha, synthesize, seed, stats, skipped,
                                              progress)
        instances = write_output(output, instances, trees)
        os.makedirs(trees)          # _trees_dir removes it again
    return MineResult(instances, stats, skipped)


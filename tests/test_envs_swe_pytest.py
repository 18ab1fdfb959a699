"""SWE instances written here from scratch, as SWE-bench / SWE-Gym repositories look: plain pytest
functions, classes, parametrised ids and fixtures; instance setup; specs files; the test runner's
outcomes with pytest and with its built-in collector; both sandbox backends."""

import json
import os
import subprocess
import sys

import pytest

from kat_jax.envs import EpisodeStatus, make_env
from kat_jax.envs.swe import (
    TEST_RUNNER_SCRIPT,
    close_pools,
    grade_patch,
    load_instances,
    load_specs,
    sandbox_pool,
    task_from_instance,
)
from kat_jax.jsonl import JsonlError

SOURCE = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
OLD_TESTS = """\
from calc.core import mul


def test_mul():
    assert mul(2, 3) == 6


class TestMul:
    def setup_method(self, method):
        self.x = 4

    def test_square(self):
        assert mul(self.x, self.x) == 16
"""
# Hidden tests in the pytest style: plain functions, a class, parametrised cases, a fixture.
NEW_TESTS = """\
import pytest

from calc.core import add


def test_add():
    assert add(2, 2) == 4


class TestAdd:
    def test_zero(self):
        assert add(0, 5) == 5


@pytest.mark.parametrize("a,b", [(1, 2), (2, 4)])
def test_param(a, b):
    assert add(a, a) == b


def test_fixture(tmp_path):
    (tmp_path / "x").write_text("1")
    assert add(1, int((tmp_path / "x").read_text())) == 2
"""
# The same without pytest: what the built-in collector must run as pytest would.
PLAIN_TESTS = """\
from calc.core import add


def setup_module():
    global BASE
    BASE = 10


def test_add():
    assert add(2, 2) == 4


class TestAdd:
    def setup_method(self, method):
        self.base = BASE

    def test_base(self):
        assert add(self.base, 1) == 11
"""
F2P = ["tests/test_add.py::test_add", "tests/test_add.py::TestAdd::test_zero",
       "tests/test_add.py::test_param[1-2]", "tests/test_add.py::test_param[2-4]",
       "tests/test_add.py::test_fixture"]
P2P = ["tests/test_mul.py::test_mul", "tests/test_mul.py::TestMul::test_square"]


def git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env=env).stdout


def write(root, files):
    for path, text in files.items():
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)


def make_instance(tmp_path, tests=NEW_TESTS, f2p=F2P, p2p=P2P, extra=None, name="calc"):
    """A git repository with a bug, its gold patch and a hidden test patch (SWE-bench fields)."""
    repo = tmp_path / name
    repo.mkdir()
    write(repo, {"calc/__init__.py": "", "calc/core.py": SOURCE, "tests/test_mul.py": OLD_TESTS,
                 **(extra or {})})
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    write(repo, {"calc/core.py": FIXED})
    gold = git(repo, "diff")
    git(repo, "checkout", "-q", ".")
    write(repo, {"tests/test_add.py": tests})
    git(repo, "add", "tests/test_add.py")
    test_patch = git(repo, "diff", "--cached")
    git(repo, "reset", "-q", "--hard")
    return {"repo": f"example/{name}", "instance_id": f"example__{name}-1", "base_commit": base,
            "problem_statement": "add() subtracts", "patch": gold, "test_patch": test_patch,
            "FAIL_TO_PASS": f2p, "PASS_TO_PASS": p2p, "repo_path": str(repo)}


def test_pytest_style_instance_gold_1_empty_0_on_the_local_backend(tmp_path):
    inst = make_instance(tmp_path)
    gold, empty = grade_patch(inst, inst["patch"]), grade_patch(inst, "")
    assert gold.status == EpisodeStatus.OK and gold.reward == 1.0, gold.details
    assert "pytest" in gold.details["runner"]
    assert empty.reward == 0.0 and empty.status == EpisodeStatus.OK
    assert set(empty.details["FAIL_TO_PASS"].values()) == {"failed"}
    assert set(empty.details["PASS_TO_PASS"].values()) == {"passed"}


def test_the_local_sandbox_python_without_pytest_gets_the_provided_one(tmp_path):
    """The sandbox's python here is the system python3, which has no pytest: the grader's
    read-only copy is what runs the tests (the failure this issue reported)."""
    from kat_jax.envs.local_sandbox import probe_isolation
    iso = probe_isolation()
    has = subprocess.run([iso.python, "-c", "import pytest"], capture_output=True).returncode == 0
    inst = make_instance(tmp_path)
    gold = grade_patch(inst, inst["patch"])
    expected = "pytest (sandbox python)" if has else "pytest (provided by kat_jax)"
    assert gold.details["runner"] == expected and gold.reward == 1.0


def test_missing_test_ids_are_reported_not_found(tmp_path):
    missing = ["tests/test_add.py::test_nope", "tests/test_gone.py::test_x",
               "tests/test_add.py::test_param[9-9]"]
    inst = make_instance(tmp_path, f2p=F2P + missing)
    gold = grade_patch(inst, inst["patch"])
    assert gold.status == EpisodeStatus.OK and gold.reward == 0.0
    assert gold.details["not_found"] == missing
    assert all(gold.details["FAIL_TO_PASS"][t] == "passed" for t in F2P)


def test_a_runner_that_cannot_run_is_env_error_not_reward_0(tmp_path):
    inst = {**make_instance(tmp_path), "python": "/nonexistent/python3"}
    res = grade_patch(inst, inst["patch"])
    assert res.status == EpisodeStatus.ENV_ERROR and res.masked
    assert "could not run" in res.details["error"]


def test_builtin_collector_runs_plain_functions_and_classes(tmp_path):
    f2p = ["tests/test_add.py::test_add", "tests/test_add.py::TestAdd::test_base"]
    inst = make_instance(tmp_path, tests=PLAIN_TESTS, f2p=f2p)
    inst["test_env"] = {"KAT_TEST_RUNNER": "unittest"}
    gold, empty = grade_patch(inst, inst["patch"]), grade_patch(inst, "")
    assert gold.details["runner"].startswith("built-in collector") and gold.reward == 1.0, gold.details
    assert empty.reward == 0.0 and empty.details["PASS_TO_PASS"] == {t: "passed" for t in P2P}


def run_runner(cwd, ids, unittest=False, pytest_dir=""):
    env = {**os.environ, "KAT_TEST_RUNNER": "unittest" if unittest else "auto"}
    with open(os.path.join(cwd, "ids.json"), "w") as f:
        json.dump(ids, f)
    r = subprocess.run([sys.executable, TEST_RUNNER_SCRIPT, "ids.json", pytest_dir], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=120)
    line = r.stdout.rsplit("__KAT_TEST_RESULTS__", 1)[1].splitlines()[0]
    return json.loads(line)


# Tests both runners handle (TestCase last: the built-in collector's version adds a method to it).
PLAIN_OUTCOMES = """
import unittest

def test_pass():
    pass

def test_fail():
    assert 1 == 2

class TestSetupError:
    def setup_method(self, method):
        raise RuntimeError("setup broke")

    def test_x(self):
        pass

class TestCase(unittest.TestCase):
    def test_ok(self):
        self.assertEqual(1, 1)
"""
OUTCOME_TESTS = "import pytest\n" + PLAIN_OUTCOMES + """
@pytest.mark.skip(reason="no")
def test_skip():
    pass

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

@pytest.mark.parametrize("x", [1, 2])
def test_p(x):
    assert x == 1
"""


def test_runner_outcomes_with_pytest(tmp_path):
    write(tmp_path, {"t/test_o.py": OUTCOME_TESTS, "t/test_broken.py": "import nope\n"
                     "def test_a():\n    pass\n"})
    ids = ["t/test_o.py::test_pass", "t/test_o.py::test_fail", "t/test_o.py::test_skip",
           "t/test_o.py::test_xfail", "t/test_o.py::TestSetupError::test_x",
           "t/test_o.py::TestCase::test_ok", "t/test_o.py::test_p[1]", "t/test_o.py::test_p[2]",
           "t/test_o.py::test_p", "t/test_o.py::test_absent", "t/test_broken.py::test_a",
           "t/test_missing.py::test_a"]
    out = run_runner(tmp_path, ids)
    assert out["runner"] == "pytest (sandbox python)"
    assert out["results"] == {
        "t/test_o.py::test_pass": "passed", "t/test_o.py::test_fail": "failed",
        "t/test_o.py::test_skip": "skipped", "t/test_o.py::test_xfail": "xfailed",
        "t/test_o.py::TestSetupError::test_x": "error", "t/test_o.py::TestCase::test_ok": "passed",
        "t/test_o.py::test_p[1]": "passed", "t/test_o.py::test_p[2]": "failed",
        "t/test_o.py::test_p": "failed", "t/test_o.py::test_absent": "not_found",
        "t/test_broken.py::test_a": "error", "t/test_missing.py::test_a": "not_found"}


def test_runner_outcomes_with_the_builtin_collector(tmp_path):
    plain = PLAIN_OUTCOMES + """
    @unittest.skip("no")
    def test_skipped(self):
        pass

def test_needs_fixture(tmp_path):
    pass
"""
    write(tmp_path, {"t/test_o.py": plain, "t/test_broken.py": "import nope\n"})
    ids = ["t/test_o.py::test_pass", "t/test_o.py::test_fail", "t/test_o.py::TestSetupError::test_x",
           "t/test_o.py::TestCase::test_ok", "t/test_o.py::TestCase::test_skipped",
           "t/test_o.py::TestCase", "t/test_o.py::test_needs_fixture", "t/test_o.py::test_p[1]",
           "t/test_o.py::test_absent", "t/test_o.py::TestCase::test_absent",
           "t/test_broken.py::test_a", "t/test_missing.py::test_a"]
    out = run_runner(tmp_path, ids, unittest=True)
    assert out["runner"].startswith("built-in collector")
    assert out["results"] == {
        "t/test_o.py::test_pass": "passed", "t/test_o.py::test_fail": "failed",
        "t/test_o.py::TestSetupError::test_x": "error", "t/test_o.py::TestCase::test_ok": "passed",
        "t/test_o.py::TestCase::test_skipped": "skipped", "t/test_o.py::TestCase": "skipped",
        "t/test_o.py::test_needs_fixture": "error", "t/test_o.py::test_p[1]": "error",
        "t/test_o.py::test_absent": "not_found", "t/test_o.py::TestCase::test_absent": "not_found",
        "t/test_broken.py::test_a": "error", "t/test_missing.py::test_a": "not_found"}


SETUP_FILES = {"gen.py": "open('calc/_generated.py', 'w').write('SCALE = 1\\n')\n",
               "calc/__init__.py": "from calc._generated import SCALE  # noqa: F401\n"}


def test_instance_setup_runs_before_the_episode_and_is_not_part_of_the_diff(tmp_path):
    inst = make_instance(tmp_path, extra=SETUP_FILES)
    assert grade_patch(inst, inst["patch"]).status == EpisodeStatus.OK
    assert grade_patch(inst, inst["patch"]).reward == 0.0          # no setup: calc does not import
    inst["setup_cmds"] = ["python gen.py", "test -f calc/_generated.py"]
    assert grade_patch(inst, inst["patch"]).reward == 1.0
    assert grade_patch(inst, "").reward == 0.0
    env = make_env("swe")
    env.reset(task_from_instance(inst))
    assert env.sb.exec("cat calc/_generated.py").output == "SCALE = 1\n"
    assert env.sb.diff() == ""                     # generated files belong to the start
    env.close()


def test_a_failing_setup_is_env_error(tmp_path):
    inst = {**make_instance(tmp_path), "setup_cmds": ["echo preparing", "exit 3"]}
    res = grade_patch(inst, inst["patch"])
    assert res.status == EpisodeStatus.ENV_ERROR and "exit 3" in res.details["error"]
    env = make_env("swe")
    env.reset(task_from_instance(inst))
    assert env.status == EpisodeStatus.ENV_ERROR and env.evaluate().masked
    env.close()


def test_swe_bench_spec_fields_and_specs_files(tmp_path):
    inst = make_instance(tmp_path, extra=SETUP_FILES)
    lines = tmp_path / "instances.jsonl"
    lines.write_text(json.dumps({**inst, "version": "1.0", "repo_path": "calc"}) + "\n")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"example/calc": {"1.0": {"pre_install": ["python gen.py"]},
                                                  "*": {"setup_cmds": "false"}}}))
    [got] = load_instances(str(lines), repos_dir=str(tmp_path), specs=str(specs))
    assert got["repo_path"] == str(tmp_path / "calc") and got["pre_install"] == ["python gen.py"]
    assert grade_patch(got, got["patch"]).reward == 1.0
    # Without repo_path the checkout is found under the repositories directory by its repo name.
    lines.write_text(json.dumps({**inst, "version": "2.0", "repo_path": None}) + "\n")
    [other] = load_instances(str(lines), repos_dir=str(tmp_path), specs=str(specs))
    assert other["repo_path"] == str(tmp_path / "calc") and other["setup_cmds"] == "false"
    assert grade_patch(other, other["patch"]).status == EpisodeStatus.ENV_ERROR
    specs.write_text(json.dumps({"example/calc": {"1.0": {"instal": "pip install -e ."}}}))
    with pytest.raises(JsonlError, match=r"specs.json.*unknown keys \['instal'\]"):
        load_specs(str(specs))
    lines.write_text(json.dumps({**inst, "setup_cmds": [1]}) + "\n")
    with pytest.raises(JsonlError, match=r"instances.jsonl:1.*setup_cmds"):
        load_instances(str(lines))


def test_warm_pool_hands_out_set_up_sandboxes(tmp_path):
    inst = make_instance(tmp_path, extra=SETUP_FILES)
    inst["setup_cmds"] = ["python gen.py"]
    try:
        pool = sandbox_pool(inst, "local", 1)
        sb = pool.acquire(timeout=60)              # made ahead of time by the pool
        assert sb.exec("cat calc/_generated.py").ok and sb.diff() == ""
        sb.close()
        env = make_env("swe", pool_size=1)
        env.reset(task_from_instance(inst))
        assert env.sb.exec("test -f calc/_generated.py").ok
        assert env.evaluate().reward == 0.0
        assert sandbox_pool(inst, "local", 1) is pool
        env.close()
    finally:
        close_pools()


def _engine_image():
    """The docker sandbox image on a running engine, or a skip reason."""
    try:
        import docker
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001
        return None, f"no docker engine: {e}"
    from kat_jax.envs.docker_sandbox import default_image
    try:
        client.images.get(default_image())
    except Exception:  # noqa: BLE001
        return None, f"no {default_image()} image (bash scripts/docker_engine.sh builds it)"
    return client, ""


def test_pytest_style_instance_on_the_docker_backend(tmp_path):
    client, why = _engine_image()
    if client is None:
        pytest.skip(why)
    inst = make_instance(tmp_path, extra=SETUP_FILES)
    inst["setup_cmds"] = ["python gen.py"]
    kwargs = {"memory": "512m", "pids_limit": 128}
    gold = grade_patch(inst, inst["patch"], backend="docker", **kwargs)
    empty = grade_patch(inst, "", backend="docker", **kwargs)
    assert gold.reward == 1.0 and "pytest" in gold.details["runner"], gold.details
    assert empty.reward == 0.0 and empty.status == EpisodeStatus.OK
    missing = grade_patch({**inst, "FAIL_TO_PASS": ["tests/test_add.py::test_nope"]}, inst["patch"],
                          backend="docker", **kwargs)
    assert missing.details["not_found"] == ["tests/test_add.py::test_nope"]
    plain = make_instance(tmp_path, tests=PLAIN_TESTS, name="plain",
                          f2p=["tests/test_add.py::test_add", "tests/test_add.py::TestAdd::test_base"])
    plain["test_env"] = {"KAT_TEST_RUNNER": "unittest"}
    res = grade_patch(plain, plain["patch"], backend="docker", **kwargs)
    assert res.reward == 1.0 and res.details["runner"].startswith("built-in"), res.details


def test_env_check_instances_from_a_repositories_directory(tmp_path, capsys):
    from kat_jax.cli import main

    repos = tmp_path / "repos"
    repos.mkdir()
    good = make_instance(repos, extra=SETUP_FILES, name="calc")
    empty_gold = {**make_instance(repos, name="nogold"), "patch": ""}
    lines = tmp_path / "swe.jsonl"
    rows = [{**good, "repo_path": None, "version": "1"},            # found as repos/calc by `repo`
            {**empty_gold, "repo_path": "nogold"}]                 # relative to --repos
    lines.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"example/calc": {"1": {"setup_cmds": ["python gen.py"]}}}))
    argv = ["env", "check", "--env", "swe", "--instances-from", str(lines), "--repos", str(repos)]
    assert main([*argv, "--specs", str(specs), "--sandbox-pool", "1"]) == 1
    out = capsys.readouterr().out
    assert "example__calc-1" in out and "gold answer empty" in out and "2 tasks, 1 broken" in out
    close_pools()
    # Without the specs file, the calc instance's setup is missing: its gold patch fails.
    assert main(argv) == 1
    assert "2 tasks, 2 broken" in capsys.readouterr().out
    assert main(["env", "check", "--env", "maths", "--instances-from", str(lines)]) != 0
    assert "--instances-from applies to --env swe, not maths" in capsys.readouterr().err
    assert main(["env", "check", "--env", "swe", "--repos", str(repos)]) != 0
    assert "--repos needs --instances-from" in capsys.readouterr().err
    lines.write_text(json.dumps({**good, "repo": "example/absent", "repo_path": None}) + "\n")
    assert main(argv) != 0
    assert "swe.jsonl:1: no repo_path and no checkout of 'example/absent'" in capsys.readouterr().err


def test_rollout_sandbox_pool_flag_reaches_the_swe_env():
    import argparse

    from kat_jax.commands.rollout import swe_env_kwargs

    args = argparse.Namespace(env="swe", backend="local", sandbox_image=None, sandbox_pool=3)
    kwargs = swe_env_kwargs(args)
    assert kwargs["pool_size"] == 3 and make_env("swe", **kwargs).pool_size == 3
    with pytest.raises(ValueError, match="--sandbox-pool applies to --env swe"):
        swe_env_kwargs(argparse.Namespace(env="maths", backend="local", sandbox_image=None,
                                          sandbox_pool=2))
    with pytest.raises(ValueError, match="--sandbox-pool must be >= 0"):
        swe_env_kwargs(argparse.Namespace(**{**vars(args), "sandbox_pool": -1}))

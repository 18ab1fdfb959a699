"""SWE environment end to end on the bundled instances (local backend)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from kat_jax.cli import main as cli_main
from kat_jax.envs import EpisodeStatus, make_env
from kat_jax.envs.local_sandbox import probe_isolation
from kat_jax.envs.swe import grade_patch, load_instances, task_from_instance

INSTANCES = load_instances()


def call(name, cid="1", **args):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def gold_files(inst, tmp_path):
    """{path: (old text, new text)} of the files the gold patch changes."""
    work = tmp_path / "gold"
    shutil.copytree(inst["repo_path"], work)
    patch = tmp_path / "gold.patch"
    patch.write_text(inst["patch"])
    subprocess.run(["git", "apply", str(patch)], cwd=work, check=True)
    files = [ln[6:] for ln in inst["patch"].splitlines() if ln.startswith("+++ b/")]
    return {f: (open(os.path.join(inst["repo_path"], f)).read(), (work / f).read_text()) for f in files}


def test_bundled_instances_are_well_formed():
    assert 4 <= len(INSTANCES) <= 6
    for inst in INSTANCES:
        assert inst["FAIL_TO_PASS"] and inst["PASS_TO_PASS"] and os.path.isdir(inst["repo_path"])
        hidden = [ln[6:] for ln in inst["test_patch"].splitlines() if ln.startswith("+++ b/")]
        assert hidden and not any(os.path.exists(os.path.join(inst["repo_path"], h)) for h in hidden)


@pytest.mark.parametrize("inst", INSTANCES, ids=lambda i: i["instance_id"])
def test_gold_patch_resolves_and_empty_patch_does_not(inst):
    gold, empty = grade_patch(inst, inst["patch"]), grade_patch(inst, "")
    assert gold.reward == 1.0 and gold.passed and gold.status == EpisodeStatus.OK
    assert empty.reward == 0.0 and not empty.passed and empty.status == EpisodeStatus.OK
    assert all(v != "passed" for v in empty.details["FAIL_TO_PASS"].values())
    assert all(v == "passed" for v in empty.details["PASS_TO_PASS"].values())


def test_scripted_agent_applying_the_gold_patch_with_the_editor_scores_1(tmp_path):
    inst = INSTANCES[0]
    env = make_env("swe")
    messages, tools = env.reset(task_from_instance(inst))
    assert [t["function"]["name"] for t in tools] == ["bash", "str_replace_editor", "submit"]
    assert messages[-1]["content"] == inst["problem_statement"]
    edits = enumerate(gold_files(inst, tmp_path).items())
    calls = [call("str_replace_editor", str(i), command="str_replace", path=path, old_str=old,
                  new_str=new) for i, (path, (old, new)) in edits]
    results = env.step(calls + [call("submit", "s")])
    assert all("has been edited" in r["content"] for r in results[:-1]) and env.done
    res = env.evaluate()
    assert res.reward == 1.0 and res.details["submitted"]
    env.close()


def test_no_op_agent_scores_0():
    env = make_env("swe")
    env.reset(task_from_instance(INSTANCES[2]))
    env.step([call("bash", command="ls -R")])
    res = env.evaluate()
    assert res.reward == 0.0 and res.status == EpisodeStatus.OK and res.details["diff"] == ""
    env.close()


def test_hidden_tests_are_not_visible_during_the_episode():
    inst = INSTANCES[0]
    env = make_env("swe")
    messages, _ = env.reset(task_from_instance(inst))
    hidden = inst["FAIL_TO_PASS"][0].split("::")[0]
    ls, cat, grep = env.step([call("bash", "1", command="ls -a tests"),
                              call("bash", "2", command=f"cat {hidden}"),
                              call("bash", "3", command="grep -rn TestMedianEven . ; true")])
    assert os.path.basename(hidden) not in ls["content"] and "No such file" in cat["content"]
    assert "TestMedianEven" not in grep["content"]
    assert "TestMedianEven" not in json.dumps(messages)
    env.close()


def test_editor_commands_and_undo():
    env = make_env("swe")
    env.reset(task_from_instance(INSTANCES[1]))
    wd = env.sb.workdir
    ed = lambda cid, **a: env.step([call("str_replace_editor", cid, **a)])[0]["content"]
    assert "slugger/text.py" in ed("1", command="view", path=wd)
    view = ed("2", command="view", path="slugger/text.py", view_range=[1, 2])
    assert "     1\t\"\"\"URL slugs.\"\"\"" in view
    assert "created" in ed("3", command="create", path="notes/todo.txt", file_text="a\nb\n")
    assert ed("4", command="create", path="notes/todo.txt", file_text="x").startswith("Error")
    assert "edited" in ed("5", command="insert", path="notes/todo.txt", insert_line=1, new_str="mid")
    assert env.sb.read_file("notes/todo.txt") == b"a\nmid\nb\n"
    assert "edited" in ed("6", command="str_replace", path="notes/todo.txt", old_str="mid",
                          new_str="MID")
    assert ed("7", command="str_replace", path="notes/todo.txt", old_str="zzz").startswith("Error")
    assert "undone" in ed("8", command="undo_edit", path="notes/todo.txt")
    assert env.sb.read_file("notes/todo.txt") == b"a\nmid\nb\n"
    assert "undone" in ed("9", command="undo_edit", path="notes/todo.txt")
    assert "removed" in ed("10", command="undo_edit", path="notes/todo.txt")
    assert not os.path.exists(os.path.join(wd, "notes/todo.txt"))
    assert ed("11", command="undo_edit", path="notes/todo.txt").startswith("Error")
    assert ed("12", command="view", path="/etc/passwd").startswith("Error")
    assert ed("13", command="frobnicate", path="x").startswith("Error")
    assert env.evaluate().details["diff"] == ""
    env.close()


def test_bash_keeps_cwd_between_calls_and_enforces_timeouts():
    env = make_env("swe", bash_timeout=2)
    env.reset(task_from_instance(INSTANCES[3]))
    b = lambda cmd, **kw: env.step([call("bash", command=cmd, **kw)])[0]["content"]
    b("cd romanum")
    assert b("pwd").strip().endswith("/work/romanum")
    assert "convert.py" in b("ls")
    assert "[exit code 3]" in b("exit 3")
    assert b("pwd").strip().endswith("/work/romanum")
    assert "timed out" in b("sleep 30", timeout=1)
    assert "ok" in b("echo ok")
    env.close()


def test_concurrent_episodes_in_a_thread_pool():
    def episode(inst):
        with make_env("swe") as env:
            env.reset(task_from_instance(inst))
            env.step([call("bash", "a", command="python -c 'print(6*7)'"),
                      call("bash", "b", command="ls")])
            return env.evaluate().reward

    with ThreadPoolExecutor(4) as ex:
        assert list(ex.map(episode, INSTANCES)) == [0.0] * len(INSTANCES)


def test_pytest_runner_path(tmp_path):
    iso = dataclasses.replace(probe_isolation(), drop_uid=False, python=sys.executable)
    inst = INSTANCES[4]
    gold = grade_patch(inst, inst["patch"], isolation=iso)
    assert gold.reward == 1.0, gold.details


def test_broken_repository_is_env_error_and_masked(tmp_path):
    inst = {**INSTANCES[0], "repo_path": str(tmp_path / "missing")}
    env = make_env("swe")
    env.reset(task_from_instance(inst))
    [msg] = env.step([call("bash", command="ls")])
    res = env.evaluate()
    assert msg["content"].startswith("Error") and res.masked and env.status == EpisodeStatus.ENV_ERROR
    changed = tmp_path / "changed"
    shutil.copytree(INSTANCES[0]["repo_path"], changed)
    (changed / "extra.py").write_text("")
    assert grade_patch({**INSTANCES[0], "repo_path": str(changed)}, "").masked   # base_commit mismatch


def test_env_check_passes_on_bundled_tasks(capsys):
    assert cli_main(["env", "check", "--env", "calculator"]) == 0
    assert "0 broken" in capsys.readouterr().out

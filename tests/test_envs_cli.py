"""`kat-jax env check`: the bundled calculator and maths tasks pass; a broken task makes it exit 1."""

import json

import pytest

from kat_jax.cli import main


def _table(out: str) -> list[str]:
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["task", "gold", "empty"], out
    return lines


@pytest.mark.parametrize("env,n_tasks", [("calculator", 100), ("maths", 120)])
def test_bundled_tasks_pass(env, n_tasks, capsys):
    assert main(["env", "check", "--env", env]) == 0
    lines = _table(capsys.readouterr().out)
    assert lines[-1] == f"{n_tasks} tasks, 0 broken"
    rows = lines[1:-1]
    assert len(rows) == n_tasks
    assert all(r.split()[1:5] == ["1.0", "0.0", "ok", "yes"] for r in rows), rows[:3]


def _write_tasks(path, answers):
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": f"Question {i}?", "answer": a})
                            + "\n" for i, a in enumerate(answers)))
    return str(path)


@pytest.mark.parametrize("env", ["calculator", "maths"])
def test_custom_tasks_file(env, tmp_path, capsys):
    tasks = _write_tasks(tmp_path / "tasks.jsonl", ["42", "5/6", "-3.5"])
    assert main(["env", "check", "--env", env, "--tasks", tasks]) == 0
    lines = _table(capsys.readouterr().out)
    assert [r.split()[0] for r in lines[1:-1]] == ["t0", "t1", "t2"]
    assert lines[-1] == "3 tasks, 0 broken"


@pytest.mark.parametrize("env", ["calculator", "maths"])
def test_broken_task_exits_1(env, tmp_path, capsys):
    # An answer with an unbalanced brace: its own gold answer, \boxed{\frac{1}{2}, cannot be read back.
    tasks = _write_tasks(tmp_path / "tasks.jsonl", ["7", "\\frac{1}{2", "9"])
    assert main(["env", "check", "--env", env, "--tasks", tasks]) == 1
    lines = _table(capsys.readouterr().out)
    assert lines[-1] == "3 tasks, 1 broken"
    rows = {r.split()[0]: r.split() for r in lines[1:-1]}
    assert rows["t1"][1:5] == ["0.0", "0.0", "ok", "NO"]
    assert rows["t0"][4] == rows["t2"][4] == "yes"

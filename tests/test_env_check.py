"""`env check` says why a task is broken: an empty gold answer (which would reward a policy for
answering nothing), gold and empty answers that score the same, an env_error with its message."""

import json

import pytest

from kat_jax.cli import main
from kat_jax.envs import ENVS, Env, EpisodeStatus, EvalResult, Task, register_env
from kat_jax.envs.check import check, format_table


def _write_tasks(path, answers):
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": f"What is {i} + 0?",
                                        "answer": a}) + "\n" for i, a in enumerate(answers)))
    return str(path)


@pytest.mark.parametrize("env", ["maths", "calculator"])
def test_an_empty_gold_answer_is_broken_with_its_reason(env, tmp_path, capsys):
    tasks = _write_tasks(tmp_path / "tasks.jsonl", ["0", "", "  ", "$ $", "3"])
    rows = {r["id"]: r for r in check(env, tasks)}
    for blank in ("t1", "t2", "t3"):
        # \boxed{} matches the empty gold answer: the rewards alone (1 and 0) look fine
        assert rows[blank]["gold"] == 1.0 and rows[blank]["empty"] == 0.0
        assert not rows[blank]["ok"] and rows[blank]["reason"] == "gold answer empty"
    assert rows["t0"]["ok"] and rows["t0"]["reason"] == "" and rows["t4"]["ok"]

    assert main(["env", "check", "--env", env, "--tasks", tasks]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "5 tasks, 3 broken"
    by_id = {line.split()[0]: line for line in lines[1:-1]}
    assert by_id["t1"].endswith("  gold answer empty") and "NO" in by_id["t1"].split()
    assert by_id["t0"].split()[4] == "yes" and not by_id["t0"].endswith("empty")


def test_normal_gold_answers_pass_through_the_command(tmp_path, capsys):
    tasks = _write_tasks(tmp_path / "tasks.jsonl", ["0", "1", "\\frac{4}{2}"])
    assert main(["env", "check", "--env", "maths", "--tasks", tasks]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3 tasks, 0 broken"


class HalfEnv(Env):
    """A toy environment that grades every answer 0.5 (gold and empty alike), or fails to grade
    when the task says so."""

    name = "half"

    def reset(self, task):
        super().__init__()
        self.task = task
        return list(task.messages), []

    def evaluate(self, messages=()):
        if self.task.metadata.get("broken"):
            return EvalResult(0.0, False, EpisodeStatus.ENV_ERROR, {"error": "grader crashed"})
        return EvalResult(0.5, False)

    @classmethod
    def check_task(cls, task, **options):
        env = cls()
        env.reset(task)
        return env.evaluate(), env.evaluate()


@pytest.fixture
def half_env():
    register_env("half", HalfEnv, load_tasks=lambda path: [
        Task("same", [{"role": "user", "content": "?"}]),
        Task("crash", [{"role": "user", "content": "?"}], {"broken": True})],
        check_task=HalfEnv.check_task)
    yield "half"
    ENVS.pop("half")


def test_gold_and_empty_scoring_the_same_is_broken_and_env_errors_give_their_message(half_env):
    rows = {r["id"]: r for r in check(half_env)}
    assert not rows["same"]["ok"]
    assert rows["same"]["reason"] == "gold and empty score the same (0.5)"
    assert not rows["crash"]["ok"] and rows["crash"]["reason"] == "env_error: grader crashed"
    table = format_table(list(rows.values())).splitlines()
    assert table[0].split()[-1] == "reason"
    assert table[1].endswith("gold and empty score the same (0.5)")
    assert table[2].endswith("env_error: grader crashed")
    assert table[-1] == "2 tasks, 2 broken"


@pytest.mark.parametrize("gold,empty,reason", [
    (0.0, 1.0, "gold reward 0, not 1"),
    (1.0, 0.25, "empty reward 0.25, not 0"),
    (1.0, 0.0, ""),
])
def test_rewards_off_their_marks_are_named(gold, empty, reason):
    from kat_jax.envs.check import broken_reason

    assert broken_reason(EvalResult(gold, gold == 1.0), EvalResult(empty, False)) == reason

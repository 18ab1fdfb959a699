"""`kat-jax eval`: pass@k is the unbiased estimator of its definition, the metrics of hand-made
records, the train/test split of the generated environments, one end-to-end run, the errors."""

import json
import math

import pytest

from kat_jax.cli import main
from kat_jax.envs import Task, load_env_tasks
from kat_jax.envs.registry import task_split
from kat_jax.rollout.evaluation import (
    calling_turns,
    evaluate_records,
    markdown_path,
    pass_at_k,
    reported_ks,
)


def reference_pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k), with exact integers (math.comb(m, k) = 0 for m < k)."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (4, 0, 2), (4, 4, 4), (4, 1, 1),
                                   (4, 1, 4), (5, 2, 2), (8, 3, 4), (10, 7, 5), (16, 1, 8),
                                   (200, 13, 100), (200, 0, 200), (200, 200, 1)])
def test_pass_at_k_equals_the_binomial_definition(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(reference_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_1_is_the_success_rate_and_pass_at_n_is_any_success():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 0, 10) == 0.0


@pytest.mark.parametrize("n,c,k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_reported_ks_are_the_powers_of_two_up_to_k():
    assert reported_ks(1) == [1]
    assert reported_ks(6) == [1, 2, 4]
    assert reported_ks(8) == [1, 2, 4, 8]


def _record(task, passed, turns=1, calls=0, status="ok", tags=()):
    return {"task_id": task, "passed": passed, "reward": float(passed), "turns": turns,
            "tool_calls": calls, "status": status, "tags": list(tags)}


# Trajectory tags: two calling turns (each one run of tool_result tokens), then a final answer.
TWO_CALLING_TURNS = [None, None, "tool_call", None, "tool_result", "tool_result", None, None,
                     "tool_result", None]


def test_evaluate_records_counts_per_task_and_averages():
    records = [
        _record("a", True, turns=3, calls=3, tags=TWO_CALLING_TURNS),
        _record("a", False, turns=1, status="max_turns"),
        _record("b", False, turns=2, calls=1, tags=[None, "tool_result", None]),
        _record("b", False, turns=2),
        _record("c", True), _record("c", True),
    ]
    out = evaluate_records(records, samples_per_task=2)
    assert out["tasks"] == [{"id": "a", "n": 2, "correct": 1}, {"id": "b", "n": 2, "correct": 0},
                            {"id": "c", "n": 2, "correct": 2}]
    assert out["n_tasks"] == 3 and out["samples_per_task"] == 2
    assert out["pass@1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert out["pass@2"] == pytest.approx((1 + 0 + 1) / 3)
    assert "pass@4" not in out
    assert out["mean_turns"] == pytest.approx(10 / 6)
    assert out["mean_tool_calls"] == pytest.approx(4 / 6)
    assert out["mean_reward"] == pytest.approx(3 / 6)
    assert out["parallel_tool_calls_per_turn"] == pytest.approx(4 / 3)  # 4 calls, 3 calling turns
    assert out["statuses"] == {"ok": 5, "max_turns": 1}


def test_calling_turns_are_runs_of_tool_results_and_no_calls_is_null():
    assert calling_turns({"tags": TWO_CALLING_TURNS}) == 2
    assert calling_turns({"tags": [None, "tool_call", None]}) == 0
    out = evaluate_records([_record("a", False)], samples_per_task=1)
    assert out["parallel_tool_calls_per_turn"] is None


def test_evaluate_records_wants_k_records_per_task():
    with pytest.raises(ValueError, match="task 'a': 1 records, expected 2"):
        evaluate_records([_record("a", True), _record("b", True), _record("b", False)], 2)


@pytest.mark.parametrize("env", ["calculator", "maths"])
def test_split_is_deterministic_disjoint_and_covers_the_pool(env):
    train, test = load_env_tasks(env, split="train"), load_env_tasks(env, split="test")
    assert [t.id for t in load_env_tasks(env, split="test")] == [t.id for t in test]
    ids_train, ids_test = {t.id for t in train}, {t.id for t in test}
    assert not ids_train & ids_test
    questions = lambda ts: {json.dumps(t.messages) for t in ts}
    assert not questions(train) & questions(test)  # the same question never lands in both
    assert 0.1 < len(test) / (len(train) + len(test)) < 0.3
    if env == "maths":  # no pool of its own: the split partitions the default tasks
        assert ids_train | ids_test == {t.id for t in load_env_tasks(env)}
    else:  # a larger generated pool, the 100 default tasks among them
        assert {t.id for t in load_env_tasks(env)} < ids_train | ids_test
        assert len(test) >= 64


def test_split_of_a_task_depends_on_its_messages_only():
    a = Task(id="x", messages=[{"role": "user", "content": "What is 2 + 2?"}])
    b = Task(id="y", messages=[{"role": "user", "content": "What is 2 + 2?"}])
    assert task_split(a, 0.2) == task_split(b, 0.2)
    assert task_split(a, 1.0) == "test" and task_split(a, 0.0) == "train"


def test_split_of_a_tasks_file(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps({"id": f"t{i}", "question": f"Q{i}?", "answer": "1"}) + "\n"
                            for i in range(50)))
    every = [t.id for t in load_env_tasks("calculator", str(path))]
    train = [t.id for t in load_env_tasks("calculator", str(path), split="train")]
    test = [t.id for t in load_env_tasks("calculator", str(path), split="test")]
    assert sorted(train + test) == sorted(every) and not set(train) & set(test)
    assert [i for i in every if i in test] == test  # file order kept


def test_eval_writes_json_and_markdown_end_to_end(tmp_path, capsys):
    out = tmp_path / "E.json"
    assert main(["eval", "--checkpoint", "preset:tiny", "--env", "calculator",
                 "--samples-per-task", "2", "--max-tasks", "3", "--max-new-tokens", "8",
                 "--max-turns", "1", "--concurrency", "6", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    assert result["n_tasks"] == summary["n_tasks"] == 3
    assert result["samples_per_task"] == 2 and result["split"] == "test"
    assert {"pass@1", "pass@2"} <= set(result) and "pass@4" not in result
    assert 0 <= result["pass@1"] <= result["pass@2"] <= 1
    test_ids = [t.id for t in load_env_tasks("calculator", split="test")[:3]]
    assert [t["id"] for t in result["tasks"]] == test_ids
    assert all(t["n"] == 2 and 0 <= t["correct"] <= 2 for t in result["tasks"])
    assert sum(result["statuses"].values()) == 6
    assert "tasks" not in summary and summary["output"] == str(out)
    md = (tmp_path / "E.md").read_text()
    assert md.startswith("| metric | value |") and "| pass@2 |" in md and test_ids[0] in md


@pytest.mark.parametrize("argv,message", [
    (["--env", "nope"], "--env: unknown environment 'nope'"),
    (["--env", "calculator", "--tasks", "{tmp}/missing.jsonl"], "--tasks: .*missing.jsonl"),
    (["--env", "calculator", "--samples-per-task", "0"], "--samples-per-task must be >= 1"),
    (["--env", "calculator", "--split", "dev"], "--split must be train, test or all"),
    (["--env", "swe", "--split", "test"], "--split test: environment 'swe' has no train/test"),
    (["--env", "calculator", "--max-tasks", "0"], "--max-tasks must be >= 1"),
])
def test_errors_name_the_flag(argv, message, tmp_path, capsys):
    import re

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "E.json"
    assert main(["eval", "--checkpoint", "preset:tiny", "--output", str(out), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kat-jax: error: ") and re.search(message, err), err
    assert not out.exists()


def test_markdown_sits_beside_the_json():
    assert markdown_path("runs/E.json") == "runs/E.md"
    assert markdown_path("runs/eval.out") == "runs/eval.out.md"

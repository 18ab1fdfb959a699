"""The rollout-record schema (kat_jax.data.records): what the rollout writer builds is what prune and
the training sources read back; a bad value of any field is an error naming file:line and the field."""

import json
import math

import numpy as np
import pytest

from kat_jax.data.records import (
    FOR_PRUNING,
    FOR_TRAINING,
    PER_TOKEN_FLOATS,
    per_token_array,
    read_rollouts,
    rollout_record,
    tag_array,
    validate_rollout,
    write_rollouts,
)
from kat_jax.data.sources import JsonlGroups
from kat_jax.trees.trajectory import TAGS

GOOD = {"id": "t#0", "group": "t", "tokens": [5, 6, 7, 8], "logprobs": [None, None, -0.5, -1.0],
        "old_logprobs": [None, None, -0.4, -1.2], "ref_logprobs": [None, None, -0.7, -0.9],
        "entropies": [None, None, 0.3, 1.5], "tags": [None, None, "tool_call", None],
        "reward": 1.0, "status": "ok", "teacher": False, "task_id": "t", "passed": True,
        "turns": 1, "tool_calls": 0}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_written_records_read_back_unchanged_by_prune_and_training(tmp_path):
    rec = rollout_record("t#0", "t", np.array([5, 6, 7, 8]), [None, None, np.float32(-0.5), -1.0],
                         [None, None, 0.3, 1.5], [None, None, "tool_call", None], 1, "ok",
                         task_id="t", passed=True, turns=1, tool_calls=0,
                         old_logprobs=GOOD["old_logprobs"], ref_logprobs=GOOD["ref_logprobs"])
    assert rec == {k: v for k, v in GOOD.items() if k != "teacher"}  # plain JSON types
    path = str(tmp_path / "r.jsonl")
    write_rollouts(path, [rec, {**rec, "id": "t#1"}])
    rows = read_rollouts(path)
    assert [obj for obj, _ in rows] == [rec, {**rec, "id": "t#1"}]
    assert [where for _, where in rows] == [f"{path}:1", f"{path}:2"]
    assert read_rollouts(path, FOR_PRUNING, min_tokens=1)[0][0] == rec
    src = JsonlGroups([path], "rollouts")
    assert len(src) == 1 and [o["id"] for o, _ in src[0]] == ["t#0", "t#1"]
    np.testing.assert_array_equal(per_token_array(rec, "ref_logprobs"),
                                  np.float32([0, 0, -0.7, -0.9]))
    assert per_token_array({"tokens": [1]}, "old_logprobs") is None
    np.testing.assert_array_equal(tag_array(rec), [0, 0, TAGS["tool_call"], 0])


def test_the_writer_refuses_a_record_the_readers_would_reject():
    with pytest.raises(ValueError, match=r"rollout record: trajectory 'x': 'logprobs': log-prob "
                                         r"inf at index 1"):
        rollout_record("x", "g", [1, 2], [None, math.inf], [None, 0.1], [None, None], 0.0)


BAD = {  # field: (bad value, words of the error)
    "tokens": ([1, -2, 3, 4], "'tokens' must be a list of at least 2 ids >= 0"),
    "logprobs": ([None, None, 0.5, -1.0], "'logprobs': log-prob 0.5 at index 2"),
    "old_logprobs": ([None, None, -0.5, "x"], "'old_logprobs': old-policy log-prob 'x' at index 3"),
    "ref_logprobs": ([None, None, -0.5], "'ref_logprobs' must be a list of 4 values"),
    "entropies": ([None, -1.0, 0.5, 0.5], "'entropies': entropy -1.0 at index 1"),
    "tags": ([None, None, "oops", None], "'tags': unknown tag 'oops' at index 2"),
    "reward": ("high", "'reward' must be a finite number"),
    "advantage": (True, "'advantage' must be a finite number"),
    "status": (3, "'status' must be a string"),
    "teacher": ("yes", "'teacher' must be true or false"),
    "passed": (1, "'passed' must be true or false"),
    "turns": (-1, "'turns' must be an integer >= 0"),
    "tool_calls": (1.5, "'tool_calls' must be an integer >= 0"),
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_bad_value_of_each_field_names_file_line_and_field(field, tmp_path):
    value, words = BAD[field]
    path = _write(tmp_path / "r.jsonl", [GOOD, {**GOOD, "id": "t#1", field: value}])
    with pytest.raises(ValueError) as e:
        read_rollouts(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: trajectory 't#1': ") and words in msg, msg
    with pytest.raises(ValueError, match=f"r.jsonl:2: trajectory 't#1': .*'{field}'"):
        JsonlGroups([path], "rollouts")  # the training sources read the same schema


@pytest.mark.parametrize("key", sorted(PER_TOKEN_FLOATS))
@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_per_token_values_must_be_finite(key, bad, tmp_path):
    line = json.dumps({**GOOD, key: "X"}).replace('"X"', f"[null, null, 0.0, {bad}]")
    path = _write(tmp_path / "r.jsonl", [line])
    with pytest.raises(ValueError, match=rf"r.jsonl:1: trajectory 't#0': '{key}': .* at index 3 "
                                         "must be a finite number"):
        read_rollouts(path)


def test_required_fields_depend_on_the_reader(tmp_path):
    bare = {"id": 0, "tokens": [1, 2]}
    validate_rollout(bare, "f:1", require=(), min_tokens=1)
    with pytest.raises(ValueError, match=r"f:1: trajectory 0: 'logprobs' is missing"):
        validate_rollout(bare, "f:1", FOR_TRAINING)
    with pytest.raises(ValueError, match=r"f:1: trajectory 0: a rollout needs 'reward' or "
                                         "'advantage'"):
        validate_rollout({**bare, "logprobs": [None, -1]}, "f:1", FOR_TRAINING)
    validate_rollout({**bare, "logprobs": [None, -1], "status": "env_error"}, "f:1", FOR_TRAINING)
    with pytest.raises(ValueError, match=r"f:1: trajectory 0: 'entropies' is missing"):
        validate_rollout(bare, "f:1", FOR_PRUNING)
    with pytest.raises(ValueError, match=r"f:1: 'id' is missing"):
        validate_rollout({"tokens": [1]}, "f:1", FOR_PRUNING, min_tokens=1)
    with pytest.raises(ValueError, match=r"f:1: trajectory 0: 'tokens' must be a list of at least 2"):
        validate_rollout({**bare, "tokens": [1]}, "f:1", ())
    path = _write(tmp_path / "e.jsonl", ["", "{oops"])
    with pytest.raises(ValueError, match=r"e.jsonl:2: not valid JSON"):
        read_rollouts(path)
    with pytest.raises(ValueError, match="no rollouts"):
        read_rollouts(_write(tmp_path / "empty.jsonl", [""]))


@pytest.mark.parametrize("key", ["old_logprobs", "ref_logprobs"])
def test_old_and_reference_logprobs_must_be_set_on_generated_tokens(key, tmp_path):
    """A null there would silently become 0.0 in the PPO ratio or the KL term."""
    values = list(GOOD[key])
    values[3] = None  # token 3 was generated (its 'logprobs' value is set)
    path = _write(tmp_path / "r.jsonl", [{**GOOD, key: values}])
    with pytest.raises(ValueError, match=rf"r.jsonl:1: trajectory 't#0': '{key}' is null at "
                                         r"index 3, a generated token"):
        read_rollouts(path)

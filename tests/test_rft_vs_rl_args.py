"""benchmarks/rft_vs_rl.py: argument defaults and validation (no training)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import rft_vs_rl  # noqa: E402


def test_quick_and_full_defaults():
    q = rft_vs_rl.parse_args(["--quick"])
    assert (q.seeds, q.steps, q.samples_per_task) == (1, 8, 2)
    assert q.output.endswith("rft_vs_rl_quick.json")
    f = rft_vs_rl.parse_args([])
    assert (f.seeds, f.steps, f.samples_per_task) == (3, 24, 4)
    assert f.output.endswith(os.path.join("results", "rft_vs_rl.json"))
    assert rft_vs_rl.parse_args(["--quick", "--seeds", "2"]).seeds == 2


@pytest.mark.parametrize("flag", ["--seeds", "--steps", "--samples-per-task"])
def test_non_positive_counts_are_errors(flag):
    with pytest.raises(SystemExit):
        rft_vs_rl.parse_args([flag, "0"])


def test_arms_are_validated_and_rl_is_required():
    assert rft_vs_rl.parse_args([]).arms == ["rl", "rft", "rft_sft"]
    assert rft_vs_rl.parse_args(["--arms", "rl,rft_sft"]).arms == ["rl", "rft_sft"]
    for bad in ("rft", "rl,ppo"):
        with pytest.raises(SystemExit):
            rft_vs_rl.parse_args(["--arms", bad])


def test_tokens_to_reach_uses_two_round_means():
    curve = [[10, 0.2], [20, 0.6], [30, 0.8], [40, 0.9]]
    assert rft_vs_rl.tokens_to_reach(curve, 0.4) == 20     # (0.2 + 0.6) / 2
    assert rft_vs_rl.tokens_to_reach(curve, 0.7) == 30     # (0.6 + 0.8) / 2
    assert rft_vs_rl.tokens_to_reach(curve, 0.86) is None  # best pair mean is 0.85


def test_maths_env_gets_its_own_outputs_and_workdir():
    m = rft_vs_rl.parse_args(["--env", "maths", "--quick"])
    assert m.output.endswith("rft_vs_rl_maths_quick.json") and m.workdir.endswith("_maths")
    assert rft_vs_rl.ENVS["maths"]["max_turns"] == 1
    with pytest.raises(SystemExit):
        rft_vs_rl.parse_args(["--env", "swe"])

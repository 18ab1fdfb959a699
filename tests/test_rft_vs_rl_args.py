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

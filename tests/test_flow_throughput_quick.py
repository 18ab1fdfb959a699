"""benchmarks/flow_throughput.py --quick --json FILE: the output the issue prescribes (modes with
name, max_staleness, trajectories_per_s, observed_max_staleness, mean_reward; a `sync` mode and
an `async...` one), the staleness bound respected, and --merge's paired statistics checked
against numpy. No speed is asserted (speed is measured by the script, not by tests)."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "flow_throughput.py")


def _run(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_quick_json_schema_bound_and_merge(tmp_path):
    out = tmp_path / "quick.json"
    _run("--quick", "--json", str(out), cwd=tmp_path)
    d = json.loads(out.read_text())
    assert (tmp_path / "quick.png").stat().st_size > 0
    names = [m["name"] for m in d["modes"]]
    assert "sync" in names and any(n.startswith("async") for n in names)
    for m in d["modes"]:
        for k in ("name", "max_staleness", "trajectories_per_s", "observed_max_staleness",
                  "mean_reward"):
            assert k in m, (m["name"], k)
        assert m["trajectories_per_s"] > 0
        # the bound: no trajectory's oldest token lags its trainer by more than max_staleness
        assert m["observed_max_staleness"] <= m["max_staleness"], m
    sync = next(m for m in d["modes"] if m["name"] == "sync")
    assert sync["max_staleness"] == 0 and sync["observed_max_staleness"] == 0
    assert d["speedup"]["sync"] == 1.0

    # --merge: a second "seed" (the same run, every async mode 1.5x as fast and its reward
    # 0.1 lower) pooled with the first; by_seed's paired statistics against numpy's
    d2 = json.loads(out.read_text())
    d2["args"]["seed"] = 99
    for m in d2["modes"]:
        if m["name"] != "sync":
            m["trajectories_per_s"] *= 1.5
            m["mean_reward"] -= 0.1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d2))
    merged = tmp_path / "merged.json"
    _run("--merge", str(out), str(other), "--json", str(merged), cwd=tmp_path)
    mg = json.loads(merged.read_text())
    assert mg["seeds"] == [d["args"]["seed"], 99]
    for m1, m2 in zip(d["modes"], d2["modes"]):
        if m1["name"] == "sync":
            continue
        ratios = np.array([m1["trajectories_per_s"] / sync["trajectories_per_s"],
                           m2["trajectories_per_s"] / sync["trajectories_per_s"]])
        ratios = np.round(ratios, 3)  # speedups are stored to 3 decimals
        got = mg["by_seed"][m1["name"]]
        np.testing.assert_allclose(got["speedup"]["mean"], ratios.mean(), atol=1e-4)
        np.testing.assert_allclose(got["speedup"]["se"], ratios.std(ddof=1) / np.sqrt(2),
                                   atol=1e-4)
        diffs = np.array([m1["mean_reward"] - sync["mean_reward"],
                          m2["mean_reward"] - sync["mean_reward"]])
        np.testing.assert_allclose(got["mean_reward_minus_sync"]["mean"], diffs.mean(),
                                   atol=1e-4)
        assert got["mean_reward_minus_sync"]["min"] < got["mean_reward_minus_sync"]["max"]

"""benchmarks/device_check.py, the one-command device check (issue 20 part 3), proven on CPU: its
--smoke mode (interpreted kernels, tiny shapes) runs sections in their own processes, records a
failing section's error while the others still run, and writes JSON + a markdown summary."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import device_check  # noqa: E402


def test_smoke_run_isolates_a_failing_section_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "dc"
    res = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "device_check.py"), "--smoke", "--out",
         str(out), "--sections", "selftest_error,kernels"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]   # one section failed
    report = json.loads((out / "device_check.json").read_text())
    assert report["smoke"] and report["device"].startswith("cpu")
    bad, good = report["sections"]["selftest_error"], report["sections"]["kernels"]
    assert not bad["ok"] and "selftest: this section always fails" in bad["error"]
    assert good["ok"], good
    (case,) = good["result"]["cases"]
    assert case["ok"] and case["out_max_abs"] < 1e-4 and case["dv_max_abs"] < 1e-4
    md = (out / "device_check.md").read_text()
    assert "| selftest_error | NO |" in md and "| kernels | yes |" in md
    assert "Kernels vs dense" in md


def test_summary_covers_every_section_and_a_timeout_is_recorded(tmp_path):
    """The markdown renders the results the device sections return; a section that outlives its
    time limit is stopped and recorded (a hanging child cannot stall the check)."""
    rows = {
        "kernels": {"cases": [{"case": "trees", "heads": 16, "kv_heads": 2, "head_dim": 128,
                               "dtype": "bfloat16", "out_max_abs": 1e-3, "dq_max_abs": 2e-3,
                               "dk_max_abs": 2e-3, "dv_max_abs": 1e-3, "ok": True}],
                    "all_ok": True},
        "attention": {"rows": [{"T": 8192, "impl": "tree_pallas", "fwd_tflops": 400.0,
                                "fwd_bwd_tflops": 300.0},
                               {"T": 8192, "impl": "cudnn", "fwd_tflops": 420.0,
                                "fwd_bwd_tflops": 310.0, "tree_over_this_fwd": 0.952,
                                "tree_over_this_fwd_bwd": 0.968}]},
        "sparsity": {"rows": [{"case": "chain", "visible_share": 0.5,
                               "fwd_time_per_pair_vs_chain": 1.0,
                               "fwd_bwd_time_per_pair_vs_chain": 1.0}]},
        "tree_vs_flat": {"rows": [{"workload": "grpo", "flop_ideal_speedup": 3.2,
                                   "measured_speedup": 3.1, "measured_over_flop_ideal": 0.97}]},
        "train": {"model": "qwen3_1_7b_8k", "row_len": 8192, "tokens_per_s": 1e4,
                  "computed_tokens_per_s": 9e3, "mfu": 0.51},
        "sampler": {"rows": [{"model": "qwen3_1_7b", "batch": 32, "decode_tokens_per_s": 2e3}]},
    }
    report = {"date": "d", "device": "gpu: NVIDIA H200", "jax": "0.11.2", "smoke": False,
              "seconds": 1.0, "sections": {k: {"ok": True, "seconds": 1, "result": v}
                                           for k, v in rows.items()}}
    md = device_check.summary_markdown(report)
    for title in ("Kernels vs dense", "Causal attention TFLOP/s", "Time per visible pair",
                  "Tree vs flat", "Train step", "Sampler decode"):
        assert title in md, title
    assert "0.952" in md and "MFU 0.51" in md

    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)\n")
    res = device_check.run_section("kernels", True, str(tmp_path), timeout=2, script=str(slow))
    assert not res["ok"] and res["error"] == "timed out after 2 s"

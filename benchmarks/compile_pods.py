"""Pod presets compiled ahead of time for Cloud TPU topologies from this CPU host (libtpu, no TPU).

    python benchmarks/compile_pods.py [--only NAME ...] [--out benchmarks/results/compile_pods.json]

Each case runs `kat-jax compile-check` in its own process (the compiles of 32B-parameter steps
for 32-64 devices take minutes and several GiB of host memory) and keeps its JSON summary line.
A case lists candidate override sets, tried in order until one fits; every attempt is recorded,
the ones that do not fit too. Results are merged into the output file by case name, so cases can
be run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (config, topology, [override sets to try in order]). The presets pick their mesh per
# topology (mesh.topology_table, kat_jax.training.defaults.TOPOLOGY_MESHES), so the cases for a
# preset's own topology run with no overrides; the long-row cases raise data.row_len only.
CASES: dict[str, tuple[str, str, list[list[str]]]] = {
    "qwen3_8b_sft_v5p-8": ("configs/sft.py:qwen3_8b", "v5p-8", [[]]),
    "qwen3_8b_sft_v5e-16": ("configs/sft.py:qwen3_8b", "v5e-16", [[]]),
    "kat_dev_32b_sft_v5p-64": ("configs/sft.py:kat_dev_32b", "v5p-64", [[]]),
    "kat_dev_32b_rl_v5p-64": ("configs/rl.py:kat_dev_32b", "v5p-64", [[]]),
    "kat_dev_32b_sft_v6e-64": ("configs/sft.py:kat_dev_32b", "v6e-64", [[]]),
    "kat_dev_32b_rl_v6e-64": ("configs/rl.py:kat_dev_32b", "v6e-64", [[]]),
    # long rows: 64k tokens on v5p-64, 128k on v5p-128 (the largest that fits, tried downwards)
    "kat_dev_32b_sft_64k_v5p-64": ("configs/sft.py:kat_dev_32b", "v5p-64",
                                   [["--config.data.row_len=65536"]]),
    "kat_dev_32b_sft_128k_v5p-128": ("configs/sft.py:kat_dev_32b", "v5p-128",
                                     [["--config.data.row_len=131072"],
                                      ["--config.data.row_len=98304"]]),
    "kat_dev_32b_rl_64k_v5p-64": ("configs/rl.py:kat_dev_32b", "v5p-64",
                                  [["--config.data.row_len=65536"]]),
    "kat_dev_32b_rl_128k_v5p-128": ("configs/rl.py:kat_dev_32b", "v5p-128",
                                    [["--config.data.row_len=131072"],
                                     ["--config.data.row_len=98304"]]),
}


def run_case(config: str, topology: str, overrides: list[str], timeout: int) -> dict:
    cmd = [sys.executable, "-m", "kat_jax.cli", "compile-check", "--config", config,
           "--topology", topology, *overrides]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "topology": topology, "overrides": overrides,
                "error": f"timed out after {timeout} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = [ln for ln in p.stderr.splitlines() if ln.strip()][-5:]
        return {"config": config, "topology": topology, "overrides": overrides,
                "returncode": p.returncode, "error": "\n".join(tail), "wall_s": round(wall, 1)}
    out = json.loads(lines[-1])
    out.update(config=config, overrides=overrides, returncode=p.returncode, wall_s=round(wall, 1))
    return out


def table(results: dict) -> str:
    """Markdown rows of every attempt: case, overrides, mesh, remat, microbatches, memory, FLOPs."""
    out = ["| case | overrides | mesh (data, fsdp, context, tensor) | remat | M x shards x row | "
           "memory / device (args + temp) | HBM | fits | XLA FLOPs / device | model FLOPs / step | "
           "compile s |", "| --- " * 11 + "|"]
    for name, v in results.items():
        for r in v["attempts"]:
            if "memory_per_device" not in r:
                err = str(r.get("error")).splitlines()[-1]
                out.append(f"| {name} | {' '.join(r['overrides'])} | error: {err} |")
                continue
            m, g = r["memory_per_device"], 2**30
            mesh = r["mesh"]
            out.append(
                f"| {name} | {' '.join(o.replace('--config.', '') for o in r['overrides']) or '-'} "
                f"| {mesh['data']}, {mesh['fsdp']}, {mesh.get('context', 1)}, {mesh['tensor']} | "
                f"{r['remat_policy']} | "
                f"{r['microbatches']} x {r['data_shards']} x {r['row_len']} | "
                f"{m['total'] / g:.2f} GiB ({m.get('argument', 0) / g:.2f} + "
                f"{m.get('temp', 0) / g:.2f}){'' if r.get('compiled', True) else ' (OOM)'} | "
                f"{r['hbm_per_device'] / g:.0f} GiB | {'yes' if r['fits'] else 'no'} | "
                f"{r['flops_per_device_xla']:.3g} | {r['model_flops_per_step']:.3g} | "
                f"{r['compile_s']} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=None, help=f"cases (default all): {list(CASES)}")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/compile_pods.json"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per compile")
    ap.add_argument("--table", action="store_true", help="print the results as markdown; no run")
    args = ap.parse_args()
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.table:
        print(table(results))
        return 0
    for name in args.only or list(CASES):
        config, topology, candidates = CASES[name]
        attempts = []
        for overrides in candidates:
            r = run_case(config, topology, overrides, args.timeout)
            attempts.append(r)
            mem = r.get("memory_per_device", {}).get("total")
            print(f"{name} {' '.join(overrides) or '(defaults)'}: "
                  + (f"{mem / 2**30:.2f} GiB of {r['hbm_per_device'] / 2**30:.0f} GiB, "
                     f"fits={r['fits']}, compile {r['compile_s']} s" if mem is not None
                     else f"error: {r.get('error')}"), flush=True)
            if r.get("fits"):
                break
        results[name] = {"chosen": attempts[-1], "attempts": attempts}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(v["chosen"].get("fits") for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

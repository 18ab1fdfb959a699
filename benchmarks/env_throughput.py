"""Throughput of the SWE environment with the local sandbox backend on the bundled instances.

Measured:

- **bash step latency**: ``env.step`` with one ``bash`` call (``echo hi``, ``ls``, ``python -c pass``) in
  a warm sandbox (after ``reset`` and a few warm-up calls); median and p90 over ``--latency-steps`` calls
  each. Each call is a fresh ``bash`` under the local sandbox's isolation (unshare / setpriv / ulimit).
- **episodes per second**: one episode = ``make_env("swe", backend="local")`` + ``reset`` + 10 ``bash``
  tool calls (one per turn: ls, cat, grep, git status, python, ...; the last one applies the gold patch
  with ``git apply``, so every episode must grade to reward 1, which checks the run) + ``evaluate`` +
  ``close``. ``evaluate`` grades in a *fresh* sandbox (a second copy of the repository, the agent's diff
  and the test patch applied, the hidden tests run), so every episode starts two sandboxes and that is
  part of its cost. A thread pool of 1 (serial baseline), 2, 4 and 8 workers each runs whole episodes
  (tasks round-robin over the 5 bundled instances) until ``--episodes`` are done; episodes per second =
  episodes / wall time. Also reported per setting: median time of reset, of one step and of evaluate,
  and host CPU seconds per episode (this process + its waited-for children).
- **warm pool**: ``SweEnv.reset`` starts its own sandbox (it takes no pool), so the concurrency above is
  "N sandboxes in flight". What a ``SandboxPool`` of warm sandboxes would save on reset is measured
  separately: a cold ``start_sandbox`` against ``SandboxPool.acquire`` (health check included) from a
  warmed pool of 2.

The load average at start and end is recorded: the machine may be shared with other jobs.

    python benchmarks/env_throughput.py [--quick] [--concurrency 1 2 4 8] [--episodes 60] [--json FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from kat_jax.envs import SandboxPool, make_env
from kat_jax.envs.local_sandbox import probe_isolation
from kat_jax.envs.swe import load_tasks, start_sandbox

# The agent's 10 bash calls of an episode; {patch} is the gold patch (applied by the last call).
EPISODE_COMMANDS = [
    "ls -la",
    "find . -name '*.py' -not -path './.git/*' | head -50",
    "cat README* 2>/dev/null | head -40; true",
    "grep -rn 'def ' --include='*.py' . | head -40",
    "git status --short && git log --oneline | head -5",
    "wc -l $(git ls-files '*.py') | tail -1",
    "python -c 'import sys; print(sys.version)'",
    "for f in $(git ls-files '*.py' | head -3); do head -20 \"$f\"; done",
    "echo hi && pwd",
    ('cat > "$TMPDIR/gold.patch" <<\'KAT_EOF\'\n{patch}KAT_EOF\n'
     'git apply --whitespace=nowarn "$TMPDIR/gold.patch" && git diff --stat'),
]
LATENCY_COMMANDS = ["echo hi", "ls", "python -c pass"]


def bash_call(i: int, command: str) -> dict:
    return {"id": f"call_{i}", "type": "function",
            "function": {"name": "bash", "arguments": json.dumps({"command": command})}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def step_latency(task, n: int, warmup: int = 5) -> dict:
    env = make_env("swe", backend="local")
    try:
        env.reset(task)
        out = {}
        for cmd in LATENCY_COMMANDS:
            for i in range(warmup):
                env.step([bash_call(i, cmd)])
            times = []
            for i in range(n):
                t = time.perf_counter()
                msg = env.step([bash_call(i, cmd)])[0]
                times.append(time.perf_counter() - t)
                assert not msg["content"].startswith("Error"), msg
            out[cmd] = {"median_ms": round(1e3 * statistics.median(times), 2),
                        "p90_ms": round(1e3 * pct(times, 0.9), 2), "n": n}
        return out
    finally:
        env.close()


def run_episode(task, steps: int) -> dict:
    patch = task.metadata["instance"]["patch"]
    cmds = [c.replace("{patch}", patch) for c in EPISODE_COMMANDS]
    cmds = (cmds[:-1] * (steps // max(len(cmds) - 1, 1) + 1))[:steps - 1] + cmds[-1:]
    t0 = time.perf_counter()
    env = make_env("swe", backend="local")
    try:
        env.reset(task)
        t1 = time.perf_counter()
        for i, cmd in enumerate(cmds):
            env.step([bash_call(i, cmd)])
        t2 = time.perf_counter()
        res = env.evaluate()
        t3 = time.perf_counter()
    finally:
        env.close()
    t4 = time.perf_counter()
    return {"reset": t1 - t0, "step": (t2 - t1) / len(cmds), "evaluate": t3 - t2, "close": t4 - t3,
            "total": t4 - t0, "reward": res.reward, "status": res.status.value}


def throughput(tasks, workers: int, episodes: int, steps: int) -> dict:
    counter, lock = iter(range(episodes)), threading.Lock()

    def worker() -> list[dict]:
        rows = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return rows
            rows.append(run_episode(tasks[i % len(tasks)], steps))

    cpu0, t0 = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as ex:
        rows = [r for fut in [ex.submit(worker) for _ in range(workers)] for r in fut.result()]
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    med = lambda k: round(statistics.median(r[k] for r in rows), 4)
    return {"workers": workers, "episodes": len(rows), "wall_s": round(wall, 2),
            "episodes_per_s": round(len(rows) / wall, 3),
            "median_s": {k: med(k) for k in ("total", "reset", "step", "evaluate", "close")},
            "p90_total_s": round(pct([r["total"] for r in rows], 0.9), 3),
            "cpu_s_per_episode": round(cpu / len(rows), 3),
            "resolved": sum(r["reward"] == 1.0 for r in rows),
            "statuses": {s: sum(r["status"] == s for r in rows) for s in {r["status"] for r in rows}}}


def pool_vs_cold(task, n: int) -> dict:
    inst = task.metadata["instance"]
    cold = []
    for _ in range(n):
        t = time.perf_counter()
        sb = start_sandbox(inst, "local")
        cold.append(time.perf_counter() - t)
        sb.close()
    pool = SandboxPool(lambda: start_sandbox(inst, "local"), size=2)
    warm = []
    try:
        for _ in range(n):
            # let the pool refill, as it would between episodes
            time.sleep(max(statistics.median(cold) * 3, 0.2))
            t = time.perf_counter()
            sb = pool.acquire(timeout=30)
            warm.append(time.perf_counter() - t)
            pool.release(sb)
    finally:
        pool.close()
    return {"cold_start_median_ms": round(1e3 * statistics.median(cold), 1),
            "pool_acquire_median_ms": round(1e3 * statistics.median(warm), 1), "n": n,
            "pool_size": 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="~30 s: fewer episodes and latency samples")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--episodes", type=int, default=None, help="per setting (default 60, quick 16)")
    ap.add_argument("--steps", type=int, default=10, help="bash calls per episode")
    ap.add_argument("--latency-steps", type=int, default=None,
                    help="per command (default 30, quick 15)")
    ap.add_argument("--shared-note", default="",
                    help="free text recorded in the JSON (e.g. the host was shared)")
    ap.add_argument("--json", default=None,
                    help="default: benchmarks/results/env_throughput[_quick].json")
    args = ap.parse_args()
    episodes = args.episodes or (16 if args.quick else 60)
    lat_n = args.latency_steps or (15 if args.quick else 30)
    name = "env_throughput_quick.json" if args.quick else "env_throughput.json"
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    t_start, load0 = time.perf_counter(), os.getloadavg()
    iso = probe_isolation()
    tasks = load_tasks()
    latency = step_latency(tasks[0], lat_n)
    print(json.dumps({"bash_step_latency": latency}), flush=True)
    run_episode(tasks[0], args.steps)  # warm-up (imports, page cache)
    settings = []
    for w in args.concurrency:
        r = throughput(tasks, w, episodes, args.steps)
        print(json.dumps(r), flush=True)
        settings.append(r)
    pool = pool_vs_cold(tasks[0], 5 if args.quick else 10)
    print(json.dumps({"warm_pool": pool}), flush=True)
    out = {
        "benchmark": "env_throughput", "date": datetime.date.today().isoformat(), "quick": args.quick,
        "env": "swe", "backend": "local", "instances": [t.id for t in tasks],
        "episode": (f"make_env + reset + {args.steps} bash calls (one per step; the last applies the "
                    "gold patch) + evaluate + close"),
        "evaluate_note": ("evaluate grades in a fresh sandbox (second repository copy, agent diff + "
                          "test_patch applied, hidden tests run): 2 sandboxes per episode, included"),
        "pool_note": ("SweEnv.reset starts its own sandbox (it takes no SandboxPool): 'workers' = "
                      "episodes (sandboxes) in flight; warm_pool measures what a SandboxPool saves"),
        "episodes_per_setting": episodes, "latency_steps": lat_n,
        "bash_step_latency": latency, "throughput": settings, "warm_pool": pool,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "isolation": iso.describe(), "euid": os.geteuid(),
                    "loadavg_start": [round(x, 2) for x in load0],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                    "note": args.shared_note},
        "runtime_s": round(time.perf_counter() - t_start, 1),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

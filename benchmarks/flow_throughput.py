"""Synchronous vs asynchronous online RL (kat_jax.flow.async_rollout) under a long-tailed tool
latency: trajectories per second, observed staleness and reward against wall time.

Modes: sync (rl.max_staleness=0), async_s1, async_s2 (max_staleness 1, 2; weight updates after a
drain), async_s2_partial (max_staleness 2, rl.partial_rollouts).

Two back ends, the same modes:
  --backend sim    no model: the real scheduler (AsyncRollouts, admission control, weight swaps)
                   drives a modelled engine and environment. Each turn's generation takes
                   --gen-ms, each tool call a log-normal time (median --tool-ms, sigma
                   --tool-sigma: a long tail like real SWE tool calls), each optimizer round
                   --train-ms; the reward of an episode is Bernoulli with p = 0.2 + 0.6 (1 -
                   exp(-v / 8)) at the mean policy version v of its turns (a modelled learning
                   curve: staleness costs reward). --concurrency, --groups, --group-size,
                   --turns set the scale (pod-scale settings run in seconds).
  --backend model  the tiny calculator loop (configs/rl.py:tiny_calculator, random tiny model,
                   kat_jax.flow.online) with the same log-normal latency added to every tool
                   call and to each episode's grading (evaluate: as a SWE task's test run in
                   its sandbox; a random model rarely calls a tool, so without it the latency
                   would hardly ever apply), on this machine's devices; reward per round
                   from metrics.jsonl; steady_trajectories_per_s leaves out the first
                   --warmup-rounds rounds (compilation). Each mode runs in a process of its
                   own (--in-process: all in this one), after an unmeasured pass of every
                   mode that fills a persistent compilation cache the measured pass reads
                   (--no-warm-pass: none), so that no mode's measured rounds pay compilation
                   another did not.
                   --sft-dir DIR: every mode starts from the quickstart's SFT model
                   (configs/quickstart.py's mid and sft stages, trained into DIR once) on
                   calculator_small with the quickstart's online settings, so that reward is
                   not 0 and "no drop in reward" can be read. --concurrency auto: (max_staleness
                   + 1) rounds of episodes in flight (AReaL's capacity; sync: one round).

    python benchmarks/flow_throughput.py [--backend sim|model] [--rounds N] [--json FILE]
    python benchmarks/flow_throughput.py --quick --json FILE     # sim, < 1 minute on 2 cores

Output: JSON {"modes": [{"name", "max_staleness", "partial_rollouts", "trajectories_per_s",
"observed_max_staleness", "mean_reward", "wall_s", "reward_vs_wall": [[s, reward], ...], ...}],
"speedup": {mode: trajectories_per_s / sync's}} and a PNG beside it (trajectories/s per mode,
reward against wall time). Default JSON: benchmarks/results/flow_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODES = [("sync", 0, False), ("async_s1", 1, False), ("async_s2", 2, False),
         ("async_s2_partial", 2, True)]


def _tool_s(rng: random.Random, a) -> float:
    return a.tool_ms / 1000 * math.exp(rng.gauss(0.0, a.tool_sigma))


# ---------------------------------------------------------------------------------------------
# the simulator: AsyncRollouts with a modelled engine and environment


def _concurrency(a, k: int, per_round: int) -> int:
    """--concurrency: a number, or auto: AReaL's capacity, the (max_staleness + 1) rounds of
    episodes a mode may have in flight (sync: one round)."""
    return (k + 1) * per_round if a.concurrency == "auto" else int(a.concurrency)


def _sim_setup(a):
    from kat_jax.data.tokenizer import ByteTokenizer
    from kat_jax.envs import register_env
    from kat_jax.envs.base import Env, EvalResult, Task, tool_message

    tok = ByteTokenizer()
    im_end = tok.special("<|im_end|>")

    class SimEnv(Env):
        name = "flow_sim"

        def reset(self, task):
            self.task, self.rng = task, random.Random(hash(task.id) ^ threading.get_ident())
            return [dict(m) for m in task.messages], []

        def step(self, tool_calls):
            time.sleep(_tool_s(self.rng, a))
            return [tool_message(c["id"], "tool", "ok") for c in tool_calls]

        def evaluate(self, messages=()):
            vs = [int(m["content"].split("v=")[1].split()[0]) for m in messages
                  if m["role"] == "assistant" and m.get("content") and "v=" in m["content"]]
            v = sum(vs) / max(len(vs), 1)
            p = 0.2 + 0.6 * (1 - math.exp(-v / 8))
            won = self.rng.random() < p
            return EvalResult(reward=float(won), passed=won)

    def tasks(path=None):
        return [Task(f"s{i}", [{"role": "user", "content": f"Task {i}."}]) for i in range(64)]

    from kat_jax.envs import ENVS

    if "flow_sim" not in ENVS:
        register_env("flow_sim", SimEnv, tasks)

    class SimEngine:
        context_length = 1 << 20

        def __init__(self):
            self.v = 0

        def update_weights(self, params):
            self.v = int(params)

        def generate(self, prompts, params, n=1, seeds=None):
            from kat_jax.rollout.sampler import Generation

            v = self.v
            time.sleep(a.gen_ms / 1000)
            out = []
            for p in prompts:
                turn = tok.decode(p).count("<tool_response>")
                text = (f"v={v}\n" + ('<tool_call>\n{"name": "tool", "arguments": {}}\n'
                                      '</tool_call>' if turn < a.turns - 1 else "done"))
                ids = tok.encode(text) + [im_end]
                out.append([Generation(ids, [-0.5] * len(ids), [1.0] * len(ids), "stop")] * n)
            return out

    return tok, tasks(), SimEngine


def run_sim(a, name: str, k: int, partial: bool) -> dict:
    from kat_jax.flow import online
    from kat_jax.flow.async_rollout import AsyncRollouts
    from kat_jax.training import config_lib

    tok, tasks, engine_cls = _sim_setup(a)
    cfg = config_lib.load_train_config(os.path.join(ROOT, "configs/rl.py:tiny_calculator"), [
        "--config.rl.env=flow_sim", "--config.rl.split=all",
        f"--config.rl.groups_per_round={a.groups}", f"--config.rl.group_size={a.group_size}",
        f"--config.rl.minibatches={a.groups}", f"--config.rl.max_turns={a.turns}",
        f"--config.rl.concurrency={_concurrency(a, k, a.groups * a.group_size)}",
        f"--config.rl.max_staleness={k}",
        f"--config.rl.partial_rollouts={partial}", "--config.rl.max_new_tokens=64",
        "--config.data.row_len=100000"])
    online.validate_online(cfg)
    eng = engine_cls()
    flow = AsyncRollouts(eng, cfg, tasks, tok, "grpo", None, start_round=0)
    t0 = time.perf_counter()
    n, rewards, curve, stale, idle = 0, [], [], 0.0, 0.0
    try:
        for r in range(a.rounds):
            flow.publish(r, r)
            tw = time.perf_counter()
            _, episodes, _, m = flow.get(r)
            idle += time.perf_counter() - tw
            time.sleep(a.train_ms / 1000)  # the trainer's round
            n += len(episodes)
            rw = sum(e["reward"] for e in episodes) / max(len(episodes), 1)
            rewards.append(rw)
            stale = max(stale, m.get("staleness_max", 0.0))
            curve.append([round(time.perf_counter() - t0, 3), round(rw, 4)])
    finally:
        flow.close()
    wall = time.perf_counter() - t0
    return {"name": name, "max_staleness": k, "partial_rollouts": partial,
            "trajectories_per_s": round(n / wall, 3), "observed_max_staleness": stale,
            "mean_reward": round(sum(rewards) / len(rewards), 4), "episodes": n,
            "wall_s": round(wall, 3), "train_idle_fraction": round(idle / wall, 3),
            "weight_updates": flow.weight_updates, "reward_vs_wall": curve}


# ---------------------------------------------------------------------------------------------
# the model: the tiny calculator loop with slow tools


def sft_base(a) -> str:
    """The quickstart's mid and SFT stages (configs/quickstart.py) trained once into a.sft_dir
    (reused when already there): a policy that solves some calculator_small tasks, so that reward
    moves during the runs. Returns its model directory."""
    import subprocess

    model = os.path.join(a.sft_dir, "sft", "model")
    if not os.path.exists(model):
        kat = os.path.join(os.path.dirname(sys.executable), "kat-jax")
        t0 = time.perf_counter()
        subprocess.run([kat, "train", "--config", os.path.join(ROOT, "configs/quickstart.py"),
                        "--workdir", a.sft_dir, "--config.stages=mid,sft"], check=True)
        print(f"sft base trained in {time.perf_counter() - t0:.0f} s", flush=True)
    return model


def run_model(a, name: str, k: int, partial: bool) -> dict:
    import kat_jax.flow.online  # noqa: F401  (registers the online loop)
    from kat_jax.envs import ENVS, register_env
    from kat_jax.envs.calculator import CalculatorEnv, SmallCalculatorEnv
    from kat_jax.training import config_lib
    from kat_jax.training.trainer import run_train

    base_env = "calculator_small" if a.sft_dir else "calculator"
    env = base_env + "_slow"
    if env not in ENVS:
        class Slow(SmallCalculatorEnv if a.sft_dir else CalculatorEnv):
            name = env

            def step(self, tool_calls):
                time.sleep(_tool_s(random.Random(), a))
                return super().step(tool_calls)

            def evaluate(self, messages=()):
                # the grading as a SWE task's test run in its sandbox: slow too, and every
                # episode has one (a random model rarely calls the calculator at all)
                time.sleep(_tool_s(random.Random(), a))
                return super().evaluate(messages)

        register_env(env, Slow, ENVS[base_env].load_tasks)
    steps = a.rounds * 2
    # AReaL's capacity: (max_staleness + 1) rounds of episodes may be in flight at once
    concurrency = _concurrency(a, k, 16)  # tiny_calculator: 4 groups x 4 per round
    over = [f"--config.rl.env={env}", "--config.rl.split=all",
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={steps}",
            f"--config.rl.max_staleness={k}", f"--config.rl.partial_rollouts={partial}",
            f"--config.rl.concurrency={concurrency}"]
    if a.sft_dir:  # the quickstart's online stages' settings, from its SFT model
        over += [f"--config.model.checkpoint={sft_base(a)}", "--config.rl.max_new_tokens=80",
                 "--config.data.rows=2", "--config.data.row_len=1024",
                 "--config.optimizer.learning_rate=5e-4",
                 "--config.optimizer.schedule=constant", f"--config.train.seed={a.seed}"]
    over += [f"--config.{x}" for x in a.set]
    cfg = config_lib.load_train_config(os.path.join(ROOT, "configs/rl.py:tiny_calculator"), over)
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        out = run_train(cfg, wd)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl")) if x.strip()]
    rounds = [r for r in rows if "episodes" in r]
    n = sum(r["episodes"] for r in rounds)
    t, curve = 0.0, []
    for r in rounds:
        t += r.get("train_wait_s", 0) + r.get("logprob_time_s", 0) + r.get("train_time_s", 0)
        curve.append([round(t, 2), round(r["reward"], 4)])
    # steady state: the rounds after --warmup-rounds (compilation happens in the first ones);
    # consecutive rounds' walls (wait for rollouts .. end of training) tile the run
    steady = rounds[a.warmup_rounds:]
    steady_wall = sum(r.get("train_wait_s", 0) + r.get("logprob_time_s", 0)
                      + r.get("train_time_s", 0) for r in steady)
    steady_tps = (round(sum(r["episodes"] for r in steady) / steady_wall, 3)
                  if steady and steady_wall > 0 else None)
    return {"name": name, "max_staleness": k, "partial_rollouts": partial,
            "trajectories_per_s": round(n / wall, 3),
            "steady_trajectories_per_s": steady_tps, "steady_rounds": len(steady),
            "steady_wall_s": round(steady_wall, 2),
            "steady_mean_reward": (round(sum(r["reward"] for r in steady) / len(steady), 4)
                                   if steady else None),
            "observed_max_staleness": max((r.get("staleness_max", 0.0) for r in rounds),
                                          default=0.0),
            "mean_reward": round(sum(r["reward"] for r in rounds) / max(len(rounds), 1), 4),
            "episodes": n, "wall_s": round(wall, 1), "rounds": out.get("rounds"),
            "train_idle_fraction": round(sum(r.get("train_wait_s", 0) for r in rounds) / wall, 3),
            "reward_vs_wall": curve}


def run_model_process(a, name: str, k: int, partial: bool) -> dict:
    """run_model for one mode in a process of its own: every mode compiles its programs itself
    (in one process, the engines' shared compiled programs would let later modes skip the
    compilation the first one paid for)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "mode.json")
        env = dict(os.environ)
        if a.compile_cache:
            env.update(JAX_COMPILATION_CACHE_DIR=a.compile_cache,
                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                       JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--in-process",
                        "--modes", name, "--json", out], check=True, env=env)
        return json.load(open(out))["modes"][0]


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [m["name"] for m in out["modes"]]
    ax1.bar(names, [m["trajectories_per_s"] for m in out["modes"]])
    ax1.set_ylabel("trajectories / s")
    ax1.set_title(f"{out['backend']}: tool latency log-normal, sigma {out['args']['tool_sigma']}")
    ax1.tick_params(axis="x", rotation=20)
    for m in out["modes"]:
        xs, ys = zip(*m["reward_vs_wall"]) if m["reward_vs_wall"] else ((), ())
        ax2.plot(xs, ys, marker=".", label=m["name"])
    ax2.set_xlabel("wall time (s)")
    ax2.set_ylabel("reward (round mean)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sim", "model"), default="sim")
    ap.add_argument("--quick", action="store_true", help="sim, small: < 1 minute on 2 cores")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--groups", type=int, default=4, help="rl.groups_per_round (sim)")
    ap.add_argument("--group-size", type=int, default=4, help="rl.group_size (sim)")
    ap.add_argument("--concurrency", default="16",
                    help="rl.concurrency, or auto: (max_staleness + 1) rounds of episodes, "
                    "what a mode may have in flight (AReaL's capacity; sync: one round)")
    ap.add_argument("--sft-dir", default="",
                    help="model: start every mode from the quickstart's SFT model of "
                    "calculator_small, trained into this directory if not there yet (so "
                    "that reward moves; without it: a random model on calculator)")
    ap.add_argument("--seed", type=int, default=0, help="model with --sft-dir: train.seed")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model: a config override for every mode, e.g. "
                    "--set loss.old_logprobs=behaviour (repeatable)")
    ap.add_argument("--no-warm-pass", dest="warm_pass", action="store_false",
                    help="model: skip the unmeasured first pass of every mode that fills a "
                    "compilation cache for the measured pass")
    ap.add_argument("--in-process", action="store_true",
                    help="model: run the modes in this process (default: one process per mode)")
    ap.add_argument("--turns", type=int, default=3, help="turns per episode (sim)")
    ap.add_argument("--gen-ms", type=float, default=5.0, help="generation per turn (sim)")
    ap.add_argument("--tool-ms", type=float, default=20.0, help="median tool latency")
    ap.add_argument("--tool-sigma", type=float, default=1.0, help="log-normal sigma (tail)")
    ap.add_argument("--train-ms", type=float, default=150.0, help="trainer round (sim)")
    ap.add_argument("--warmup-rounds", type=int, default=2,
                    help="model: rounds left out of steady_trajectories_per_s (compilation)")
    ap.add_argument("--modes", default=",".join(m[0] for m in MODES))
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/flow_throughput.json"))
    a = ap.parse_args()
    if a.quick:
        a.backend, a.rounds = "sim", min(a.rounds, 8)
    logging_quiet()
    run = run_sim if a.backend == "sim" else run_model
    if a.backend == "model" and not a.in_process:
        if a.sft_dir:
            sft_base(a)  # once, before the modes' processes
        run = run_model_process
    wanted = a.modes.split(",")
    with tempfile.TemporaryDirectory() as cache:
        a.compile_cache = None
        if run is run_model_process and a.warm_pass:
            # an unmeasured pass of every mode first, its compiled programs kept in a persistent
            # cache that the measured pass reads: every measured mode then finds the programs
            # of every shape any mode met (without it, the modes with more episodes in flight
            # meet more batch shapes and pay more compilation inside the measured rounds)
            a.compile_cache = cache
            for name, k, p in MODES:
                if name in wanted:
                    run(a, name, k, p)
        modes = [run(a, name, k, p) for name, k, p in MODES if name in wanted]
    sync = next((m for m in modes if m["name"] == "sync"), None)
    out = {"benchmark": "flow_throughput", "backend": a.backend, "host": platform.node(),
           "cpus": os.cpu_count(), "args": vars(a), "modes": modes,
           "speedup": {m["name"]: round(m["trajectories_per_s"] / sync["trajectories_per_s"], 3)
                       for m in modes} if sync else {}}
    if sync and sync.get("steady_trajectories_per_s"):
        out["steady_speedup"] = {m["name"]: round(m["steady_trajectories_per_s"]
                                                  / sync["steady_trajectories_per_s"], 3)
                                 for m in modes if m.get("steady_trajectories_per_s")}
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    try:
        plot(out, os.path.splitext(a.json)[0] + ".png")
    except ImportError as e:  # matplotlib missing: the JSON is the result
        print(f"no plot: {e}", file=sys.stderr)
    print(json.dumps({m["name"]: {k: m[k] for k in ("trajectories_per_s", "observed_max_staleness",
                                                    "mean_reward")} for m in modes}))
    print(json.dumps(out["speedup"]))
    if "steady_speedup" in out:
        print(json.dumps({"steady_speedup": out["steady_speedup"]}))


def logging_quiet() -> None:
    import logging

    logging.getLogger("kat_jax").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()

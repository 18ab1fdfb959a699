"""Synchronous vs asynchronous online RL (kat_jax.flow.async_rollout) under a long-tailed tool
latency: trajectories per second, observed staleness and reward against wall time.

Modes: sync (rl.max_staleness=0), async_s1, async_s2 (max_staleness 1, 2; weight updates after a
drain), async_s1_partial, async_s2_partial (max_staleness 1, 2, rl.partial_rollouts).

Two back ends, the same modes:
  --backend sim    no model: the real scheduler (AsyncRollouts, admission control, weight swaps)
                   drives a modelled engine and environment. Each turn's generation takes
                   --gen-ms, each tool call a log-normal time (median --tool-ms, sigma
                   --tool-sigma: a long tail like real SWE tool calls), each optimizer round
                   --train-ms; the reward of an episode is Bernoulli with p = 0.2 + 0.6 (1 -
                   exp(-v / 8)) at the mean policy version v of its turns (a modelled learning
                   curve: staleness costs reward). An episode's draws (latencies, reward) are
                   seeded by --seed, its task and how many episodes of that task started
                   before it, in both back ends: every mode meets the same draws.
                   --concurrency, --groups, --group-size, --turns set the scale (pod-scale
                   settings run in seconds).
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
                   not 0 and "no drop in reward" can be read. The loss is
                   configs/rl.py:tiny_calculator's, which includes loss.behaviour_clip=0.28
                   since 2026-12-02 (commit d0d6b9d): the runs in benchmarks/RESULTS.md from
                   before had none, and --set loss.behaviour_clip=0 reproduces them.
                   --concurrency auto: (max_staleness + 1) rounds of episodes in flight
                   (AReaL's capacity; sync: one round).
                   --groups x --group-size episodes a round (tiny_calculator's 4 x 4 by
                   default; the quickstart's 8 x 8 makes the final pass@1 less noisy).

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

MODES = [("sync", 0, False), ("async_s1", 1, False), ("async_s1_partial", 1, True),
         ("async_s2", 2, False), ("async_s2_partial", 2, True)]


def _tool_s(rng: random.Random, a) -> float:
    return a.tool_ms / 1000 * math.exp(rng.gauss(0.0, a.tool_sigma))


_EPISODES: dict[str, int] = {}
_EPISODES_LOCK = threading.Lock()


def _episode_rng(a, task_id: str) -> random.Random:
    """The latency (and sim reward) draws of an episode: seeded by --seed, the task and how many
    episodes of that task started before it, so that every mode meets the same draws (common
    random numbers: the modes' ratios then vary with the scheduling, not with whose tail was
    longer)."""
    with _EPISODES_LOCK:
        n = _EPISODES.get(task_id, 0)
        _EPISODES[task_id] = n + 1
    return random.Random(f"{a.seed}:{task_id}:{n}")


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
            self.task, self.rng = task, _episode_rng(a, task.id)
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
    _EPISODES.clear()  # every mode meets the same draws
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

            def reset(self, task):
                self.rng = _episode_rng(a, task.id)
                return super().reset(task)

            def step(self, tool_calls):
                time.sleep(_tool_s(self.rng, a))
                return super().step(tool_calls)

            def evaluate(self, messages=()):
                # the grading as a SWE task's test run in its sandbox: slow too, and every
                # episode has one (a random model rarely calls the calculator at all)
                time.sleep(_tool_s(self.rng, a))
                return super().evaluate(messages)

        spec = ENVS[base_env]  # the same tasks and train/test split
        register_env(env, Slow, spec.load_tasks, spec.check_task, spec.test_fraction)
    _EPISODES.clear()  # every mode meets the same draws
    # AReaL's capacity: (max_staleness + 1) rounds of episodes may be in flight at once
    concurrency = _concurrency(a, k, a.groups * a.group_size)
    # from the SFT model: train on calculator_small's train split, the final policy is evaluated
    # on its held-out test split (below)
    over = [f"--config.rl.env={env}", f"--config.rl.split={'train' if a.sft_dir else 'all'}",
            f"--config.rl.max_staleness={k}", f"--config.rl.partial_rollouts={partial}",
            f"--config.rl.concurrency={concurrency}",
            f"--config.rl.groups_per_round={a.groups}", f"--config.rl.group_size={a.group_size}"]
    if a.sft_dir:  # the quickstart's online stages' settings, from its SFT model
        over += [f"--config.model.checkpoint={sft_base(a)}", "--config.rl.max_new_tokens=80",
                 "--config.data.rows=2", "--config.data.row_len=1024",
                 "--config.optimizer.learning_rate=5e-4",
                 "--config.optimizer.schedule=constant", f"--config.train.seed={a.seed}"]
    over += [f"--config.{x}" for x in a.set]
    cfg = config_lib.load_train_config(os.path.join(ROOT, "configs/rl.py:tiny_calculator"), over)
    # --rounds rounds: each round's rl.minibatches parts are packed into batches of at most
    # data.trajectories trajectories, one optimizer step each (4 x 4 groups: 2 steps; 8 x 8: 4)
    part = a.groups * a.group_size / cfg.rl.minibatches
    per_round = cfg.rl.minibatches * math.ceil(part / cfg.data.trajectories)
    cfg.train.steps = cfg.train.checkpoint_every = a.rounds * per_round
    versions = [int(v) for v in a.eval_versions.split(",") if v] if a.eval_samples > 0 else []
    if any(not 0 < v < a.rounds for v in versions):
        raise SystemExit(f"--eval-versions: each must be in (0, --rounds={a.rounds})")
    if versions:  # a checkpoint at each version to evaluate (the loop saves at multiples)
        cfg.train.checkpoint_every = per_round * math.gcd(*versions, a.rounds)
        cfg.train.keep_checkpoints = a.rounds + 1
    with tempfile.TemporaryDirectory() as wd:
        t0 = time.perf_counter()
        out = run_train(cfg, wd)
        wall = time.perf_counter() - t0
        rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl")) if x.strip()]
        final = final_eval(a, wd) if a.sft_dir and a.eval_samples > 0 else {}
        if final and versions:  # the policy's test pass@1 along the run, the final one last
            final["eval_pass_at_1_vs_version"] = [
                [v, version_eval(a, wd, v * per_round)["final_eval_pass_at_1"]]
                for v in versions] + [[a.rounds, final["final_eval_pass_at_1"]]]
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
            # the off-policy correction's importance weights (loss.tis_cap), mean over the steps
            **{k + "_mean": round(sum(r[k] for r in rows if k in r)
                                  / sum(k in r for r in rows), 4)
               for k in ("tis_weight", "tis_truncated_fraction", "behaviour_clip_fraction",
                         "tis_sequence_log_ratio_abs")
               if any(k in r for r in rows)},
            "reward_vs_wall": curve,
            # each round's reward at its trajectories' mean behaviour policy version (the round's
            # trained version less the mean staleness of its tokens): an asynchronous round's
            # trajectories come from older policies than a synchronous one's
            "reward_vs_behaviour_version": [
                [round(r.get("policy_version", i) - r.get("staleness_mean", 0.0), 3),
                 round(r["reward"], 4)] for i, r in enumerate(rounds)],
            **final}


def final_eval(a, workdir: str) -> dict:
    """The trained policy's pass@1 and mean reward on calculator_small's held-out test split
    (79 tasks x --eval-samples, the README's evaluation; the same sampling seed for every mode, so
    that modes differ only in their weights): what the run learned, whatever the lag of its
    training trajectories."""
    from kat_jax.rollout.evaluation import run_eval

    t0 = time.perf_counter()
    res = run_eval(workdir, "calculator_small", os.path.join(workdir, "final_eval.json"),
                   split="test", samples_per_task=a.eval_samples, max_new_tokens=80, max_turns=2,
                   concurrency=64, seed=a.seed)
    return {"final_eval_pass_at_1": round(res["pass@1"], 4),
            "final_eval_mean_reward": round(res["mean_reward"], 4),
            "final_eval_episodes": res["n_tasks"] * a.eval_samples,
            "final_eval_s": round(time.perf_counter() - t0, 1)}


def version_eval(a, workdir: str, step: int) -> dict:
    """final_eval of the policy the run had at `step` (its checkpoint's parameters)."""
    import orbax.checkpoint as ocp

    from kat_jax.models.checkpoint import load_model_config, save_checkpoint

    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "data")) as mngr:
        state = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))["state"]
    out = os.path.join(workdir, f"step_{step}")
    save_checkpoint(os.path.join(out, "model"), state["params"],
                    load_model_config(os.path.join(workdir, "model")))
    return final_eval(a, out)


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
                        "--modes", name, "--json", out, "--seeds", str(a.seed),
                        "--eval-samples", str(a.eval_samples)], check=True, env=env)
        return json.load(open(out))["modes"][0]


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = out["modes"]
    extra = [k for k in ("reward_vs_behaviour_version", "final_eval_pass_at_1")
             if all(k in m for m in modes)]
    fig, axes = plt.subplots(1, 2 + len(extra), figsize=(5 * (2 + len(extra)), 3.8))
    names = [m["name"] for m in modes]
    seeds = f", {len(out['seeds'])} seeds" if len(out.get("seeds", ())) > 1 else ""
    axes[0].bar(names, [m["trajectories_per_s"] for m in modes])
    axes[0].set_ylabel("trajectories / s")
    axes[0].set_title(f"{out['backend']}: tool latency log-normal, sigma "
                      f"{out['args']['tool_sigma']}{seeds}", fontsize=9)
    axes[0].tick_params(axis="x", rotation=20)
    curves = [("reward_vs_wall", "wall time (s)")]
    if "reward_vs_behaviour_version" in extra:
        curves.append(("reward_vs_behaviour_version", "behaviour policy version (mean)"))
    for ax, (key, xlabel) in zip(axes[1:], curves):
        for m in modes:
            xs, ys = zip(*m[key]) if m[key] else ((), ())
            ax.plot(xs, ys, marker=".", label=m["name"])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward (round mean)")
        ax.legend(fontsize=8)
    if "final_eval_pass_at_1" in extra:
        ax = axes[-1]
        err = None
        if "by_seed" in out:  # the paired differences' standard errors, drawn on each mode's bar
            err = [0.0 if m["name"] == "sync" else
                   (out["by_seed"].get(m["name"], {}).get("final_eval_pass_at_1_minus_sync", {})
                    .get("se") or 0.0) for m in modes]
        ax.bar(names, [m["final_eval_pass_at_1"] for m in modes], yerr=err, capsize=4)
        ax.set_ylim(min(m["final_eval_pass_at_1"] for m in modes) - 0.1, 1.0)
        ax.set_ylabel("final policy pass@1 (test split)")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("sim", "model"), default="sim")
    ap.add_argument("--quick", action="store_true", help="sim, small: < 1 minute on 2 cores")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--groups", type=int, default=4,
                    help="rl.groups_per_round (model: tiny_calculator's is 4; the quickstart's 8)")
    ap.add_argument("--group-size", type=int, default=4,
                    help="rl.group_size (model: tiny_calculator's is 4; the quickstart's 8)")
    ap.add_argument("--concurrency", default="16",
                    help="rl.concurrency, or auto: (max_staleness + 1) rounds of episodes, "
                    "what a mode may have in flight (AReaL's capacity; sync: one round)")
    ap.add_argument("--sft-dir", default="",
                    help="model: start every mode from the quickstart's SFT model of "
                    "calculator_small, trained into this directory if not there yet (so "
                    "that reward moves; without it: a random model on calculator)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the latency (sim: and reward) draws' seed; model with --sft-dir: also "
                    "train.seed and the final evaluation's sampling seed")
    ap.add_argument("--seeds", default="",
                    help="comma-separated seeds, each a whole run of the modes (model: warm pass "
                    "included); the JSON's modes pool them, by_seed compares each async mode "
                    "with the same seed's sync (speedup range, reward differences' mean and SE)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=[],
                    help="pool the runs of JSON files this script wrote (e.g. seeds run apart) "
                    "into --json, recomputing modes, speedups and by_seed; runs nothing")
    ap.add_argument("--eval-samples", type=int, default=8,
                    help="model with --sft-dir: samples per test task of the final policy's "
                    "evaluation (0: none)")
    ap.add_argument("--eval-versions", default="",
                    help="model with --sft-dir: also evaluate the policy at these versions "
                    "(rounds trained, comma-separated, below --rounds) as the final one: "
                    "eval_pass_at_1_vs_version (checkpoints every gcd of them; slows the run)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model: a config override for every mode, e.g. "
                    "--set loss.old_logprobs=behaviour (repeatable)")
    ap.add_argument("--no-warm-pass", dest="warm_pass", action="store_false",
                    help="model: skip the unmeasured first pass of every mode that fills a "
                    "compilation cache for the measured pass")
    ap.add_argument("--warm-once", action="store_true",
                    help="model with --seeds: the unmeasured pass for the first seed only (the "
                    "later seeds read its compilation cache; a shape it never met compiles "
                    "inside a measured run)")
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
    if a.merge:  # pools what earlier runs wrote: nothing to set up or run
        first, runs = merge(a.merge)
        write(a, runs, {k: first[k] for k in ("benchmark", "backend", "host", "cpus", "args")}
              | {"merged": a.merge})
        return
    logging_quiet()
    run = run_sim if a.backend == "sim" else run_model
    if a.backend == "model" and not a.in_process:
        if a.sft_dir:
            sft_base(a)  # once, before the modes' processes
        run = run_model_process
    wanted = a.modes.split(",")
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    runs = []
    with tempfile.TemporaryDirectory() as cache:
        a.compile_cache = None
        for seed in seeds:
            a.seed = seed
            if run is run_model_process and a.warm_pass and not (a.warm_once and runs):
                # an unmeasured pass of every mode first, its compiled programs kept in a
                # persistent cache that the measured pass reads: every measured mode then finds
                # the programs of every shape any mode met (without it, the modes with more
                # episodes in flight meet more batch shapes and pay more compilation inside the
                # measured rounds); no final evaluation in it
                a.compile_cache, samples, a.eval_samples = cache, a.eval_samples, 0
                for name, k, p in MODES:
                    if name in wanted:
                        run(a, name, k, p)
                a.eval_samples = samples
            modes = [run(a, name, k, p) for name, k, p in MODES if name in wanted]
            runs.append({"seed": seed, "modes": modes, **speedups(modes)})
            if len(seeds) > 1:
                print(json.dumps({"seed": seed, **speedups(modes), "final_eval_pass_at_1": {
                    m["name"]: m.get("final_eval_pass_at_1") for m in modes},
                    "behaviour_clip_fraction": {m["name"]: m.get("behaviour_clip_fraction_mean")
                                                for m in modes}}), flush=True)
    write(a, runs, {"benchmark": "flow_throughput", "backend": a.backend,
                    "host": platform.node(), "cpus": os.cpu_count(), "args": vars(a)})


def write(a, runs: list[dict], header: dict) -> None:
    """The JSON (runs pooled: modes, speedups, by_seed), the PNG beside it, a summary printed."""
    modes = pooled(runs)
    out = {**header, "seeds": [r["seed"] for r in runs], "modes": modes, **speedups(modes)}
    if len(runs) > 1:
        out["runs"] = runs
        out["by_seed"] = by_seed(runs)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    try:
        plot(out, os.path.splitext(a.json)[0] + ".png")
    except ImportError as e:  # matplotlib missing: the JSON is the result
        print(f"no plot: {e}", file=sys.stderr)
    keys = ("trajectories_per_s", "observed_max_staleness", "mean_reward", "final_eval_pass_at_1")
    print(json.dumps({m["name"]: {k: m[k] for k in keys if k in m} for m in modes}))
    print(json.dumps({k: out[k] for k in ("speedup", "steady_speedup", "by_seed") if k in out}))


def speedups(modes: list[dict]) -> dict:
    """Trajectories per second over sync's, whole run (speedup) and steady state."""
    sync = next((m for m in modes if m["name"] == "sync"), None)
    if sync is None:
        return {}
    out = {"speedup": {m["name"]: round(m["trajectories_per_s"] / sync["trajectories_per_s"], 3)
                       for m in modes}}
    if sync.get("steady_trajectories_per_s"):
        out["steady_speedup"] = {m["name"]: round(m["steady_trajectories_per_s"]
                                                  / sync["steady_trajectories_per_s"], 3)
                                 for m in modes if m.get("steady_trajectories_per_s")}
    return out


def pooled(runs: list[dict]) -> list[dict]:
    """Each mode over the seeds' runs: trajectories per second of all their episodes over all
    their wall time, rewards and final evaluations averaged (every seed has the same rounds and
    evaluation episodes), curves averaged round by round, the largest staleness seen."""
    if len(runs) == 1:
        return runs[0]["modes"]
    out = []
    for i, m0 in enumerate(runs[0]["modes"]):
        ms = [r["modes"][i] for r in runs]
        m = {"name": m0["name"], "max_staleness": m0["max_staleness"],
             "partial_rollouts": m0["partial_rollouts"], "seeds": len(ms),
             "episodes": sum(x["episodes"] for x in ms), "wall_s": sum(x["wall_s"] for x in ms),
             "observed_max_staleness": max(x["observed_max_staleness"] for x in ms)}
        m["trajectories_per_s"] = round(m["episodes"] / m["wall_s"], 3)
        if all(x.get("steady_wall_s") for x in ms):
            m["steady_trajectories_per_s"] = round(
                sum(x["steady_trajectories_per_s"] * x["steady_wall_s"] for x in ms)
                / sum(x["steady_wall_s"] for x in ms), 3)
        for k in ("mean_reward", "steady_mean_reward", "final_eval_pass_at_1",
                  "final_eval_mean_reward", "train_idle_fraction", "tis_weight_mean",
                  "tis_truncated_fraction_mean", "behaviour_clip_fraction_mean",
                  "tis_sequence_log_ratio_abs_mean"):
            if all(x.get(k) is not None for x in ms):
                m[k] = round(sum(x[k] for x in ms) / len(ms), 4)
        if all("eval_pass_at_1_vs_version" in x for x in ms):
            m["eval_pass_at_1_vs_version"] = [
                [v, round(sum(x["eval_pass_at_1_vs_version"][j][1] for x in ms) / len(ms), 4)]
                for j, (v, _) in enumerate(ms[0]["eval_pass_at_1_vs_version"])]
        for k in ("reward_vs_wall", "reward_vs_behaviour_version"):
            if all(k in x for x in ms):
                cs = [x[k] for x in ms]
                n = min(map(len, cs))  # the rounds every seed has
                m[k] = [[round(sum(c[j][0] for c in cs) / len(cs), 3),
                         round(sum(c[j][1] for c in cs) / len(cs), 4)] for j in range(n)]
        out.append(m)
    return out


def by_seed(runs: list[dict]) -> dict:
    """Each asynchronous mode against sync, seed by seed (paired: the same seed's sync run): the
    speedups' (whole run, steady state) and the reward differences' mean, standard error and
    range over the seeds."""
    def stats(xs):
        n = len(xs)
        mean = sum(xs) / n
        se = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
        return {"mean": round(mean, 4), "se": None if se is None else round(se, 4),
                "min": round(min(xs), 4), "max": round(max(xs), 4)}

    out = {}
    for i, m0 in enumerate(runs[0]["modes"]):
        if m0["name"] == "sync" or "speedup" not in runs[0]:
            continue
        pairs = [(r["modes"][i], next(m for m in r["modes"] if m["name"] == "sync")) for r in runs]
        d = {"speedup": stats([r["speedup"][m0["name"]] for r in runs])}
        if all(m0["name"] in r.get("steady_speedup", {}) for r in runs):
            d["steady_speedup"] = stats([r["steady_speedup"][m0["name"]] for r in runs])
        for k in ("mean_reward", "final_eval_pass_at_1"):
            if all(m.get(k) is not None and s.get(k) is not None for m, s in pairs):
                d[k + "_minus_sync"] = stats([m[k] - s[k] for m, s in pairs])
        if all("eval_pass_at_1_vs_version" in m and "eval_pass_at_1_vs_version" in s
               for m, s in pairs):  # the test pass@1 along the run, version by version
            d["eval_pass_at_1_vs_version_minus_sync"] = [
                [v, stats([m["eval_pass_at_1_vs_version"][j][1]
                           - s["eval_pass_at_1_vs_version"][j][1] for m, s in pairs])]
                for j, (v, _) in enumerate(m0["eval_pass_at_1_vs_version"])]
        for key, name in (("reward_vs_behaviour_version", "reward_at_behaviour_version"),
                          ("reward_vs_wall", "reward_at_wall_time")):
            if all(key in m and key in s for m, s in pairs):
                d[name + "_minus_sync"] = stats([matched_gap(m[key], s[key]) for m, s in pairs])
        out[m0["name"]] = d
    return out


def matched_gap(curve: list, sync_curve: list) -> float:
    """The mean over a mode's rounds of its reward minus sync's at the same x (sync's round
    rewards linearly interpolated, held at its ends). x = the behaviour policy version: reward
    per trajectory at equal policy age, not at equal round (an asynchronous round's trajectories
    come from policies up to max_staleness versions older); x = wall time: reward per trajectory
    at the same point of the run's time."""
    import numpy as np

    xs, ys = np.asarray(sync_curve, dtype=float).T
    x, r = np.asarray(curve, dtype=float).T
    return float(np.mean(r - np.interp(x, xs, ys)))


def merge(paths: list[str]) -> tuple[dict, list[dict]]:
    """The runs of JSON files this script wrote (one seed's, or several seeds' with "runs"):
    the first file's header and all their runs, each with the modes every run has, for
    pooling."""
    runs, first = [], None
    for path in paths:
        d = json.load(open(path))
        first = first or d
        runs += d.get("runs") or [{"seed": d["args"].get("seed"), "modes": d["modes"]}]
    common = set.intersection(*({m["name"] for m in r["modes"]} for r in runs))
    if "sync" not in common or len(common) < 2:
        raise SystemExit(f"--merge: the files share no asynchronous mode with sync: {paths}")
    runs = [{**r, "modes": [m for m in r["modes"] if m["name"] in common]} for r in runs]
    return first, [{**r, **speedups(r["modes"])} for r in runs]


def logging_quiet() -> None:
    import logging

    logging.getLogger("kat_jax").setLevel(logging.ERROR)


if __name__ == "__main__":
    main()

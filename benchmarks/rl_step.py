"""Where the time of an online RL round goes, and what pruning saves: the tiny calculator loop
(configs/rl.py:tiny_calculator, kat_jax.flow.online) run twice in one process, without pruning
and with prune.budget, both from the same random tiny model and seed.

Per run, over its rounds after the first (the first compiles):
  rollout_s / manager_s / logprob_s / train_s   median seconds per round in rollout (sampling and
                         episodes, manager included), the trajectory manager alone, trees (packing,
                         pruning) with the old and reference log-probs, optimizer steps; and their
                         shares of the round
  trajectory_tokens      tokens of the round's trajectories (what a flat trainer computes)
  tree_tokens            distinct tokens of their prefix trees
  kept_tokens            tokens kept by the pruner (= tree_tokens without pruning)
  computed_tokens        tokens laid out in rows (what the step computes, padding excluded)
and the ratios tree / trajectory, kept / tree, computed (pruned) / computed (unpruned).

    python benchmarks/rl_step.py [--rounds 4] [--budget 900] [--json FILE]

Default JSON: benchmarks/results/rl_step.json. About 5 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(rounds: int, extra: list[str]) -> dict:
    import kat_jax.flow.online  # noqa: F401  (registers the online loop)
    from kat_jax.training import config_lib
    from kat_jax.training.trainer import run_train

    minibatches = 2
    overrides = [f"--config.train.steps={rounds * minibatches}", "--config.train.log_every=1",
                 f"--config.train.checkpoint_every={rounds * minibatches}",
                 f"--config.rl.minibatches={minibatches}", *extra]
    cfg = config_lib.load_train_config(os.path.join(ROOT, "configs/rl.py:tiny_calculator"),
                                       overrides)
    with tempfile.TemporaryDirectory() as wd:
        t = time.perf_counter()
        run_train(cfg, wd)
        wall = time.perf_counter() - t
        rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl")) if x.strip()]
    tokens = {k: sum(r.get(k, 0) for r in rows) for k in
              ("total_tokens", "tree_tokens", "kept_tokens", "computed_tokens")}
    rounds_m = [r for r in rows if "rollout_time_s" in r][1:] or \
        [r for r in rows if "rollout_time_s" in r]
    med = lambda k: statistics.median(r.get(k, 0.0) for r in rounds_m)
    parts = {"rollout_s": med("rollout_time_s"), "manager_s": med("manager_time_s"),
             "logprob_s": med("logprob_time_s"), "train_s": med("train_time_s")}
    whole = parts["rollout_s"] + parts["logprob_s"] + parts["train_s"]
    return {**{k: round(v, 3) for k, v in parts.items()},
            "shares": {k: round(v / whole, 3) for k, v in parts.items()},
            "trajectory_tokens": tokens["total_tokens"], "tree_tokens": tokens["tree_tokens"],
            "kept_tokens": tokens["kept_tokens"], "computed_tokens": tokens["computed_tokens"],
            "tree_over_trajectory": round(tokens["tree_tokens"] / max(tokens["total_tokens"], 1),
                                          3),
            "kept_over_tree": round(tokens["kept_tokens"] / max(tokens["tree_tokens"], 1), 3),
            "reward": [r.get("reward") for r in rows if "reward" in r], "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--budget", type=int, default=900, help="prune.budget, tokens per group")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks/results/rl_step.json"))
    a = ap.parse_args()
    plain = run(a.rounds, [])
    pruned = run(a.rounds, [f"--config.prune.budget={a.budget}"])
    out = {"benchmark": "rl_step", "host": platform.node(), "cpus": os.cpu_count(),
           "rounds": a.rounds, "budget": a.budget, "unpruned": plain, "pruned": pruned,
           "computed_pruned_over_unpruned": round(
               pruned["computed_tokens"] / max(plain["computed_tokens"], 1), 3)}
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

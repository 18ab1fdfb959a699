"""Online RFT vs plain online RL from the same SFT checkpoint (issue 18 part 7).

On the quickstart's task (calculator_small, configs/quickstart.py): the quickstart pipeline's mid
and sft stages are trained once (DIR/base); then, per seed, a copy of them is resumed with the same
pipeline, whose finished mid / sft stages are skipped and whose rft and rl stages both start from
stage:sft (`--config.rl.model.checkpoint=stage:sft`) with the same rounds, groups, group size and
learning rate, so the only difference is RFT's teachers (relative reward, early termination).
pass@1 on the test split comes from `kat-jax eval` (subprocess) on the SFT model and on each run's
final model; generated tokens, termination rate and tokens saved come from each stage's
metrics.jsonl (kat_jax.flow.online's round metrics).

    python benchmarks/rft_vs_rl.py [--quick] [--seeds N] [--steps N] [--workdir DIR]

Writes benchmarks/results/rft_vs_rl[_quick].json and .png (pass@1 against cumulative generated
tokens; the SFT point at 0 tokens).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KAT = os.path.join(os.path.dirname(sys.executable), "kat-jax")
CONFIG = os.path.join(ROOT, "configs", "quickstart.py")
ENV = "calculator_small"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few rounds, 2 eval samples")
    p.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="train.steps of each rft / rl run (default 24, quick 8)")
    p.add_argument("--samples-per-task", type=int, default=None, help="eval K (default 4, quick 2)")
    p.add_argument("--workdir", default="/tmp/kat_rft_vs_rl")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    a.seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    a.steps = a.steps if a.steps is not None else (8 if a.quick else 24)
    a.samples_per_task = (a.samples_per_task if a.samples_per_task is not None
                          else (2 if a.quick else 4))
    for k in ("seeds", "steps", "samples_per_task"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    a.output = a.output or os.path.join(
        HERE, "results", "rft_vs_rl_quick.json" if a.quick else "rft_vs_rl.json")
    return a


def run(cmd):
    t = time.time()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out.stdout, time.time() - t


def evaluate(ckpt, out_json, a, seed=0):
    run([KAT, "eval", "--checkpoint", ckpt, "--env", ENV, "--samples-per-task",
         str(a.samples_per_task), "--max-new-tokens", "80", "--max-turns", "2",
         "--concurrency", "64", "--seed", str(seed), "--output", out_json])
    with open(out_json) as f:
        return json.load(f)["pass@1"]


def stage_metrics(stage_dir):
    rounds = []
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "generated_tokens" in m:
                rounds.append(m)
    gen = sum(m["generated_tokens"] for m in rounds)
    saved = sum(m.get("generated_tokens_saved", 0.0) for m in rounds)
    term = [m.get("termination_rate", 0.0) for m in rounds]
    return {"rounds": len(rounds), "generated_tokens": gen, "generated_tokens_saved": saved,
            "termination_rate": sum(term) / max(len(term), 1),
            "train_pass_rate": [m.get("pass_rate") for m in rounds]}


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    base = os.path.join(a.workdir, "base")
    common = [f"--config.{s}.{k}" for s in ("rft", "rl") for k in (f"train.steps={a.steps}",
              f"train.checkpoint_every={a.steps}", "rl.groups_per_round=8", "rl.group_size=8",
              "optimizer.learning_rate=0.0005")]
    common.append("--config.rl.model.checkpoint=stage:sft")
    t0 = time.time()
    if not os.path.exists(os.path.join(base, "rl", "model")):
        # mid -> sft once; its rft / rl (from stage:sft) are seed 0; other seeds copy mid / sft
        _, dt = run([KAT, "train", "--config", CONFIG, "--workdir", base] + common)
        print(f"base pipeline (mid, sft, rft, rl seed 0): {dt:.0f} s", flush=True)
    sft_pass = evaluate(os.path.join(base, "sft"), os.path.join(a.workdir, "eval_sft.json"), a)
    print(f"sft pass@1 {sft_pass:.3f}", flush=True)
    runs = []
    for seed in range(a.seeds):
        wd = os.path.join(a.workdir, f"seed{seed}")
        if seed == 0:
            wd = base
        elif not os.path.exists(os.path.join(wd, "rl", "model")):
            os.makedirs(wd, exist_ok=True)
            for s in ("mid", "sft"):
                if not os.path.exists(os.path.join(wd, s)):
                    shutil.copytree(os.path.join(base, s), os.path.join(wd, s))
            run([KAT, "train", "--config", CONFIG, "--workdir", wd] + common
                + [f"--config.{s}.train.seed={seed}" for s in ("rft", "rl")])
        for method in ("rft", "rl"):
            m = stage_metrics(os.path.join(wd, method))
            m["pass@1"] = evaluate(os.path.join(wd, method),
                                   os.path.join(wd, f"eval_{method}.json"), a, seed)
            m.update(method=method, seed=seed)
            print(json.dumps({k: m[k] for k in ("method", "seed", "pass@1", "generated_tokens",
                                                "generated_tokens_saved", "termination_rate")}),
                  flush=True)
            runs.append(m)
    summary = {}
    for method in ("rft", "rl"):
        rs = [r for r in runs if r["method"] == method]
        summary[method] = {k: sum(r[k] for r in rs) / len(rs)
                           for k in ("pass@1", "generated_tokens", "generated_tokens_saved",
                                     "termination_rate")}
    rl_final = summary["rl"]["pass@1"]
    summary["target_met"] = bool(summary["rft"]["pass@1"] >= rl_final
                                 and summary["rft"]["generated_tokens"]
                                 < summary["rl"]["generated_tokens"])
    result = {"env": ENV, "config": CONFIG, "quick": a.quick, "seeds": a.seeds, "steps": a.steps,
              "eval_samples_per_task": a.samples_per_task, "sft_pass@1": sft_pass,
              "runs": runs, "summary": summary, "wall_s": time.time() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg": os.getloadavg(), "command": " ".join(["python"] + sys.argv)}
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, a.output[:-5] + ".png")
    print(json.dumps(summary))


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, color in (("rft", "tab:blue"), ("rl", "tab:orange")):
        for r in (r for r in result["runs"] if r["method"] == method):
            ax.plot([0, r["generated_tokens"]], [result["sft_pass@1"], r["pass@1"]], "o-",
                    color=color, label=f"{method} seed {r['seed']}")
    ax.set_xlabel("generated tokens (training rollouts)")
    ax.set_ylabel("pass@1 (test split)")
    ax.set_title(f"RFT vs RL on {result['env']} from one SFT checkpoint")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

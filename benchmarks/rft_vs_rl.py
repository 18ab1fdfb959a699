"""Online RFT vs plain online RL from the same SFT checkpoint (issue 18 part 7).

On the quickstart's task (calculator_small, configs/quickstart.py; or --env maths: the quickstart's
mid stage, then SFT on the bundled maths teachers of the train split): the mid and sft stages are
trained once (DIR/base); then, per seed, three arms start from that SFT model
(`--config.stages=S --config.S.model.checkpoint=DIR/base/sft/model`) with the same rounds, groups,
group size, learning rate and seed:

  rl        the rl stage: absolute (outcome) reward
  rft       the rft stage as the quickstart runs it: reward relative to the bundled teachers
            (kat_jax.envs.teachers.relative_reward) and early termination of diverging episodes
            (rl.divergence_threshold)
  rft_sft   rft with the teachers in the loss too (rl.teacher_loss=sft, rl.teacher_coef), with
            steps of 24 trajectories in 4 rows instead of 16 in 2, so that they hold the teachers
            beside the same rollouts and each round still takes 4 optimizer steps (with the
            smaller steps it took 8, i.e. half the rounds of the others for the same train.steps)

pass@1 on the test split comes from `kat-jax eval` (subprocess, one eval seed for every model) on
the SFT model and on each run's final model; generated tokens, termination rate, tokens saved and
the per-round training pass rate come from each run's metrics.jsonl (kat_jax.flow.online's round
metrics). "Tokens to reach RL's final": the cumulative generated tokens at which an arm's
seed-averaged training pass rate (mean of two consecutive rounds) first reaches the rl arm's final
one (mean of its last two rounds).

    python benchmarks/rft_vs_rl.py [--quick] [--seeds N] [--steps N] [--arms rl,rft,rft_sft]

Writes benchmarks/results/rft_vs_rl[_maths][_quick].json and .png (training pass rate against cumulative
generated tokens; final test pass@1 against total generated tokens, the SFT point at 0 tokens).
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KAT = os.path.join(os.path.dirname(sys.executable), "kat-jax")
CONFIG = os.path.join(ROOT, "configs", "quickstart.py")
TEACHERS_MATHS = os.path.join(ROOT, "kat_jax", "assets", "data", "teachers_maths.jsonl")
# per environment: eval turns, overrides of every arm's stage, of the rft arms' stage only
ENVS = {
    "calculator_small": dict(max_turns=2, arm=[], rft=[]),
    # one reply, no tools: the episode is the answer; the bundled maths teachers (rl.teachers ''
    # = the environment's), no divergence check (nothing to compare before the answer)
    "maths": dict(max_turns=1, arm=["rl.env=maths", "rl.max_turns=1"],
                  rft=["rl.teachers=", "rl.divergence_threshold=0.0"]),
}
# arm -> (stage of configs/quickstart.py, extra stage overrides)
ARMS = {
    "rl": ("rl", []),
    "rft": ("rft", []),
    # room for the teachers (4 per task) beside the same rollouts: 24 trajectories and 4 rows
    # per step instead of 16 and 2, so a round still takes 4 optimizer steps (with the
    # quickstart's shape it took 8, i.e. half the rounds of the other arms for the same
    # train.steps) and every arm samples the same rounds
    "rft_sft": ("rft", ["rl.teacher_loss=sft", "data.rows=4", "data.trajectories=24"]),
}
EVAL_SEED = 1234


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, few rounds, 2 eval samples")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None,
                   help="train.steps of each run (default 24, quick 8)")
    p.add_argument("--samples-per-task", type=int, default=None, help="eval K (default 4, quick 2)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {sorted(ARMS)}")
    p.add_argument("--teacher-coef", type=float, default=0.1, help="rl.teacher_coef of rft_sft")
    p.add_argument("--learning-rate", type=float, default=5e-4)
    p.add_argument("--env", default="calculator_small", choices=sorted(ENVS),
                   help="calculator_small: the quickstart's SFT; maths: the quickstart's mid "
                   "stage, then SFT on the train split's bundled maths teachers")
    p.add_argument("--sft-steps", type=int, default=300, help="maths: SFT steps")
    p.add_argument("--workdir", default=None, help="default /tmp/kat_rft_vs_rl[_maths]")
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    a.seeds = a.seeds if a.seeds is not None else (1 if a.quick else 3)
    a.steps = a.steps if a.steps is not None else (8 if a.quick else 24)
    a.samples_per_task = (a.samples_per_task if a.samples_per_task is not None
                          else (2 if a.quick else 4))
    for k in ("seeds", "steps", "samples_per_task"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    a.arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in a.arms if x not in ARMS]
    if bad or "rl" not in a.arms:
        p.error(f"--arms: {bad or 'rl is required (the reference)'}; known: {sorted(ARMS)}")
    suffix = ("_maths" if a.env == "maths" else "") + ("_quick" if a.quick else "")
    a.output = a.output or os.path.join(HERE, "results", f"rft_vs_rl{suffix}.json")
    a.workdir = a.workdir or "/tmp/kat_rft_vs_rl" + ("_maths" if a.env == "maths" else "")
    return a


def run(cmd, log):
    t = time.time()
    with open(log, "w") as f:
        out = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if out.returncode:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - t


def evaluate(ckpt, out_json, a):
    if not os.path.exists(out_json):
        run([KAT, "eval", "--checkpoint", ckpt, "--env", a.env, "--samples-per-task",
             str(a.samples_per_task), "--max-new-tokens", "80",
             "--max-turns", str(ENVS[a.env]["max_turns"]),
             "--concurrency", "64", "--seed", str(EVAL_SEED), "--output", out_json],
            out_json[:-5] + ".log")
    with open(out_json) as f:
        return json.load(f)["pass@1"]


def stage_rounds(stage_dir):
    rounds = []
    with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "generated_tokens" in m:
                rounds.append(m)
    cum, curve = 0.0, []
    for m in rounds:
        cum += m["generated_tokens"]
        curve.append([cum, m.get("pass_rate")])
    term = [m.get("termination_rate", 0.0) for m in rounds]
    return {"rounds": len(rounds), "round_steps": [m.get("round_steps") for m in rounds],
            "generated_tokens": cum,
            "generated_tokens_saved": sum(m.get("generated_tokens_saved", 0.0) for m in rounds),
            "termination_rate": sum(term) / max(len(term), 1), "curve": curve,
            "teacher_nll": [m["teacher_nll"] for m in rounds if "teacher_nll" in m]}


def mean_curve(runs):
    """Seed-averaged (cumulative tokens, training pass rate) per round."""
    n = min(len(r["curve"]) for r in runs)
    return [[sum(r["curve"][i][0] for r in runs) / len(runs),
             sum(r["curve"][i][1] for r in runs) / len(runs)] for i in range(n)]


def tokens_to_reach(curve, level):
    """Cumulative tokens at which the two-round mean of the pass rate first reaches `level`."""
    for i in range(1, len(curve)):
        if (curve[i - 1][1] + curve[i][1]) / 2 >= level - 1e-9:
            return curve[i][0]
    return None


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    base = os.path.join(a.workdir, "base")
    t0 = time.time()
    if not os.path.exists(os.path.join(base, "sft", "model")):
        extra = []
        if a.env == "maths":  # SFT on the train split's teachers (the test split held out)
            train = os.path.join(a.workdir, "sft_maths_train.jsonl")
            with open(TEACHERS_MATHS) as f, open(train, "w") as g:
                g.writelines(line for line in f if json.loads(line).get("split") == "train")
            extra = [f"--config.sft.data.train_files={train}",
                     f"--config.sft.train.steps={a.sft_steps}",
                     f"--config.sft.train.checkpoint_every={a.sft_steps}"]
        dt = run([KAT, "train", "--config", CONFIG, "--workdir", base, "--config.stages=mid,sft"]
                 + extra, os.path.join(a.workdir, "base.log"))
        print(f"base (mid, sft): {dt:.0f} s", flush=True)
    sft_model = os.path.join(base, "sft", "model")
    sft_pass = evaluate(os.path.join(base, "sft"), os.path.join(a.workdir, "eval_sft.json"), a)
    print(f"sft pass@1 {sft_pass:.3f}", flush=True)
    runs = []
    for seed in range(a.seeds):
        for arm in a.arms:
            stage, extra = ARMS[arm]
            wd = os.path.join(a.workdir, f"{arm}_seed{seed}")
            over = [f"train.steps={a.steps}", f"train.checkpoint_every={a.steps}",
                    f"train.seed={seed}", "rl.groups_per_round=8", "rl.group_size=8",
                    f"optimizer.learning_rate={a.learning_rate}", f"model.checkpoint={sft_model}",
                    *extra, *ENVS[a.env]["arm"]]
            if stage == "rft":
                over += ENVS[a.env]["rft"]
            if arm == "rft_sft":
                over.append(f"rl.teacher_coef={a.teacher_coef}")
            wall = None
            if not os.path.exists(os.path.join(wd, stage, "model")):
                wall = run([KAT, "train", "--config", CONFIG, "--workdir", wd,
                            f"--config.stages={stage}"] + [f"--config.{stage}.{o}" for o in over],
                           wd + ".log")
            m = stage_rounds(os.path.join(wd, stage))
            m["pass@1"] = evaluate(os.path.join(wd, stage), os.path.join(wd, "eval.json"), a)
            m.update(arm=arm, seed=seed, train_wall_s=wall)
            print(json.dumps({k: m[k] for k in ("arm", "seed", "pass@1", "generated_tokens",
                                                "generated_tokens_saved", "termination_rate",
                                                "train_wall_s")}), flush=True)
            runs.append(m)
    if len({r["rounds"] for r in runs}) > 1:
        print("warning: the runs sampled different numbers of rounds: "
              + str({f"{r['arm']}/{r['seed']}": r["rounds"] for r in runs}), flush=True)
    summary = {}
    for arm in a.arms:
        rs = [r for r in runs if r["arm"] == arm]
        summary[arm] = {k: sum(r[k] for r in rs) / len(rs)
                        for k in ("pass@1", "generated_tokens", "generated_tokens_saved",
                                  "termination_rate")}
        summary[arm]["pass@1_per_seed"] = [r["pass@1"] for r in rs]
        summary[arm]["train_curve"] = mean_curve(rs)
    rl_curve = summary["rl"]["train_curve"]
    rl_final_train = (sum(p for _, p in rl_curve[-2:]) / len(rl_curve[-2:]))
    for arm in a.arms:
        s = summary[arm]
        s["tokens_to_reach_rl_final_train_pass"] = tokens_to_reach(s["train_curve"],
                                                                   rl_final_train)
        if arm != "rl":
            reach, rl_reach = (s["tokens_to_reach_rl_final_train_pass"],
                               summary["rl"]["tokens_to_reach_rl_final_train_pass"])
            # the target: RFT reaches RL's final pass@1 with fewer generated tokens
            s["target_met"] = bool(s["pass@1"] >= summary["rl"]["pass@1"]
                                   and reach is not None and rl_reach is not None
                                   and reach < rl_reach)
    result = {"env": a.env, "config": CONFIG, "quick": a.quick, "seeds": a.seeds, "steps": a.steps,
              "arms": a.arms, "teacher_coef": a.teacher_coef, "learning_rate": a.learning_rate,
              "eval_samples_per_task": a.samples_per_task, "eval_seed": EVAL_SEED,
              "sft_pass@1": sft_pass, "rl_final_train_pass": rl_final_train,
              "runs": runs, "summary": summary, "wall_s": time.time() - t0,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "loadavg": os.getloadavg(), "command": " ".join(["python"] + sys.argv)}
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    tmp = a.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, a.output)
    plot(result, a.output[:-5] + ".png")
    print(json.dumps({arm: {k: v for k, v in s.items() if k != "train_curve"}
                      for arm, s in summary.items()}))


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {"rl": "tab:orange", "rft": "tab:blue", "rft_sft": "tab:green"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in result["arms"]:
        curve = result["summary"][arm]["train_curve"]
        ax1.plot([0] + [t for t, _ in curve], [None] + [p for _, p in curve], "o-",
                 color=colors[arm], label=arm)
        for r in (r for r in result["runs"] if r["arm"] == arm):
            ax2.plot([0, r["generated_tokens"]], [result["sft_pass@1"], r["pass@1"]], "o-",
                     color=colors[arm], alpha=0.6,
                     label=arm if r["seed"] == 0 else None)
    ax1.set_xlabel("cumulative generated tokens")
    ax1.set_ylabel("training pass rate (mean over seeds)")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("generated tokens (training rollouts)")
    ax2.set_ylabel("pass@1 (test split, kat-jax eval)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"RFT vs RL on {result['env']} from one SFT checkpoint "
                 f"({result['seeds']} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()

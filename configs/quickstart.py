"""Quickstart: the tiny model on CPU learns the compact calculator (environment calculator_small,
kat_jax/envs/calculator.py): mid-training on the bundled tool-use data, SFT on the bundled
calculator transcripts (teachers plus give-ups without the tool: scripts/make_calculator_small_data.py),
then online RFT against the bundled teachers and online RL (kat_jax.flow.online), each stage
starting from the previous one.

    kat-jax train --config configs/quickstart.py --workdir DIR

Each stage writes DIR/<stage>/ (config.json, metrics.jsonl, TensorBoard events, checkpoints/, and
model/: the final model, loadable by `kat-jax score --checkpoint DIR/<stage>` and `kat-jax eval`).
Running again on the same DIR resumes (finished stages are skipped). Override a stage's keys as
--config.sft.train.steps=5. The RL stage's learning is measured by `kat-jax eval` on the test
split at its start (DIR/rft) and end (DIR/rl): README, "Quickstart".
"""

import os

import kat_jax
from kat_jax.training.defaults import pipeline_config, stage_config

ENV = "calculator_small"
DATA = os.path.join(os.path.dirname(kat_jax.__file__), "assets", "data")
TEACHERS = os.path.join(DATA, "teachers_calculator_small.jsonl")


def _online(stage: str, checkpoint: str):
    c = stage_config(stage, "tiny")
    c.model.checkpoint = checkpoint
    c.data.update(dict(train_files="", rows=2, row_len=1024, trajectories=16))
    c.rl.update(dict(env=ENV, groups_per_round=8, group_size=8, minibatches=2, max_turns=2,
                     max_new_tokens=80, concurrency=64))
    # the old policy is the trainer's own before the round's first update; the sampler's
    # behaviour log-probs correct the rest through the truncated importance weight and bound
    # how far a token moves past its sampling probability (loss.behaviour_clip; configs/rl.py)
    c.loss.update(dict(old_logprobs="record", tis_cap=2.0, behaviour_clip=0.28))
    c.optimizer.update(dict(learning_rate=5e-4, warmup_steps=0, schedule="constant"))
    return c


def get_config(variant: str = "tiny"):
    mid = stage_config("mid", variant)
    mid.train.update(dict(steps=10, checkpoint_every=10, log_every=5))
    sft = stage_config("sft", variant)
    sft.model.checkpoint = "stage:mid"
    sft.data.update(dict(train_files="pkg:data/sft_calculator_small.jsonl", rows=4, row_len=512,
                         trajectories=16))
    sft.train.update(dict(steps=900, checkpoint_every=900, log_every=20))
    sft.optimizer.update(dict(learning_rate=1e-2))
    rft = _online("rft", "stage:sft")
    rft.rl.update(dict(teachers=TEACHERS, divergence_threshold=0.25, groups_per_round=4,
                       group_size=4))
    rft.optimizer.learning_rate = 1e-4
    rft.train.update(dict(steps=4, checkpoint_every=4, log_every=1))
    rl = _online("rl", "stage:rft")
    rl.train.update(dict(steps=24, checkpoint_every=24, log_every=1))
    return pipeline_config([("mid", mid), ("sft", sft), ("rft", rft), ("rl", rl)])

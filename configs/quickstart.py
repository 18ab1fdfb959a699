"""Quickstart: the tiny model on CPU, on the bundled data: mid-training, then SFT from its result,
then RFT and offline RL on the bundled scored rollouts (each stage starts from the previous one).

    kat-jax train --config configs/quickstart.py --workdir DIR

Each stage writes DIR/<stage>/ (config.json, metrics.jsonl, TensorBoard events, checkpoints/, and
model/: the final model, loadable by `kat-jax score --checkpoint DIR/<stage>`). Running again on the
same DIR resumes (finished stages are skipped). Override a stage's keys as --config.sft.train.steps=5.
"""

from kat_jax.training.defaults import pipeline_config, stage_config


def get_config(variant: str = "tiny"):
    mid = stage_config("mid", variant)
    sft = stage_config("sft", variant)
    sft.model.checkpoint = "stage:mid"
    rft = stage_config("rft", variant)
    rft.model.checkpoint = "stage:sft"
    rl = stage_config("rl", variant)
    rl.model.checkpoint = "stage:rft"
    return pipeline_config([("mid", mid), ("sft", sft), ("rft", rft), ("rl", rl)])

"""RFT: clipped policy loss on rollouts with advantages relative to teacher (ground-truth) trajectories.

    kat-jax train --config configs/rft.py:VARIANT --workdir DIR [--config.train.steps=20 ...]

Offline variants (rollouts and teacher records in data.train_files): tiny (CPU, bundled data),
qwen3_0_6b, qwen3_8b, kat_dev_32b (pods; set --config.model.checkpoint to a Hugging Face or
kat_jax directory and --config.data.train_files).

Online variants (kat_jax.flow.online: the loop samples from the model it trains; the reward is
relative to the environment's bundled teacher transcripts, kat_jax.envs.teachers; episodes whose
tool calls diverge from every teacher are terminated early): tiny_calculator, tiny_maths (CPU).
Keys are documented in kat_jax/training/defaults.py and kat_jax/flow/online.py.
"""

from kat_jax.training.defaults import stage_config

ONLINE = {"tiny_calculator": "calculator", "tiny_maths": "maths"}


def get_config(variant: str = "tiny"):
    if variant not in ONLINE:
        return stage_config("rft", variant)
    c = stage_config("rft", "tiny")
    c.data.train_files = ""
    c.rl.env = ONLINE[variant]
    # the old policy is the trainer's own before the round's first update; the sampler's
    # behaviour log-probs correct the rest through the truncated importance weight
    c.loss.update(dict(old_logprobs="record", tis_cap=2.0))
    # the byte tokenizer's calculator prompt is ~790 tokens
    c.data.update(dict(rows=4, row_len=1280, trajectories=16))
    c.train.update(dict(steps=16, checkpoint_every=8, log_every=1))
    c.rl.update(dict(groups_per_round=4, group_size=4, minibatches=2, max_turns=2,
                     max_new_tokens=96, concurrency=8, divergence_threshold=0.5, patience=1))
    if ONLINE[variant] == "maths":
        c.rl.update(dict(max_turns=1, divergence_threshold=0.0))  # no tools: nothing to compare
    c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=0))
    return c

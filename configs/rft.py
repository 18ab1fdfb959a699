"""RFT: clipped policy loss on rollouts with advantages relative to teacher (ground-truth) trajectories.

    kat-jax train --config configs/rft.py:VARIANT --workdir DIR [--config.train.steps=20 ...]

Offline variants (rollouts and teacher records in data.train_files): tiny (CPU, bundled data),
qwen3_0_6b, qwen3_8b, kat_dev_32b (pods; set --config.model.checkpoint to a Hugging Face or
kat_jax directory and --config.data.train_files).

Online variants (kat_jax.flow.online: the loop samples from the model it trains; the reward is
relative to the environment's bundled teacher transcripts, kat_jax.envs.teachers):
  tiny_calculator   the calculator environment on CPU (tiny model); episodes whose tool calls
                    diverge from every teacher are terminated early
  tiny_maths        the maths environment on CPU (no tools: no early termination)
  qwen3_8b_swe      SWE tasks, Qwen3-8B shapes (pods; compile-checked), the rl stage's swe preset
                    (configs/rl.py) with the bundled swe teachers (gold patch applied, submitted)
                    in the loss: rl.teacher_loss=sft. No early termination: the teacher's path is
                    two calls, any exploring rollout would diverge from it at once
  kat_dev_32b_swe   the same at KAT-Dev-32B (Qwen3-32B) shapes
Set --config.rl.teachers to a JSONL of your own teacher transcripts (kat_jax.envs.teachers) and
--config.rl.tasks_file to their instances for real SWE training. Keys are documented in
kat_jax/training/defaults.py and kat_jax/flow/online.py.
"""

from kat_jax.training.defaults import stage_config

ONLINE = {
    "tiny_calculator": ("tiny", "calculator"),
    "tiny_maths": ("tiny", "maths"),
    "qwen3_8b_swe": ("qwen3_8b", "swe"),
    "kat_dev_32b_swe": ("kat_dev_32b", "swe"),
}


def get_config(variant: str = "tiny"):
    if variant not in ONLINE:
        return stage_config("rft", variant)
    size, env = ONLINE[variant]
    c = stage_config("rft", size)
    c.data.train_files = ""
    c.rl.env = env
    # the old policy is the trainer's own before the round's first update; the sampler's
    # behaviour log-probs correct the rest through the truncated importance weight
    c.loss.update(dict(old_logprobs="record", tis_cap=2.0))
    if size == "tiny":
        # the byte tokenizer's calculator prompt is ~790 tokens
        c.data.update(dict(rows=4, row_len=1280, trajectories=16))
        c.train.update(dict(steps=16, checkpoint_every=8, log_every=1))
        c.rl.update(dict(groups_per_round=4, group_size=4, minibatches=2, max_turns=2,
                         max_new_tokens=96, concurrency=8, divergence_threshold=0.5, patience=1))
        if env == "maths":
            c.rl.update(dict(max_turns=1, divergence_threshold=0.0))  # no tools: nothing to compare
        c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=0))
    else:  # the rl stage's swe presets (configs/rl.py), with the teachers in the loss
        c.rl.update(dict(groups_per_round=32, group_size=8, minibatches=4, max_turns=50,
                         max_new_tokens=4096, concurrency=64, split="all",
                         teacher_loss="sft", teacher_coef=0.1))
        c.train.update(dict(steps=500, checkpoint_every=20))
    return c

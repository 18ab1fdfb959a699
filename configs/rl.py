"""Agentic RL (GRPO-style): clipped policy loss on scored rollouts, group-normalised advantages.

    kat-jax train --config configs/rl.py:VARIANT --workdir DIR [--config.train.steps=20 ...]

Offline variants (train on data.train_files, rollouts sampled elsewhere): tiny (CPU, bundled
data), qwen3_0_6b, qwen3_8b, kat_dev_32b (pods; set --config.model.checkpoint to a Hugging Face
or kat_jax directory and --config.data.train_files).

Online variants (the loop samples from the model it trains: kat_jax.flow.online; rl.* keys):
  tiny_calculator   the calculator environment on CPU (tiny model; after an SFT stage in the
                    quickstart)
  tiny_maths        the maths environment on CPU
  qwen3_8b_swe      SWE tasks in docker sandboxes, Qwen3-8B shapes (pods; compile-checked)
  kat_dev_32b_swe   SWE tasks, KAT-Dev-32B (Qwen3-32B) shapes (pods; compile-checked)
Keys are documented in kat_jax/training/defaults.py and kat_jax/flow/online.py.
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
        return stage_config("rl", variant)
    size, env = ONLINE[variant]
    c = stage_config("rl", size)
    c.data.train_files = ""
    c.rl.env = env
    # the PPO ratio's old policy: the trainer's own log-probs before the round's first update
    # (the clip acts from the second minibatch on); the behaviour log-probs of the sampler
    # correct the rest through the truncated importance weight, and a token already moved 28%
    # past the sampler's probability in its advantage's direction is not pushed further (a guard
    # for asynchronous runs; synchronous, the clip against the old policy already covers it. On
    # the tiny calculator loop at rl.max_staleness 2 its effect on the final policy is not
    # measurable: benchmarks/RESULTS.md, "A trust region around the behaviour policy")
    c.loss.update(dict(old_logprobs="record", tis_cap=2.0, behaviour_clip=0.28))
    if size == "tiny":
        # the byte tokenizer's calculator prompt (system, tool schema, question) is ~790 tokens
        c.data.update(dict(rows=4, row_len=1280, trajectories=16))
        c.train.update(dict(steps=16, checkpoint_every=8, log_every=1))
        c.rl.update(dict(groups_per_round=4, group_size=4, minibatches=2, max_turns=2,
                         max_new_tokens=48, concurrency=8))
        c.optimizer.update(dict(learning_rate=1e-3, warmup_steps=0))
        if env == "maths":
            c.rl.max_turns = 1
    else:
        c.rl.update(dict(groups_per_round=32, group_size=8, minibatches=4, max_turns=50,
                         max_new_tokens=4096, concurrency=64, split="all"))
        c.train.update(dict(steps=500, checkpoint_every=20))
    return c

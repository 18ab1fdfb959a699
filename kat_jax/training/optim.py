"""Optimizer: AdamW with warmup then cosine / linear / constant decay, global-norm clipping.

    lr(step) = peak * step / warmup                                   for step < warmup
             = end + (peak - end) * decay((step - warmup) / (total - warmup))   afterwards
    decay: cosine 0.5 * (1 + cos(pi x)), linear 1 - x, constant 1;  end = peak * final_lr_ratio.

Weight decay applies to matrices (ndim >= 2), not to norm weights and biases (the usual practice in
MaxText / Megatron); embeddings are matrices and are decayed.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

DECAYS = ("cosine", "linear", "constant")


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int, decay: str = "cosine",
                  final_lr_ratio: float = 0.1) -> optax.Schedule:
    if decay not in DECAYS:
        raise ValueError(f"optimizer.schedule must be one of {DECAYS}, got {decay!r}")
    warmup_steps = max(0, int(warmup_steps))
    decay_steps = max(1, int(total_steps) - warmup_steps)
    end = learning_rate * final_lr_ratio
    if decay == "cosine":
        after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_lr_ratio)
    elif decay == "linear":
        after = optax.linear_schedule(learning_rate, end, decay_steps)
    else:
        after = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def make_optimizer(opt_cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
    """opt_cfg keys: learning_rate, warmup_steps, schedule, final_lr_ratio, b1, b2, eps,
    weight_decay, grad_clip (global norm; 0 disables)."""
    schedule = make_schedule(opt_cfg.learning_rate, opt_cfg.warmup_steps, total_steps,
                             opt_cfg.schedule, opt_cfg.final_lr_ratio)
    parts = []
    if opt_cfg.grad_clip and opt_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay,
                             mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)))
    return optax.chain(*parts), schedule

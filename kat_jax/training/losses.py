"""Losses for the four stages, over per-trajectory views gathered from the tree.

The model runs once per tree token; its log-probs and entropies [R, T] are gathered into a
per-trajectory view [N, L] with the packer's gather map (traj_index). Every loss below is then the
flat per-trajectory formula, term for term, and autodiff scatter-adds the gradients of all
trajectories that share a token into that token. Hence loss and gradient on the tree equal the sum
over trajectories of the flat computation exactly, for non-linear per-trajectory objectives too
(clipping with a different advantage per trajectory on a shared token, per-trajectory behaviour
log-probs). Denominators count tokens as the per-trajectory computation does (over trajectories).

Every loss returns (numerator, denominator) so that accumulation over microbatches or hosts gives a
true global mean: loss = sum(numerators) / sum(denominators).

Aggregation modes (as in verl):
    token-mean            sum over all masked tokens / number of masked tokens
    seq-mean-token-mean   mean over trajectories of (mean over its masked tokens)
    seq-mean-token-sum    mean over trajectories of (sum over its masked tokens)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kat_jax.trees.packing import gather_per_trajectory

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_TYPES = ("k1", "k2", "k3")
STAGES = ("mid", "sft", "rft", "rl")


# values [R, T] -> [N, L] at each trajectory's tokens (0 where traj_index < 0); numpy or jax.
gather = gather_per_trajectory


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str,
              denom_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(numerator, denominator) of per_token [N, L] under mask [N, L] by aggregation mode.

    denom_mask: the tokens the denominators count (default: mask); a superset of mask, e.g. to
    count tokens removed by pruning as the unpruned computation would."""
    mask = mask.astype(jnp.float32)
    dmask = mask if denom_mask is None else denom_mask.astype(jnp.float32)
    per_token = jnp.where(mask > 0, per_token, 0.0)
    if mode == "token-mean":
        return jnp.sum(per_token), jnp.sum(dmask)
    count = jnp.sum(dmask, axis=-1)
    seq_sum = jnp.sum(per_token, axis=-1)
    has = count > 0
    if mode == "seq-mean-token-mean":
        seq = seq_sum / jnp.maximum(count, 1.0)
    elif mode == "seq-mean-token-sum":
        seq = seq_sum
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {AGG_MODES}")
    return jnp.sum(jnp.where(has, seq, 0.0)), jnp.sum(has.astype(jnp.float32))


def lm_loss(logp: jax.Array, mask: jax.Array, mode: str = "token-mean",
            denom_mask: jax.Array | None = None):
    """Next-token negative log-likelihood. logp, mask: [N, L]."""
    return aggregate(-logp, mask, mode, denom_mask)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        return jnp.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown kl type {kind!r}; known: {KL_TYPES}")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28  # asymmetric clip ("clip-higher")
    dual_clip: float | None = 3.0  # bound on the loss for negative advantages; None: off
    tis_cap: float | None = 2.0  # truncated importance weight for rollout/trainer mismatch
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    agg_mode: str = "token-mean"


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                cfg: PolicyLossConfig, rollout_logp: jax.Array | None = None,
                ref_logp: jax.Array | None = None, entropy: jax.Array | None = None,
                denom_mask: jax.Array | None = None):
    """PPO/GRPO clipped surrogate. All per-token arrays [N, L]; advantages [N] or [N, L].

    ratio = exp(logp - old_logp); pg = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high));
    for A < 0 and dual_clip c: pg = min(pg, -c A). Truncated importance sampling: pg is multiplied by
    min(exp(old_logp - rollout_logp), tis_cap) (no gradient) when rollout log-probs are given.
    Plus kl_coef * KL(pi || ref) and minus entropy_coef * entropy. Returns (num, den, metrics).
    """
    adv = advantages[:, None] if advantages.ndim == 1 else advantages
    ratio = jnp.exp(logp - old_logp)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = jnp.maximum(pg1, pg2)
    clipped = (pg2 > pg1).astype(jnp.float32)
    if cfg.dual_clip is not None:
        pg = jnp.where(adv < 0, jnp.minimum(pg, -cfg.dual_clip * adv), pg)
    if rollout_logp is not None and cfg.tis_cap is not None:
        w = jnp.minimum(jnp.exp(old_logp - rollout_logp), cfg.tis_cap)
        pg = pg * jax.lax.stop_gradient(w)
    per_token = pg
    metrics = {}
    if cfg.kl_coef and ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, cfg.kl_type)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = aggregate(kl, mask, "token-mean")
    if cfg.entropy_coef and entropy is not None:
        per_token = per_token - cfg.entropy_coef * entropy
    if entropy is not None:
        metrics["entropy"] = aggregate(entropy, mask, "token-mean")
    metrics["clip_fraction"] = aggregate(clipped, mask, "token-mean")
    num, den = aggregate(per_token, mask, cfg.agg_mode, denom_mask)
    return num, den, metrics


def stage_loss(stage: str, logp: jax.Array, entropy: jax.Array, batch: dict,
               policy_cfg: PolicyLossConfig | None = None, agg_mode: str = "token-mean",
               count_pruned_in_denominator: bool = False):
    """The loss of a stage from per-trajectory views logp, entropy [N, L] and batch arrays:
    traj_valid, traj_trainable [N, L], traj_advantage [N], optional traj_old_logprobs,
    traj_behaviour_logprobs, traj_ref_logprobs, traj_pruned [N, L], traj_has_behaviour [N] (the
    truncated importance correction applies only to trajectories with behaviour log-probs).
    traj_pruned covers trainable tokens, so for `mid` the pruned-denominator option counts only
    those. Returns (num, den, metrics).

    mid: next-token LM on every (kept) token with a prediction; sft: on trainable tokens; rft and rl:
    the clipped policy loss on trainable tokens (RFT differs by how advantages are built: relative to
    teacher trajectories, upstream). count_pruned_in_denominator: tokens removed by pruning still
    count in the denominators (the loss is then the unpruned loss with pruned terms set to 0);
    default False (denominators count kept tokens only).
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; known: {STAGES}")
    pruned = batch.get("traj_pruned")
    extra = pruned if (count_pruned_in_denominator and pruned is not None) else None
    valid = batch["traj_valid"]
    if stage == "mid":
        first = jnp.arange(valid.shape[1]) == 0
        mask = valid & ~first[None, :]
        return (*lm_loss(logp, mask, agg_mode, None if extra is None else mask | extra), {})
    trainable = batch["traj_trainable"]
    dmask = None if extra is None else trainable | extra
    if stage == "sft":
        return (*lm_loss(logp, trainable, agg_mode, dmask), {})
    cfg = policy_cfg or PolicyLossConfig()
    old = batch.get("traj_old_logprobs")
    old = jax.lax.stop_gradient(logp) if old is None else old
    rollout = batch.get("traj_behaviour_logprobs")
    has = batch.get("traj_has_behaviour")
    if rollout is not None and has is not None:  # no correction where none were recorded
        rollout = jnp.where(has[:, None], rollout, old)
    return policy_loss(logp, old, batch["traj_advantage"], trainable, cfg,
                       rollout_logp=rollout,
                       ref_logp=batch.get("traj_ref_logprobs"), entropy=entropy, denom_mask=dmask)

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
    token-mean               sum over all masked tokens / number of masked tokens (DAPO)
    seq-mean-token-mean      mean over trajectories of (mean over its masked tokens) (GRPO, GSPO)
    seq-mean-token-sum       mean over trajectories of (sum over its masked tokens)
    seq-mean-token-sum-norm  mean over trajectories of (sum over its masked tokens) / L, with L the
                             per-trajectory view's length (data.row_len: a constant of the run), as
                             Dr. GRPO (Liu et al. 2025) divides by a constant maximum length. verl
                             divides the sum over trajectories by L instead (no mean over
                             trajectories); ours is the paper's 1/G sum_i, so a microbatch with
                             more trajectories does not weigh more.

Ratio levels (policy_loss, config loss.ratio_level):
    token            r_t = exp(logp_t - old_t), clipped per token (PPO, GRPO, DAPO)
    sequence         GSPO (Zheng et al. 2025): s_i = exp(mean over the trajectory's loss tokens of
                     (logp - old)), clipped per sequence; every loss token of trajectory i carries
                     the same clipped term with the sequence advantage A_i. Sequence statistics
                     are per row of the [N, L] view over the loss mask (pruned tokens are not in
                     it: the mean is over the kept tokens).
    sequence_token   GSPO-token: s_i,t = sg[s_i] exp(logp_t - sg[logp_t]); equal to s_i in value,
                     with the gradient s_i grad logp_t at each token (per-token advantages allowed).

Log-ratios are clamped before every exp (as verl: clamp(logp - old, -20, 20); config
loss.log_ratio_clamp): a ratio is at most e^20 and never inf or NaN; a log-ratio outside the
clamp has zero gradient (as in verl; exact inside it). The k3 KL clamps its log-ratio the same
way and its value to [-10, 10] (verl's low_var_kl; config loss.kl_clamp). k1 and k2 take no exp
and are not clamped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kat_jax.trees.batch import StepBatch
from kat_jax.trees.packing import gather_per_trajectory

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_TYPES = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence", "sequence_token")
TIS_LEVELS = ("token", "sequence")  # loss.tis_level


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
    elif mode == "seq-mean-token-sum-norm":
        seq = seq_sum / per_token.shape[-1]
    else:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; known: {AGG_MODES}")
    return jnp.sum(jnp.where(has, seq, 0.0)), jnp.sum(has.astype(jnp.float32))


def lm_loss(logp: jax.Array, mask: jax.Array, mode: str = "token-mean",
            denom_mask: jax.Array | None = None):
    """Next-token negative log-likelihood. logp, mask: [N, L]."""
    return aggregate(-logp, mask, mode, denom_mask)


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str, log_ratio_clamp: float = 20.0,
               value_clamp: float = 10.0) -> jax.Array:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1, k2, k3); [N, L].

    k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = exp(d) - d - 1 with d = ref - logp clamped to
    [-log_ratio_clamp, log_ratio_clamp] and k3 clamped to [-value_clamp, value_clamp] (verl's
    low_var_kl; exact below the clamps)."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "k3":
        d = jnp.clip(-log_ratio, -log_ratio_clamp, log_ratio_clamp)
        return jnp.clip(jnp.exp(d) - d - 1.0, -value_clamp, value_clamp)
    raise ValueError(f"unknown kl type {kind!r}; known: {KL_TYPES}")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """The policy-loss keys of the rft and rl stages (config: loss.*)."""

    eps_low: float = 0.2
    eps_high: float = 0.28  # asymmetric clip ("clip-higher")
    dual_clip: float | None = 3.0  # bound on the loss for negative advantages; None: off
    tis_cap: float | None = None  # truncated importance weight cap (old vs behaviour); None: off
    # the importance weight per token, or per trajectory (exp of the sum of the trajectory's
    # generated tokens' log-ratios: the exact correction of its probability, given to each token)
    tis_level: str = "token"
    # trust region c around the behaviour policy: no gradient for a token whose
    # exp(logp - behaviour) left [1 - c, 1 + c] in its advantage's direction; None: off
    behaviour_clip: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    ratio_level: str = "token"  # token | sequence (GSPO) | sequence_token (GSPO-token)
    log_ratio_clamp: float = 20.0  # |log-ratio| bound before every exp (ratio, k3)
    kl_clamp: float = 10.0  # |k3| bound
    # The ratio's old policy (config loss.old_logprobs): "behaviour" (batch.behaviour_logprobs: the
    # sampling policy), "record" (batch.old_logprobs; the truncated importance weight corrects
    # old vs behaviour) or "current" (the stop-gradient current log-probs: one update per batch,
    # ratio 1, the clip cannot act; behaviour enters through the importance weight only).
    old_policy: str = "behaviour"


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Everything the step's loss depends on besides data (static under jit)."""

    stage: str = "sft"
    agg_mode: str = "token-mean"
    temperature: float = 1.0
    count_pruned_in_denominator: bool = False
    policy: PolicyLossConfig = dataclasses.field(default_factory=PolicyLossConfig)
    # Compute the policy's entropy (config train.log_entropy): the `entropy` metric of every
    # stage and the entropy bonus (policy.entropy_coef > 0 needs it). False: the step's log-prob
    # pass computes no entropy and the losses get None.
    entropy: bool = True
    # RFT's teacher SFT term (config rl.teacher_coef with rl.teacher_loss=sft; 0: off): the
    # objective is the stage loss + teacher_coef * teacher_nll (teacher_term; the train step
    # normalises each term by its own global denominator, kat_jax.training.step)
    teacher_coef: float = 0.0


def _ratio(logp: jax.Array, old_logp: jax.Array, mask: jax.Array, cfg: PolicyLossConfig,
           adv_ndim: int) -> jax.Array:
    """The importance ratio [N, L] at cfg.ratio_level (module docstring)."""
    c = cfg.log_ratio_clamp
    if cfg.ratio_level == "token":
        return jnp.exp(jnp.clip(logp - old_logp, -c, c))
    if cfg.ratio_level not in RATIO_LEVELS:
        raise ValueError(f"loss.ratio_level: unknown {cfg.ratio_level!r}; known: {RATIO_LEVELS}")
    m = mask > 0
    count = jnp.sum(m, axis=-1)
    seq = jnp.sum(jnp.where(m, logp - old_logp, 0.0), axis=-1) / jnp.maximum(count, 1)  # [N]
    seq = jnp.clip(seq, -c, c)[:, None]
    if cfg.ratio_level == "sequence":
        if adv_ndim != 1:
            raise ValueError("loss.ratio_level=sequence (GSPO) needs one advantage per "
                             "trajectory ([N]); per-token advantages need sequence_token")
        return jnp.broadcast_to(jnp.exp(seq), logp.shape)
    return jnp.exp(jax.lax.stop_gradient(seq) + logp - jax.lax.stop_gradient(logp))


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                cfg: PolicyLossConfig, agg_mode: str = "token-mean",
                rollout_logp: jax.Array | None = None, ref_logp: jax.Array | None = None,
                entropy: jax.Array | None = None, denom_mask: jax.Array | None = None):
    """PPO/GRPO/GSPO clipped surrogate. All per-token arrays [N, L]; advantages [N] or [N, L]
    ([N] for ratio_level 'sequence': the sequence advantage).

    ratio r (per cfg.ratio_level, see the module docstring; log-ratios clamped to
    +-cfg.log_ratio_clamp before exp); pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));
    for A < 0 and dual_clip c: pg = min(pg, -c A). Truncated importance sampling: pg is multiplied by
    min(exp(old_logp - rollout_logp), tis_cap) (no gradient) when rollout log-probs are given,
    or with tis_level 'sequence' by min(exp(sum over the trajectory's masked tokens of
    old_logp - rollout_logp), tis_cap) (metrics tis_weight: its token mean;
    tis_truncated_fraction: the share of tokens the cap truncates; tis_sequence_log_ratio_abs:
    the trajectories' mean |sum of log-ratios|). Behaviour clip c (with rollout log-probs): a
    token whose exp(logp - rollout_logp) is above 1 + c with A > 0, or below 1 - c with A < 0,
    keeps its value and gets no gradient (metric behaviour_clip_fraction: the share of such
    tokens). Plus kl_coef * KL(pi || ref) and minus entropy_coef * entropy. Returns (num, den,
    metrics).
    """
    adv_nl = advantages[:, None] if advantages.ndim == 1 else advantages
    ratio_nl = _ratio(logp, old_logp, mask, cfg, advantages.ndim)
    pg1 = -adv_nl * ratio_nl
    pg2 = -adv_nl * jnp.clip(ratio_nl, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg_nl = jnp.maximum(pg1, pg2)
    clipped = (pg2 > pg1).astype(jnp.float32)
    if cfg.dual_clip is not None:
        pg_nl = jnp.where(adv_nl < 0, jnp.minimum(pg_nl, -cfg.dual_clip * adv_nl), pg_nl)
    metrics = {}
    if rollout_logp is not None and cfg.behaviour_clip is not None:
        # PPO's clip anchored at the sampler: a token the updates since it was sampled already
        # moved past 1 +- c in its advantage's direction keeps its loss value, loses its gradient
        bound = cfg.log_ratio_clamp
        r_b = jnp.exp(jnp.clip(logp - rollout_logp, -bound, bound))
        out = (((adv_nl > 0) & (r_b > 1.0 + cfg.behaviour_clip))
               | ((adv_nl < 0) & (r_b < 1.0 - cfg.behaviour_clip)))
        pg_nl = jnp.where(out, jax.lax.stop_gradient(pg_nl), pg_nl)
        metrics["behaviour_clip_fraction"] = aggregate(out.astype(jnp.float32), mask,
                                                       "token-mean")
    if rollout_logp is not None and cfg.tis_cap is not None:
        log_w = jnp.where(mask > 0, old_logp - rollout_logp, 0.0)
        seq = jnp.sum(log_w, axis=-1, keepdims=True)  # [N, 1]: the trajectory's log-ratio
        if cfg.tis_level == "sequence":
            log_w = jnp.broadcast_to(jnp.clip(seq, -cfg.log_ratio_clamp, cfg.log_ratio_clamp),
                                     log_w.shape)
        elif cfg.tis_level != "token":
            raise ValueError(f"loss.tis_level: unknown {cfg.tis_level!r}; known: {TIS_LEVELS}")
        raw = jnp.exp(log_w)
        w = jnp.minimum(raw, cfg.tis_cap)
        # how far whole trajectories are off the old policy (token weights near 1 can still
        # multiply to a trajectory weight far from 1): the mean |sum of log-ratios|
        metrics["tis_sequence_log_ratio_abs"] = aggregate(
            jnp.abs(seq), jnp.sum(mask, axis=-1, keepdims=True) > 0, "token-mean")
        pg_nl = pg_nl * jax.lax.stop_gradient(w)
        # how far the samples are off the old policy: the mean (truncated) weight, and the share
        # of tokens whose weight the cap truncates
        metrics["tis_weight"] = aggregate(w, mask, "token-mean")
        metrics["tis_truncated_fraction"] = aggregate((raw > cfg.tis_cap).astype(jnp.float32),
                                                      mask, "token-mean")
    per_token = pg_nl
    if cfg.kl_coef and ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, cfg.kl_type, cfg.log_ratio_clamp, cfg.kl_clamp)
        per_token = per_token + cfg.kl_coef * kl
        metrics["kl"] = aggregate(kl, mask, "token-mean")
    if cfg.entropy_coef and entropy is not None:
        per_token = per_token - cfg.entropy_coef * entropy
    metrics.update(_entropy_metric(entropy, mask))
    metrics["clip_fraction"] = aggregate(clipped, mask, "token-mean")
    num, den = aggregate(per_token, mask, agg_mode, denom_mask)
    return num, den, metrics


# ---------------------------------------------------------------------------------------------
# stage losses: (spec, logp [N, L], entropy [N, L] or None, batch: StepBatch with [N, ...]
# fields) -> (num, den, metrics); metrics hold "entropy" (mean over the loss tokens) when the
# entropy is given


def _entropy_metric(entropy: jax.Array | None, mask: jax.Array) -> dict:
    return {} if entropy is None else {"entropy": aggregate(entropy, mask, "token-mean")}


def _denominator_extra(spec: LossSpec, batch: StepBatch) -> jax.Array | None:
    """Pruned tokens the denominators also count (loss.count_pruned_in_denominator)."""
    if not spec.count_pruned_in_denominator:
        return None
    if batch.pruned is None:
        raise ValueError("loss.count_pruned_in_denominator needs batches with a pruning mask "
                         "(StepBatch.pruned)")
    return batch.pruned


def mid_loss(spec: LossSpec, logp: jax.Array, entropy: jax.Array | None,
             batch: StepBatch):
    """Next-token LM on every (kept) token with a prediction. Pruned tokens (a subset of the
    trainable ones) are what count_pruned_in_denominator adds to the denominators."""
    first = jnp.arange(batch.valid.shape[1]) == 0
    mask = batch.valid & ~first[None, :]
    extra = _denominator_extra(spec, batch)
    return (*lm_loss(logp, mask, spec.agg_mode, None if extra is None else mask | extra),
            _entropy_metric(entropy, mask))


def sft_loss(spec: LossSpec, logp: jax.Array, entropy: jax.Array | None,
             batch: StepBatch):
    """Next-token LM on trainable tokens."""
    extra = _denominator_extra(spec, batch)
    dmask = None if extra is None else batch.trainable | extra
    return (*lm_loss(logp, batch.trainable, spec.agg_mode, dmask),
            _entropy_metric(entropy, batch.trainable))


def ppo_loss(spec: LossSpec, logp: jax.Array, entropy: jax.Array | None,
             batch: StepBatch):
    """The clipped policy loss on trainable tokens. The ratio's old policy is policy.old_policy's:
    the behaviour policy (batch.behaviour_logprobs: the sampling policy is the old policy, no
    importance weight), the record's (batch.old_logprobs; the truncated importance weight
    corrects the behaviour / old mismatch) or the current policy itself (stop-gradient;
    importance weight against the behaviour log-probs). rft and rl differ only by how advantages
    were built."""
    cfg = spec.policy
    need = {"behaviour": ("behaviour_logprobs",), "record": ("old_logprobs",),
            "current": (("behaviour_logprobs",) if cfg.tis_cap is not None
                        or cfg.behaviour_clip is not None else ())}
    if cfg.old_policy not in need:
        raise ValueError(f"loss.old_logprobs: unknown old policy {cfg.old_policy!r}; known: "
                         f"{tuple(need)}")
    for field in need[cfg.old_policy]:
        if getattr(batch, field) is None:
            raise ValueError(f"stage {spec.stage}: loss.old_logprobs={cfg.old_policy} (tis_cap "
                             f"{cfg.tis_cap}, behaviour_clip {cfg.behaviour_clip}) needs the "
                             f"old-policy log-probs StepBatch.{field}")
    if cfg.old_policy == "current":
        old, rollout = jax.lax.stop_gradient(logp), batch.behaviour_logprobs
    elif cfg.old_policy == "record":
        old, rollout = batch.old_logprobs, batch.behaviour_logprobs
    else:
        old, rollout = batch.behaviour_logprobs, None
    if cfg.kl_coef and batch.ref_logprobs is None:
        raise ValueError("loss.kl_coef > 0 needs reference log-probs (StepBatch.ref_logprobs)")
    if cfg.entropy_coef and entropy is None:
        raise ValueError("loss.entropy_coef > 0 needs the entropy (train.log_entropy=True)")
    extra = _denominator_extra(spec, batch)
    dmask = None if extra is None else batch.trainable | extra
    return policy_loss(logp, old, batch.advantage, batch.trainable, cfg, spec.agg_mode,
                       rollout_logp=rollout, ref_logp=batch.ref_logprobs, entropy=entropy,
                       denom_mask=dmask)


StageLossFn = Callable[[LossSpec, jax.Array, jax.Array | None, StepBatch],
                       tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage: its loss, and whether the policy keys (loss.eps_low ...) apply."""

    loss: StageLossFn
    policy: bool = False


# The stages, registered explicitly; add one with register_stage.
STAGES: dict[str, Stage] = {
    "mid": Stage(mid_loss),
    "sft": Stage(sft_loss),
    "rft": Stage(ppo_loss, policy=True),
    "rl": Stage(ppo_loss, policy=True),
}


def register_stage(name: str, loss: StageLossFn, data_kind: str, policy: bool = False) -> None:
    """Add a stage: its loss, the data kind it reads (a key of kat_jax.data.pipeline.CONVERTERS:
    mid, chat, rollouts, or one registered there) and whether the policy keys apply."""
    from kat_jax.data.pipeline import CONVERTERS, STAGE_KIND

    if name in STAGES:
        raise ValueError(f"stage {name!r} is already registered")
    if data_kind not in CONVERTERS:
        raise ValueError(f"stage {name!r}: unknown data kind {data_kind!r}; known: "
                         f"{tuple(CONVERTERS)}")
    STAGES[name] = Stage(loss, policy)
    STAGE_KIND[name] = data_kind


TEACHER_METRIC = "teacher_nll"


def teacher_term(logp: jax.Array, batch: StepBatch) -> dict:
    """The teacher SFT term as a (numerator, denominator) metric: {"teacher_nll": (sum of
    -logp over the teacher tokens batch.teacher [N, L], their number)}, a token mean whatever
    loss.agg_mode is; {} when the batch carries no teacher field. The stage loss never includes
    it: the train step adds teacher_coef * num / (global den) (kat_jax.training.step)."""
    if batch.teacher is None:
        return {}
    return {TEACHER_METRIC: aggregate(-logp, batch.teacher, "token-mean")}


def stage_loss(spec: LossSpec, logp: jax.Array, entropy: jax.Array | None,
             batch: StepBatch):
    """The loss of spec.stage from per-trajectory views logp, entropy [N, L] (entropy None when
    spec.entropy is False) and the batch's per-trajectory fields ([N, ...]). Returns (num, den,
    metrics); metrics["entropy"] is the mean entropy over the loss tokens when it is given, and
    metrics["teacher_nll"] the teacher term (teacher_term) when the batch has teacher tokens.

    count_pruned_in_denominator: tokens removed by pruning still count in the denominators (the
    loss is then the unpruned loss with pruned terms set to 0); default False."""
    if spec.stage not in STAGES:
        raise ValueError(f"unknown stage {spec.stage!r}; known: {tuple(STAGES)}")
    num, den, metrics = STAGES[spec.stage].loss(spec, logp, entropy, batch)
    return num, den, {**metrics, **teacher_term(logp, batch)}

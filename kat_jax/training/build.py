"""A training run's pieces, built from its config: what the loop and `kat-jax compile-check` share.

    validate(cfg)                                   # every key checked before anything runs
    model_cfg = model_config_for(cfg)               # checkpoint's model config + overrides
    setup = train_step_setup(cfg, mesh, model_cfg)  # shardings, optimizer, loss, pure step (abstract)
    jit_step = jit_train_step(setup, batch_shard)   # what kat_jax.training.trainer runs
    jit_step, inputs, setup = abstract_train_setup(cfg, mesh, model_cfg)   # for .lower(*inputs)

Loss keys are never inert: a policy key set on a stage without a policy loss, a truncated
importance cap without old-policy log-probs distinct from the behaviour ones, a KL type without a
KL coefficient, or a pruned-token denominator without pruning are errors naming the key; keys that
need data (loss.kl_coef > 0: reference log-probs; loss.old_logprobs=record: old-policy log-probs)
make every record carry it (kat_jax.data.pipeline.check_record_fields, at start).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kat_jax import storage
from kat_jax.training import config_lib
from kat_jax.training.defaults import CLIP_KEYS, resolve_loss
from kat_jax.training.losses import (
    AGG_MODES,
    KL_TYPES,
    RATIO_LEVELS,
    STAGES,
    TIS_LEVELS,
    LossSpec,
    PolicyLossConfig,
)
from kat_jax.training.optim import make_optimizer
from kat_jax.training.sharding import (
    BATCH_AXES,
    batch_sharding,
    check_sharded_fraction,
    like_params,
    named,
    num_batch_shards,
    param_specs,
)
from kat_jax.training.step import init_state, make_train_step

OLD_LOGPROBS = ("behaviour", "record", "current")
# loss.* keys that only a policy loss (STAGES[stage].policy) reads
POLICY_KEYS = ("eps_low", "eps_high", "dual_clip", "tis_cap", "tis_level", "behaviour_clip",
               "kl_coef", "kl_type", "entropy_coef", "old_logprobs", "ratio_level",
               "log_ratio_clamp", "kl_clamp", "advantage_estimator", "algorithm")


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# config


def _fail(key: str, rule: str, value: Any) -> None:
    raise config_lib.ConfigError(f"--config.{key}: {rule} (got {value!r})")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Check a stage config before anything runs; ConfigError naming the key otherwise.

    loss.algorithm's preset is applied here: cfg.loss then holds the effective keys (see
    kat_jax.training.defaults.resolve_loss), which every later reader sees."""
    from kat_jax.training.defaults import ADVANTAGE_ESTIMATORS, LOSS_ALGORITHMS
    from kat_jax.training.defaults import LOSS_DEFAULTS as defaults

    if cfg.stage not in STAGES:
        _fail("stage", f"must be one of {tuple(STAGES)}", cfg.stage)
    at_least = {"train.steps": 1, "train.microbatches": 1, "train.checkpoint_every": 1,
                "train.log_every": 1, "train.keep_checkpoints": 1,
                "train.max_consecutive_skips": 1, "data.rows": 1, "data.row_len": 2,
                "data.trajectories": 1}
    for key, low in at_least.items():
        group, name = key.split(".")
        if cfg[group][name] < low:
            _fail(key, f"must be >= {low}", cfg[group][name])
    train = cfg.train
    if train.eval_every > 0 and not cfg.data.eval_files:
        _fail("train.eval_every", "needs data.eval_files (nothing to evaluate)", train.eval_every)
    if train.eval_every > 0 and train.eval_batches < 1:
        _fail("train.eval_batches", "must be >= 1", train.eval_batches)
    if cfg.data.eval_files and train.eval_every <= 0:
        _fail("data.eval_files", "is read only with train.eval_every > 0", cfg.data.eval_files)
    if train.profile_start >= 0 and train.profile_steps <= 0:
        _fail("train.profile_start", "acts only with train.profile_steps > 0", train.profile_start)
    if train.profile_steps > 0 and train.profile_start < 0:
        _fail("train.profile_steps", "needs train.profile_start >= 0", train.profile_steps)
    lc = cfg.loss
    for key, known in (("algorithm", tuple(LOSS_ALGORITHMS)), ("ratio_level", RATIO_LEVELS),
                       ("advantage_estimator", ADVANTAGE_ESTIMATORS)):
        if lc[key] not in known:
            _fail(f"loss.{key}", f"must be one of {known}", lc[key])
    if not STAGES[cfg.stage].policy:
        for key in POLICY_KEYS:
            if lc[key] != defaults[key]:
                _fail(f"loss.{key}", f"applies to the policy stages "
                      f"{tuple(k for k, s in STAGES.items() if s.policy)}, not {cfg.stage}; "
                      f"leave it at {defaults[key]!r}", lc[key])
    effective, filled = resolve_loss(lc)
    lc.update(effective)
    by = {k: f" (set by loss.algorithm={lc.algorithm})" for k in filled}
    if lc.agg_mode not in AGG_MODES:
        _fail("loss.agg_mode", f"must be one of {AGG_MODES}", lc.agg_mode)
    if lc.temperature <= 0:
        _fail("loss.temperature", "must be > 0", lc.temperature)
    if lc.kl_type not in KL_TYPES:
        _fail("loss.kl_type", f"must be one of {KL_TYPES}", lc.kl_type)
    if lc.old_logprobs not in OLD_LOGPROBS:
        _fail("loss.old_logprobs", f"must be one of {OLD_LOGPROBS}", lc.old_logprobs)
    for key, ok, rule in (("eps_low", 0 <= lc.eps_low < 1, "must be in [0, 1)"),
                          ("eps_high", lc.eps_high >= 0, "must be >= 0"),
                          ("dual_clip", lc.dual_clip == 0 or lc.dual_clip > 1,
                           "must be 0 (off) or > 1"),
                          ("tis_cap", lc.tis_cap >= 0, "must be >= 0 (0 = off)"),
                          ("behaviour_clip", 0 <= lc.behaviour_clip < 1,
                           "must be in [0, 1) (0 = off)"),
                          ("kl_coef", lc.kl_coef >= 0, "must be >= 0"),
                          ("entropy_coef", lc.entropy_coef >= 0, "must be >= 0"),
                          ("log_ratio_clamp", lc.log_ratio_clamp > 0, "must be > 0"),
                          ("kl_clamp", lc.kl_clamp > 0, "must be > 0")):
        if not ok:
            _fail(f"loss.{key}", rule, lc[key])
    k3 = lc.kl_coef > 0 and lc.kl_type == "k3"
    if lc.kl_clamp != defaults["kl_clamp"] and not k3:
        _fail("loss.kl_clamp", "bounds the k3 KL only: needs loss.kl_coef > 0 and "
              "loss.kl_type=k3", lc.kl_clamp)
    if lc.log_ratio_clamp != defaults["log_ratio_clamp"] and lc.old_logprobs == "current" \
            and not k3:
        _fail("loss.log_ratio_clamp", "acts on the ratio (with loss.old_logprobs=current it is "
              "1) and the k3 KL (off): leave it at "
              f"{defaults['log_ratio_clamp']!r}", lc.log_ratio_clamp)
    if lc.advantage_estimator != defaults["advantage_estimator"]:
        if cfg.stage != "rl":
            _fail("loss.advantage_estimator", f"applies to the rl stage (the {cfg.stage} "
                  "advantages are relative to the teacher rollouts)" + by.get(
                      "advantage_estimator", ""), lc.advantage_estimator)
    if lc.old_logprobs == "current":
        for key in CLIP_KEYS:
            if lc[key] != defaults[key]:
                _fail(f"loss.{key}", "acts only when the ratio's old policy can differ from the "
                      "current one (loss.old_logprobs=behaviour or record; with 'current' the "
                      f"ratio is 1); leave it at {defaults[key]!r}", lc[key])
    if lc.tis_cap > 0 and lc.old_logprobs == "behaviour":
        _fail("loss.tis_cap", "acts only when the old-policy log-probs differ from the "
              "behaviour ones: set loss.old_logprobs=record (records with 'old_logprobs') or "
              "current, or loss.tis_cap=0", lc.tis_cap)
    if lc.tis_level not in TIS_LEVELS:
        _fail("loss.tis_level", f"must be one of {TIS_LEVELS}", lc.tis_level)
    if lc.tis_level != defaults["tis_level"] and lc.tis_cap == 0:
        _fail("loss.tis_level", "acts only with the truncated importance weight loss.tis_cap > 0",
              lc.tis_level)
    if lc.behaviour_clip > 0 and lc.old_logprobs == "behaviour":
        _fail("loss.behaviour_clip", "bounds the ratio to the behaviour policy, which with "
              "loss.old_logprobs=behaviour the ratio's own clip (eps_low / eps_high) already "
              "does: set loss.old_logprobs=record or current, or loss.behaviour_clip=0",
              lc.behaviour_clip)
    if lc.behaviour_clip > 0 and lc.ratio_level != "token":
        _fail("loss.behaviour_clip", "is a per-token trust region: needs loss.ratio_level=token",
              lc.behaviour_clip)
    if lc.kl_type != defaults["kl_type"] and lc.kl_coef == 0:
        _fail("loss.kl_type", "acts only with loss.kl_coef > 0", lc.kl_type)
    if not train.log_entropy and lc.entropy_coef > 0:
        _fail("train.log_entropy", "False skips the entropy, which the entropy bonus "
              f"(loss.entropy_coef={lc.entropy_coef}) needs; set train.log_entropy=True or "
              "loss.entropy_coef=0", train.log_entropy)
    _validate_prune(cfg)
    if lc.count_pruned_in_denominator and cfg.prune.budget <= 0:
        _fail("loss.count_pruned_in_denominator", "needs pruning on the training path "
              "(prune.budget > 0): without it no token is pruned", lc.count_pruned_in_denominator)


def _validate_prune(cfg: ml_collections.ConfigDict) -> None:
    from kat_jax.training.defaults import PRUNE_DEFAULTS
    from kat_jax.trees.pruning import REACH_MODES
    from kat_jax.trees.trajectory import TAGS

    pc = cfg.prune
    if pc.budget < 0:
        _fail("prune.budget", "must be >= 0 (0 = no pruning)", pc.budget)
    if pc.budget == 0:
        for key, default in PRUNE_DEFAULTS.items():
            if key != "budget" and pc[key] != default:
                _fail(f"prune.{key}", "acts only with prune.budget > 0", pc[key])
        return
    if not STAGES[cfg.stage].policy:
        _fail("prune.budget", f"prunes rollout trees (rft, rl), not {cfg.stage} data", pc.budget)
    if pc.reach not in REACH_MODES:
        _fail("prune.reach", f"must be one of {REACH_MODES}", pc.reach)
    for tag in filter(None, pc.keep_tags.split(",")):
        if tag not in TAGS:
            _fail("prune.keep_tags", f"unknown tag {tag!r}; known: {sorted(TAGS)}", pc.keep_tags)


def prune_config(cfg: ml_collections.ConfigDict):
    """The pruner's config of the training path, or None (prune.budget 0)."""
    from kat_jax.trees.pruning import PruneConfig

    pc = cfg.prune
    if pc.budget <= 0:
        return None
    return PruneConfig(budget=int(pc.budget), reach=pc.reach,
                       keep_tags=tuple(filter(None, pc.keep_tags.split(","))),
                       fuse_tool_results=bool(pc.fuse_tool_results))


def preflight(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Everything about a stage config that can fail before compute: its keys (validate) and its
    data (sources opened and validated; every record carries the fields the loss keys need).
    Returns the opened sources by key ("train_files", and "eval_files" when set), which the stage
    then reads. A pipeline runs this for all its stages before the first one trains."""
    from kat_jax.data.pipeline import STAGE_KIND, check_record_fields
    from kat_jax.data.sources import open_source

    validate(cfg)
    fields, why = batch_fields(cfg)
    sources = {}
    for key in ("train_files", "eval_files"):
        if cfg.data[key]:
            sources[key] = open_source(cfg.data[key], f"data.{key}", STAGE_KIND[cfg.stage])
            check_record_fields(sources[key], fields, why)
    return sources


def loss_spec(cfg: ml_collections.ConfigDict) -> LossSpec:
    """The step's LossSpec from cfg.loss under its loss.algorithm preset (resolved as validate
    does; cfg is not changed)."""
    lc, _ = resolve_loss(cfg.loss)
    policy = PolicyLossConfig(eps_low=lc["eps_low"], eps_high=lc["eps_high"],
                              dual_clip=lc["dual_clip"] or None, tis_cap=lc["tis_cap"] or None,
                              tis_level=lc["tis_level"], behaviour_clip=lc["behaviour_clip"] or None,
                              kl_coef=lc["kl_coef"], kl_type=lc["kl_type"],
                              entropy_coef=lc["entropy_coef"], old_policy=lc["old_logprobs"],
                              ratio_level=lc["ratio_level"],
                              log_ratio_clamp=lc["log_ratio_clamp"], kl_clamp=lc["kl_clamp"])
    rl = cfg.get("rl") or {}
    teacher_coef = float(rl.get("teacher_coef", 0.0)) if rl.get("env") and rl.get(
        "teacher_loss", "none") == "sft" else 0.0  # RFT's teacher SFT term (kat_jax.flow.online)
    return LossSpec(stage=cfg.stage, agg_mode=lc["agg_mode"], temperature=lc["temperature"],
                    count_pruned_in_denominator=lc["count_pruned_in_denominator"],
                    policy=policy, entropy=cfg.train.log_entropy, teacher_coef=teacher_coef)


def batch_fields(cfg: ml_collections.ConfigDict) -> tuple[tuple[str, ...], dict[str, str]]:
    """The optional StepBatch fields this run's batches carry, and the config key behind each."""
    if not STAGES[cfg.stage].policy:
        return (), {}
    fields = ["behaviour_logprobs"]
    why = {"behaviour_logprobs": f"stage {cfg.stage}"}
    if cfg.loss.old_logprobs == "record":
        fields.append("old_logprobs")
        why["old_logprobs"] = "--config.loss.old_logprobs=record"
    if cfg.loss.kl_coef > 0:
        fields.append("ref_logprobs")
        why["ref_logprobs"] = f"--config.loss.kl_coef={cfg.loss.kl_coef}"
    rl = cfg.get("rl") or {}
    if rl.get("env") and rl.get("teacher_loss", "none") == "sft":  # online rft's teacher tokens
        fields.append("teacher")
        why["teacher"] = "--config.rl.teacher_loss=sft"
    return tuple(fields), why


def data_shards(cfg: ml_collections.ConfigDict, mesh) -> int:
    """Shard batches per microbatch (data.shards; <= 0: one per batch-parallel device group).
    Every device then holds whole shards, so every process does too (however many processes)."""
    groups = num_batch_shards(mesh)
    shards = groups if cfg.data.shards <= 0 else cfg.data.shards
    if shards % groups:
        raise TrainingError(f"--config.data.shards={shards} must be a multiple of mesh.data x "
                            f"mesh.fsdp = {groups}")
    return shards


def batch_shape(cfg: ml_collections.ConfigDict, model_cfg):
    from kat_jax.data.pipeline import BatchShape

    prune = prune_config(cfg)
    return BatchShape(cfg.data.rows, cfg.data.row_len, cfg.data.trajectories,
                      model_cfg.attention_block_size,
                      batch_fields(cfg)[0] + (("pruned",) if prune is not None else ()), prune,
                      cfg.loss.advantage_estimator)


# ---------------------------------------------------------------------------------------------
# model, tokenizer, parameters


def model_config_for(cfg: ml_collections.ConfigDict):
    from kat_jax.models.checkpoint import load_model_config

    overrides = {k: cfg.model[k] for k in ("dtype", "param_dtype", "remat_policy",
                                           "attention_impl", "attention_block_size")
                 if cfg.model[k] not in ("", 0, None)}
    try:
        return load_model_config(cfg.model.checkpoint, **overrides)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(f"model.checkpoint: {e}") from None


def tokenizer_for(cfg: ml_collections.ConfigDict):
    from kat_jax.data.tokenizer import load_tokenizer

    spec = cfg.tokenizer
    if not spec:
        spec = cfg.model.checkpoint
        if spec.startswith("preset:") or not storage.isfile(os.path.join(spec, "tokenizer.json")):
            raise TrainingError(f"tokenizer: '' means the checkpoint's tokenizer.json, and "
                                f"{cfg.model.checkpoint} has none; set tokenizer=bytes or a path")
    return load_tokenizer(spec)


def initial_params(cfg: ml_collections.ConfigDict, model_cfg, shardings) -> dict:
    """Parameters from model.checkpoint, placed with `shardings` (presets are initialised on the
    devices, already sharded)."""
    from kat_jax.models import checkpoint as ck
    from kat_jax.models.decoder import init_model
    from kat_jax.models.layers import DTYPE

    spec = cfg.model.checkpoint
    if spec.startswith("preset:"):
        seed = int(spec.split("@")[1]) if "@" in spec else 0

        def init():
            return nnx.to_pure_dict(nnx.state(init_model(model_cfg, seed), nnx.Param))

        if model_cfg.num_params() < 50_000_000:  # small: eager init (compiling it costs more)
            return jax.device_put(init(), shardings)
        return jax.jit(init, out_shardings=shardings)()  # large: born sharded on the devices
    path = ck.resolve_checkpoint_dir(spec)
    if ck.is_kat_checkpoint(path):
        from kat_jax.models.config import ModelConfig

        stored = ModelConfig.load_json(os.path.join(path, ck.CONFIG_FILE))
        params = ck.load_params(path, stored, shardings if stored.param_dtype == model_cfg.param_dtype
                                else None)
    else:
        from kat_jax.models.hf_io import read_hf_params

        params = read_hf_params(path, model_cfg)
    dtype = DTYPE[model_cfg.param_dtype]
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, dtype), s), params, shardings)


def hf_dir(cfg: ml_collections.ConfigDict) -> str | None:
    """The Hugging Face directory the run started from (its tokenizer files go with model/)."""
    from kat_jax.models import checkpoint as ck

    spec = cfg.model.checkpoint
    if spec.startswith("preset:"):
        return None
    path = ck.resolve_checkpoint_dir(spec)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


# ---------------------------------------------------------------------------------------------
# the step


@dataclasses.dataclass
class StepSetup:
    """Everything the train step needs besides data: abstract params / state and their shardings,
    the optimizer, the loss spec, and the pure step function."""

    model_cfg: Any
    graphdef: nnx.GraphDef
    abstract_params: dict
    p_shard: Any  # NamedSharding per parameter
    rep: NamedSharding  # replicated
    tx: Any
    schedule: Any
    abstract_state: dict
    state_shard: dict
    loss_spec: LossSpec
    constrain: Any
    step_fn: Any
    sharded_fraction: float


def train_step_setup(cfg: ml_collections.ConfigDict, mesh, model_cfg) -> StepSetup:
    """Shardings, optimizer and the pure train step of a stage config on `mesh` (abstract: no
    parameter is created). Fails when too much of the model stays unsharded."""
    from kat_jax.models.decoder import abstract_model

    abstract = abstract_model(model_cfg)
    graphdef = nnx.graphdef(abstract)
    specs = param_specs(abstract, mesh)
    abstract_params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    frac = check_sharded_fraction(abstract_params, specs, mesh, cfg.mesh.unsharded_tolerance)
    p_shard = named(mesh, specs)
    rep = NamedSharding(mesh, P())
    tx, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx, cfg.train.seed), abstract_params)
    state_shard = {k: rep for k in abstract_state}
    state_shard["params"] = p_shard
    state_shard["opt_state"] = like_params(abstract_state["opt_state"], abstract_params, p_shard, rep)
    spec = loss_spec(cfg)
    constrain = lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
    step_fn = make_train_step(graphdef, tx, schedule, spec, constrain)
    return StepSetup(model_cfg, graphdef, abstract_params, p_shard, rep, tx, schedule,
                     abstract_state, state_shard, spec, constrain, step_fn, frac)


def batch_shardings(batch, mesh):
    """The StepBatch of shardings for a [M, S, ...] batch (split over the batch axes at axis 1)."""
    return jax.tree.map(lambda v: batch_sharding(mesh, v.ndim), batch)


def jit_train_step(setup: StepSetup, batch_shard):
    """jax.jit of the step with state / batch shardings; the state is donated."""
    return jax.jit(setup.step_fn, in_shardings=(setup.state_shard, batch_shard),
                   out_shardings=(setup.state_shard, setup.rep), donate_argnums=0)


def abstract_train_setup(cfg: ml_collections.ConfigDict, mesh, model_cfg=None):
    """(jit_step, (abstract_state, abstract_batch), setup): the jitted train step and its inputs as
    ShapeDtypeStructs carrying their shardings, for jit_step.lower(*inputs)."""
    from kat_jax.trees.batch import empty_step_batch

    model_cfg = model_config_for(cfg) if model_cfg is None else model_cfg
    setup = train_step_setup(cfg, mesh, model_cfg)
    shards = data_shards(cfg, mesh)
    m = cfg.train.microbatches
    s = batch_shape(cfg, model_cfg)
    example = empty_step_batch(s.rows, s.row_len, s.trajectories, s.row_len, s.fields,
                               s.num_pairs)  # one shard batch, as the pipeline yields it
    batch = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct((m, shards, *v.shape), v.dtype,
                                       sharding=batch_sharding(mesh, v.ndim + 2)), example)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         setup.abstract_state, setup.state_shard)
    return jit_train_step(setup, batch_shardings(batch, mesh)), (state, batch), setup


def init_or_restore_state(setup: StepSetup, cfg, model_cfg, restore) -> tuple[dict, int]:
    """(state, start step): restored by `restore(target)` -> (state, step) | None when a
    checkpoint exists, else initial parameters with the optimizer state born sharded."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          setup.abstract_state, setup.state_shard)
    restored = restore(target)
    if restored is not None:
        return restored
    params = initial_params(cfg, model_cfg, setup.p_shard)
    state = jax.jit(lambda p: init_state(p, setup.tx, cfg.train.seed),
                    out_shardings=setup.state_shard, donate_argnums=0)(params)
    return state, 0


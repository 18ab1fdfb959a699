"""Online agentic RL: rollout -> trajectory manager -> trees -> old / reference log-probs ->
minibatch updates -> weight sync, repeated (synchronous, on-policy).

    kat-jax train --config configs/rl.py:tiny_calculator --workdir DIR

The rl stage runs this loop when `rl.env` names an environment (kat_jax.envs); with rl.env ''
it trains offline on data.train_files (kat_jax.training.trainer). One round:

 1. Rollout. rl.groups_per_round tasks of the environment's rl.split (the next ones of a
    per-epoch shuffle of the tasks, seeded by train.seed), rl.group_size episodes each (at most
    rl.max_turns turns of at most rl.max_new_tokens tokens, rl.max_tokens per trajectory, 0 =
    data.row_len; sampled at rl.temperature = loss.temperature), run by the
    existing agent loop (kat_jax.rollout.agent.run_episode) with rl.concurrency episodes at a
    time, against the in-process sampler (kat_jax.rollout.sampler.JaxEngine) holding the current
    parameters: the trainer's arrays are handed to it on device (update_weights: no host copy, no
    recompilation). With rl.rollout_devices = k > 0 the sampler is an EngineFleet
    (kat_jax.flow.placement) of one replica on each of the last k devices, the training mesh
    takes the others, and each update is copied device to device to every replica; with
    rl.lend_train_devices every training device also holds a replica that takes calls only while
    the trainer waits for the round (own rollout devices first); metrics placement/*.
    rl.rollout_replica_devices > 1 groups those devices into tensor-parallel replicas of that
    many devices each (models larger than one device).
 2. The trajectory manager (kat_jax.flow.TrajectoryManager) receives one record per model call
    (the engine the agents use reports each call: prompt ids, generated ids, behaviour log-probs,
    entropies, policy version) and each episode's outcome, rebuilds the trajectories by token
    prefix, groups them by task and computes the advantages (loss.advantage_estimator, default
    GRPO). A group with an env_error episode is masked (counted). Agents never see the trainer:
    the loop talks to the sampler and the manager through their APIs only.
 DAPO's dynamic sampling (rl.dynamic_sampling): groups whose rewards are all equal (and masked
    ones) are dropped and more tasks drawn until the round has rl.groups_per_round groups, at
    most rl.max_draws draws (then an error: the tasks cannot fill a round). Its overlong
    filtering (rl.overlong_filter): trajectories that ran out of tokens are dropped after the
    advantages were computed.
 3. Trees. The round's groups, split into rl.minibatches parts in order, go through the data
    pipeline (kat_jax.data.pipeline: packed prefix trees, the train step's fixed shapes); a part
    that needs more than one step batch trains as several steps (logged as `round_steps`).
 4. Old and reference log-probs. Before the first update of the round, one forward (no
    gradient) per step batch with the current parameters gives the PPO ratio's old policy
    (loss.old_logprobs=record: StepBatch.old_logprobs; the behaviour log-probs stay separate for
    the truncated importance weight loss.tis_cap), and, when a reference is configured
    (loss.kl_coef > 0), one with the frozen reference parameters (rl.reference: '' = the stage's
    starting checkpoint model.checkpoint) gives StepBatch.ref_logprobs; `kl_ref`, the mean k3 KL of
    the current policy to the reference on the trained tokens, is logged every round then.
 5. rl.epochs passes of the minibatches, one optimizer step each (from the second on, the ratio
    differs from 1 and the clip acts: clip_fraction is real).

RFT (stage rft): the reward is relative to the task's teachers (kat_jax.flow.rounds.run_round),
and with rl.teacher_loss=sft each group's teacher transcripts join it after the advantages and the
round's filters (_teacher_records: chat-rendered like the rollouts, so they share the prompt in
the tree; StepBatch.teacher marks their assistant tokens), adding rl.teacher_coef x their mean
NLL to the loss (kat_jax.training.step.teacher_weight); metric teacher_nll.

Asynchronous (rl.max_staleness = k > 0; kat_jax.flow.async_rollout): the rollouts of later
rounds run in background threads while the trainer trains, each token at most k policy versions
behind the trainer (admission control, nothing discarded); rl.partial_rollouts lets a weight
update reach episodes in flight at their next model call. Each call keeps the version that
produced it; the correction is the loss's (loss.old_logprobs=record with loss.tis_cap: decoupled
PPO; behaviour: PPO against the behaviour policy). k = 0 is this synchronous loop. Extra metrics:
staleness_max / mean / hist_<s>, queue_*, weight_updates, drain_time_s, overlap; every run logs
train_wait_s, train_idle_fraction and rollout_idle_fraction.

Steps: train.steps counts optimizer steps. Checkpoints are taken at round ends only (every round
that crosses a train.checkpoint_every boundary, and the last); the manager holds nothing between
rounds (synchronous), so resuming restarts at the next round: the rollouts of a round depend only
on the parameters, train.seed and the round index, so a resumed run logs the same losses as one
that never stopped (tested with rl.concurrency 1; concurrent episodes batch differently and agree
up to float rounding). SIGTERM and train.stop_at_step act at the end of the round that reaches
them.

Metrics of a round (on its last step): reward, pass_rate, status_<name> counts, turns, draws,
dropped_uniform_groups, overlong_filtered,
tool_calls_per_turn, generated_tokens, trajectory / tree tokens of the round, masked_groups,
rollout_time_s (manager_time_s of it), logprob_time_s (trees: packing and pruning, then the
old / reference log-probs), train_time_s, policy_version (the round index), kl_ref, and
old_behaviour_max_abs: the largest difference between the trainer's old-policy log-probs and the
sampler's behaviour log-probs of the same tokens under the same parameters (0 up to float
rounding: anything larger means the two disagree).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from kat_jax import storage
from kat_jax.flow.placement import EngineFleet, sampler_model, split_devices
from kat_jax.flow.rounds import (  # noqa: F401 - part of this module's API
    _ReportingEngine,
    _task_order,
    draw_tasks,
    round_episodes,
    round_tasks,
    run_round,
)
from kat_jax.multihost import StopRequests
from kat_jax.training import config_lib
from kat_jax.training.build import (
    TrainingError,
    batch_shardings,
    data_shards,
    hf_dir,
    init_or_restore_state,
    initial_params,
    jit_train_step,
    model_config_for,
    prune_config,
    tokenizer_for,
    train_step_setup,
)
from kat_jax.training.checkpointing import Checkpoints, export_model, model_exported
from kat_jax.training.defaults import FLEET_DEFAULTS, RL_DEFAULTS
from kat_jax.training.progress import StepLogger
from kat_jax.training.sharding import local_shard_ids, mesh_from_config
from kat_jax.training.step import forward_logprobs
from kat_jax.trees.batch import merge_leading
from kat_jax.trees.packing import gather_per_trajectory

log = logging.getLogger(__name__)

MAX_EMPTY_ROUNDS = 3  # rounds in a row without a trainable group: the environment is broken


def is_online(cfg) -> bool:
    return "rl" in cfg and bool(cfg.rl.env)


def _fail(key: str, rule: str, value: Any) -> None:
    raise config_lib.ConfigError(f"--config.{key}: {rule} (got {value!r})")


RFT_KEYS = ("teachers", "w_outcome", "w_process", "w_answer", "divergence_threshold", "patience",
            "on_terminate", "termination_penalty", "teacher_loss", "teacher_coef")
TEACHER_LOSSES = ("none", "sft")  # rl.teacher_loss; "off_policy" is reserved (an error)


def _validate_rft_keys(cfg) -> None:
    rl = cfg.rl
    if cfg.stage != "rft":
        for key in RFT_KEYS:
            if rl[key] != RL_DEFAULTS[key]:
                _fail(f"rl.{key}", "acts only in the online rft stage (teachers)", rl[key])
        return
    if not 0 <= rl.divergence_threshold < 1:
        _fail("rl.divergence_threshold", "must be in [0, 1) (0 = no early termination)",
              rl.divergence_threshold)
    if rl.patience < 1:
        _fail("rl.patience", "must be >= 1", rl.patience)
    if rl.on_terminate not in ("mask", "penalty"):
        _fail("rl.on_terminate", "must be mask or penalty", rl.on_terminate)
    if rl.divergence_threshold == 0:
        for key in ("patience", "on_terminate", "termination_penalty"):
            if rl[key] != RL_DEFAULTS[key]:
                _fail(f"rl.{key}", "acts only with rl.divergence_threshold > 0", rl[key])
    elif rl.on_terminate == "mask" and rl.termination_penalty != RL_DEFAULTS[
            "termination_penalty"]:
        _fail("rl.termination_penalty", "acts only with rl.on_terminate=penalty",
              rl.termination_penalty)
    if rl.teachers and not storage.exists(rl.teachers):
        _fail("rl.teachers", "no such file", rl.teachers)
    _validate_teacher_loss(cfg)


def _validate_teacher_loss(cfg) -> None:
    """rl.teacher_loss / rl.teacher_coef (online rft: teachers in the loss)."""
    rl = cfg.rl
    if rl.teacher_loss == "off_policy":
        _fail("rl.teacher_loss", "off_policy (teachers as importance-weighted samples) is not "
              "implemented in this version; use sft (or none)", rl.teacher_loss)
    if rl.teacher_loss not in TEACHER_LOSSES:
        _fail("rl.teacher_loss", f"must be one of {TEACHER_LOSSES}", rl.teacher_loss)
    if rl.teacher_loss == "none":
        if rl.teacher_coef != RL_DEFAULTS["teacher_coef"]:
            _fail("rl.teacher_coef", "acts only with rl.teacher_loss=sft", rl.teacher_coef)
        return
    if not rl.teacher_coef > 0:
        _fail("rl.teacher_coef", "must be > 0 with rl.teacher_loss=sft", rl.teacher_coef)
    if cfg.prune.budget > 0:
        _fail("rl.teacher_loss", "sft does not combine with pruning on the training path "
              f"(prune.budget={cfg.prune.budget}) in this version; set prune.budget=0",
              rl.teacher_loss)


def _validate_fleet(cfg) -> None:
    """fleet.*: checked by kat_jax.flow.ray_fleet.fleet_options (a ValueError naming fleet.KEY)."""
    import re

    from kat_jax.flow.ray_fleet import fleet_options

    try:
        fleet_options(cfg)
    except ValueError as e:
        m = re.match(r"fleet\.(\w+)", str(e))
        key = m.group(1) if m else "backend"
        raise config_lib.ConfigError(f"--config.fleet.{key}: {e}") from None


def validate_online(cfg) -> None:
    """The rl.* keys: an error naming the key when one is bad or could not act."""
    from kat_jax.envs import ENVS

    if "rl" not in cfg:
        return
    rl = cfg.rl
    if not rl.env:
        for key, default in RL_DEFAULTS.items():
            if key != "env" and rl[key] != default:
                _fail(f"rl.{key}", "acts only in the online loop (set rl.env to an environment)",
                      rl[key])
        for key, default in FLEET_DEFAULTS.items():
            if "fleet" in cfg and cfg.fleet.get(key, default) != default:
                _fail(f"fleet.{key}", "acts only in the online loop (set rl.env to an "
                      "environment)", cfg.fleet[key])
        return
    _validate_fleet(cfg)
    if cfg.stage not in ("rl", "rft"):
        _fail("rl.env", f"the online loop trains the rl or rft stage; stage is {cfg.stage!r}",
              rl.env)
    _validate_rft_keys(cfg)
    if rl.env not in ENVS:
        _fail("rl.env", f"unknown environment; known: {sorted(ENVS)}", rl.env)
    if rl.tasks_file and not storage.exists(rl.tasks_file):
        _fail("rl.tasks_file", "no such file", rl.tasks_file)
    if cfg.data.train_files:
        _fail("data.train_files", "is not read by the online loop (rl.env is set); set it to ''",
              cfg.data.train_files)
    for key, default in (("shuffle", True), ("seed", 0), ("epochs", -1), ("eval_files", "")):
        if cfg.data[key] != default:
            _fail(f"data.{key}", "is not read by the online loop (rl.env is set: the tasks come "
                  "from the environment, in an order seeded by train.seed); leave it at "
                  f"{default!r}", cfg.data[key])
    for key, low in (("groups_per_round", 1), ("group_size", 1), ("minibatches", 1),
                     ("epochs", 1), ("max_turns", 1), ("max_new_tokens", 1), ("concurrency", 1)):
        if rl[key] < low:
            _fail(f"rl.{key}", f"must be >= {low}", rl[key])
    if not 0 <= rl.rollout_devices < jax.device_count():
        _fail("rl.rollout_devices", f"must be in [0, {jax.device_count()}): the training mesh "
              f"keeps at least one of the {jax.device_count()} devices", rl.rollout_devices)
    k = rl.rollout_replica_devices
    if k < 1:
        _fail("rl.rollout_replica_devices", "must be >= 1", k)
    if k > 1:
        if not rl.rollout_devices and not rl.lend_train_devices:
            _fail("rl.rollout_replica_devices", "needs rl.rollout_devices > 0 or "
                  "rl.lend_train_devices (time-shared sampling uses the training mesh)", k)
        if rl.rollout_devices % k:
            _fail("rl.rollout_replica_devices", f"must divide rl.rollout_devices="
                  f"{rl.rollout_devices}", k)
        if rl.lend_train_devices and (jax.device_count() - rl.rollout_devices) % k:
            _fail("rl.rollout_replica_devices", f"must divide the "
                  f"{jax.device_count() - rl.rollout_devices} training devices that "
                  "rl.lend_train_devices lends", k)
    if rl.groups_per_round % rl.minibatches:
        _fail("rl.minibatches", f"must divide rl.groups_per_round={rl.groups_per_round}",
              rl.minibatches)
    if rl.max_tokens < 0 or rl.max_tokens > cfg.data.row_len:
        _fail("rl.max_tokens", f"must be in [0, data.row_len={cfg.data.row_len}] (0 = "
              "data.row_len): a longer trajectory could not be laid out in a row", rl.max_tokens)
    if rl.temperature != cfg.loss.temperature:
        _fail("rl.temperature", f"must equal loss.temperature={cfg.loss.temperature}: the "
              "behaviour log-probs are taken at the sampling temperature", rl.temperature)
    if rl.split not in ("train", "test", "all"):
        _fail("rl.split", "must be train, test or all", rl.split)
    if rl.max_draws < 1:
        _fail("rl.max_draws", "must be >= 1", rl.max_draws)
    if rl.max_draws != RL_DEFAULTS["max_draws"] and not rl.dynamic_sampling:
        _fail("rl.max_draws", "acts only with rl.dynamic_sampling=True", rl.max_draws)
    if rl.dynamic_sampling and rl.group_size < 2:
        _fail("rl.dynamic_sampling", "needs rl.group_size >= 2 (a group of one never has "
              "rewards that differ)", rl.dynamic_sampling)
    if rl.reference and cfg.loss.kl_coef == 0:
        _fail("rl.reference", "acts only with loss.kl_coef > 0", rl.reference)
    if rl.reference and not rl.reference.startswith("preset:") and not storage.exists(
            rl.reference):
        _fail("rl.reference", "no such checkpoint (a kat_jax checkpoint, training workdir or "
              "Hugging Face directory)", rl.reference)
    if rl.max_staleness < 0:
        _fail("rl.max_staleness", "must be >= 0 (0 = the synchronous loop)", rl.max_staleness)
    if rl.partial_rollouts and rl.max_staleness == 0:
        _fail("rl.partial_rollouts", "acts only with rl.max_staleness > 0 (the synchronous loop "
              "never updates weights during a round)", rl.partial_rollouts)
    if rl.max_staleness > 0 and rl.dynamic_sampling:
        _fail("rl.max_staleness", "the asynchronous loop does not do rl.dynamic_sampling in this "
              "version; set one of them off", rl.max_staleness)
    if rl.max_staleness > 0 and cfg.loss.old_logprobs == "record" and cfg.loss.tis_cap <= 0:
        _fail("rl.max_staleness", "with loss.old_logprobs=record (decoupled PPO) stale samples "
              "need the truncated importance weight loss.tis_cap > 0 against their behaviour "
              "log-probs, or use loss.old_logprobs=behaviour", rl.max_staleness)
    if rl.epochs > 1 and cfg.loss.old_logprobs == "current":
        _fail("rl.epochs", "with loss.old_logprobs=current every pass has ratio 1; use record",
              rl.epochs)


# ---------------------------------------------------------------------------------------------
# rollouts through the manager


class RecordGroups:
    """An in-memory source of rollout groups for kat_jax.data.pipeline (kind "rollouts")."""

    kind = "rollouts"

    def __init__(self, groups: list[list[dict]], where: str):
        from kat_jax.data.sources import VALIDATORS

        self.groups = []
        for gi, g in enumerate(groups):
            items = []
            for ri, rec in enumerate(g):
                w = f"{where}:group {gi}:record {ri}"
                VALIDATORS["rollouts"](rec, w)
                items.append((rec, w))
            self.groups.append(items)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        return self.groups[i]


def make_logprob_fn(graphdef, temperature: float, constrain):
    """(params, batch [M, S, ...]) -> per-trajectory log-probs [M, S, N, L] (no gradient)."""

    def one(params, mb):
        model = nnx.merge(graphdef, params)
        s, r, t = mb.tokens.shape
        logp_bt, _ = forward_logprobs(model, merge_leading(mb), temperature, constrain,
                                      entropy=False)
        return jax.vmap(gather_per_trajectory)(logp_bt.reshape(s, r, t), mb.traj_index)

    def fn(params, batch):
        return jax.lax.map(lambda mb: one(params, mb), batch)

    return fn


def _k3(logp: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float | None:
    lr = np.clip(logp - ref, -20, 20)
    k3 = np.exp(-lr) + lr - 1.0
    n = mask.sum()
    return float((k3 * mask).sum() / n) if n else None


class _RoundState:
    """The checkpointed loop position (the orbax 'data' item): rounds done, tasks drawn."""

    def __init__(self):
        self.rounds = 0
        self.drawn = 0

    def get_state(self) -> dict:
        return {"rounds": self.rounds, "drawn": self.drawn}

    def set_state(self, state: dict) -> None:
        self.rounds, self.drawn = int(state["rounds"]), int(state["drawn"])


def _varied(group: list[dict]) -> bool:
    """The group can teach something: not masked, and its rewards are not all equal."""
    if any(r.get("status") == "env_error" for r in group):
        return False
    return len({r.get("reward") for r in group}) > 1


def collect_groups(engine, cfg, tasks, tokenizer, position: _RoundState, advantage: str,
                   teachers: dict | None = None, runner=None):
    """The round's groups: one draw of rl.groups_per_round tasks, or with rl.dynamic_sampling
    (DAPO) as many draws as it takes (at most rl.max_draws) to collect rl.groups_per_round
    groups whose rewards differ (the others are dropped and counted). rl.overlong_filter drops
    the trajectories that ran out of tokens (status max_tokens / context_limit) after the
    advantages were computed, so they neither teach nor shift their group's baseline (DAPO's
    overlong filtering). runner: run_round's stand-in (the asynchronous loop hands over a
    round sampled in the background). Returns (groups, episodes, stats)."""
    rl = cfg.rl
    want = rl.groups_per_round
    groups, episodes = [], []
    stats = {"masked_groups": 0, "dropped_uniform_groups": 0, "overlong_filtered": 0,
             "draws": 0}
    while len(groups) < want:
        if stats["draws"] >= (rl.max_draws if rl.dynamic_sampling else 1):
            raise TrainingError(
                f"rl.dynamic_sampling: after {stats['draws']} draws (rl.max_draws) only "
                f"{len(groups)} of rl.groups_per_round={want} groups had rewards that differ; "
                "the tasks are too easy or too hard for the policy (raise rl.max_draws or "
                "rl.group_size, or turn dynamic sampling off)")
        n = want - len(groups)
        start = position.drawn
        drawn = draw_tasks(tasks, cfg.train.seed, start, n)
        position.drawn += n
        got, eps, ms = (runner or run_round)(
            engine, cfg, drawn, tokenizer, position.rounds, advantage,
            seed=(cfg.train.seed * 1_000_003 + start) % (2**31), teachers=teachers)
        stats["draws"] += 1
        stats["masked_groups"] += ms.get("masked_groups", 0)
        for k in ("terminated", "terminated_masked"):
            if k in ms:
                stats[k] = stats.get(k, 0) + ms[k]
        stats["manager_time_s"] = stats.get("manager_time_s", 0.0) + ms.get("manager_time_s", 0.0)
        episodes += eps
        if rl.dynamic_sampling:
            keep = [g for g in got if _varied(g)]
            stats["dropped_uniform_groups"] += len(got) - len(keep)
            got = keep
        groups += got
        if not rl.dynamic_sampling:
            break
    if rl.overlong_filter:
        out = []
        for g in groups:
            kept = [r for r in g if r.get("status") not in ("max_tokens", "context_limit")]
            stats["overlong_filtered"] += len(g) - len(kept)
            if kept:
                out.append(kept)
        groups = out
    return groups, episodes, stats


def online_stage(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train the rl stage online (see the module docstring)."""
    from kat_jax.data.pipeline import BatchShape, make_step_iterator
    from kat_jax.rollout.sampler import EngineConfig, JaxEngine

    validate_online(cfg)
    if jax.process_count() > 1:
        raise TrainingError("rl.env: the online loop runs on one host in this version")
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    rl = cfg.rl
    model_cfg, tokenizer = model_config_for(cfg), tokenizer_for(cfg)
    tasks = _load_tasks(rl)
    if rl.groups_per_round > len(tasks):
        _fail("rl.groups_per_round", f"exceeds the {len(tasks)} tasks of {rl.env} "
              f"(split {rl.split})", rl.groups_per_round)
    teachers = _load_teachers(cfg, tasks) if cfg.stage == "rft" else None
    train_devices, rollout_devices = split_devices(
        jax.devices(), jax.device_count() - rl.rollout_devices, rl.rollout_devices)
    mesh = mesh_from_config(cfg.mesh, devices=train_devices)
    shards = data_shards(cfg, mesh)
    shard_ids = local_shard_ids(mesh, shards)
    prune = prune_config(cfg)
    teacher_records = _teacher_records(cfg, teachers, tokenizer)
    shape = BatchShape(cfg.data.rows, cfg.data.row_len, cfg.data.trajectories,
                       model_cfg.attention_block_size,
                       ("behaviour_logprobs",) + (("pruned",) if prune is not None else ())
                       + (("teacher",) if teacher_records is not None else ()), prune)
    config_lib.save_config(cfg, os.path.join(workdir, "config.json"))
    model_cfg.save_json(os.path.join(workdir, "model_config.json"))
    setup = train_step_setup(cfg, mesh, model_cfg)
    position = _RoundState()
    ckpts = Checkpoints(workdir, cfg.train, position)
    state, start = init_or_restore_state(setup, cfg, model_cfg, ckpts.restore)
    if start >= cfg.train.steps and model_exported(workdir):
        ckpts.close()
        return {"workdir": workdir, "step": start, "status": "already finished"}
    reference = None
    if cfg.loss.kl_coef > 0:
        ref_cfg = cfg.copy_and_resolve_references()
        if rl.reference:
            with ref_cfg.unlocked():
                ref_cfg.model.checkpoint = rl.reference
        reference = initial_params(ref_cfg, model_cfg, setup.p_shard)
    engine_cfg = EngineConfig(max_batch=max(8, rl.concurrency))
    if rollout_devices or rl.lend_train_devices:
        lend = train_devices if rl.lend_train_devices else []
        # the episodes' concurrent calls spread over the replicas (own devices first, then lent)
        k = rl.rollout_replica_devices
        slots = -(-rl.concurrency // ((len(rollout_devices) + len(lend)) // k))
        engine = EngineFleet(model_cfg, state["params"], rollout_devices, lend_devices=lend,
                             engine_config=engine_cfg, slots=slots, replica_devices=k)
    else:
        engine = JaxEngine(sampler_model(model_cfg, state["params"]), engine_cfg)
    logprob_fn = jax.jit(make_logprob_fn(setup.graphdef, cfg.loss.temperature, setup.constrain))
    jit_step = None
    advantage = cfg.loss.get("advantage_estimator", "grpo")
    stop, logger = StopRequests(), StepLogger(cfg, workdir, start, model_cfg)
    step = start
    record_old = cfg.loss.old_logprobs == "record"
    per_part = rl.groups_per_round // rl.minibatches
    empty_rounds = 0
    flow = None
    if _asynchronous(cfg):
        from kat_jax.flow.async_rollout import AsyncRollouts

        flow = AsyncRollouts(engine, cfg, tasks, tokenizer, advantage, teachers, position.rounds)
    try:
        while step < cfg.train.steps:
            r = position.rounds
            t0 = time.perf_counter()
            fm: dict[str, Any] = {}
            if isinstance(engine, EngineFleet):
                engine.trainer_waiting(True)     # lent training devices sample until trained on
            if flow is None:
                engine.update_weights(state["params"])
                groups, episodes, mstats = collect_groups(engine, cfg, tasks, tokenizer,
                                                          position, advantage, teachers)
            else:
                flow.publish(r, state["params"])

                def from_flow(*args, **kwargs):
                    got, eps, ms, fm0 = flow.get(r)
                    fm.update(fm0)
                    return got, eps, ms

                rollout_busy0 = flow.busy_s()
                groups, episodes, mstats = collect_groups(engine, cfg, tasks, tokenizer,
                                                          position, advantage, teachers,
                                                          runner=from_flow)
            if isinstance(engine, EngineFleet):
                engine.trainer_waiting(False)
                fm.update(_placement_metrics(engine))
            if teacher_records is not None:
                groups = teacher_records(groups)
            t1 = time.perf_counter()
            busy = (rollout_busy0, flow.busy_s()) if flow is not None else (0.0, 0.0)
            batches = []
            for p in range(rl.minibatches):
                part = groups[p * per_part:(p + 1) * per_part]
                if not part:
                    continue
                it = make_step_iterator(RecordGroups(part, f"round {r}"), "rl", tokenizer, shape,
                                        model_cfg.vocab_size, cfg.train.microbatches,
                                        len(shard_ids), shuffle=False, epochs=1,
                                        shard_ids=shard_ids, num_shards=shards)
                batches += list(it)
            kl_ref, drift = None, []
            full = []
            for batch, stats in batches:
                extra = {}
                if record_old:
                    extra["old_logprobs"] = np.asarray(logprob_fn(state["params"], batch))
                    gen = np.asarray(batch.trainable)
                    if gen.any():  # the sampler's numbers vs the trainer's, same parameters
                        drift.append(float(np.abs(extra["old_logprobs"] - np.asarray(
                            batch.behaviour_logprobs))[gen].max()))
                if reference is not None:
                    extra["ref_logprobs"] = np.asarray(logprob_fn(reference, batch))
                full.append((batch.replace(**extra), stats))
            if reference is not None and full:
                cur = [np.asarray(logprob_fn(state["params"], b)) if not record_old
                       else b.old_logprobs for b, _ in full]
                kls = [_k3(c, b.ref_logprobs, b.trainable) for c, (b, _) in zip(cur, full)]
                kls = [k for k in kls if k is not None]
                kl_ref = float(np.mean(kls)) if kls else None
            t2 = time.perf_counter()
            round_metrics = _round_metrics(episodes, mstats, r, fm.pop("rollout_round_s",
                                                                       t1 - t0), t2 - t1)
            round_metrics.update(fm)
            round_metrics["kl_ref"] = kl_ref
            round_metrics["old_behaviour_max_abs"] = max(drift) if drift else None
            round_metrics["round_steps"] = len(full) * rl.epochs
            if not full:
                empty_rounds += 1
                log.warning("round %d: no trainable group (all masked or empty)", r)
                if empty_rounds >= MAX_EMPTY_ROUNDS:
                    raise TrainingError(
                        f"rl.env: {empty_rounds} rounds in a row had no trainable group (every "
                        f"group masked by env_error, or filtered); the environment {rl.env!r} "
                        "looks broken (see the warnings above)")
            else:
                empty_rounds = 0
            for epoch in range(rl.epochs):
                for i, (batch, stats) in enumerate(full):
                    if step >= cfg.train.steps:
                        break
                    if jit_step is None:
                        jit_step = jit_train_step(setup, batch_shardings(batch, mesh))
                    with jax.set_mesh(mesh):
                        state, metrics = jit_step(state, batch)
                    step += 1
                    last = epoch == rl.epochs - 1 and i == len(full) - 1
                    if last or step >= cfg.train.steps:
                        jax.block_until_ready(state)
                        t3 = time.perf_counter()
                        round_metrics["train_time_s"] = t3 - t2
                        round_metrics.update(_bubbles(flow, t0, t1, t3, *busy))
                        metrics = {**metrics, **{k: v for k, v in round_metrics.items()
                                                 if v is not None}}
                    logger.step(step, stats, metrics)
                    _check_skips(cfg, step, metrics, ckpts.dir)
            position.rounds = r + 1
            crossed = step // cfg.train.checkpoint_every > (step - len(full) * rl.epochs) // \
                cfg.train.checkpoint_every
            if stop.requested(step) or (cfg.train.stop_at_step >= 0
                                        and step >= cfg.train.stop_at_step):
                ckpts.save(step, state, force=True)
                ckpts.wait()
                from kat_jax.training.trainer import Preempted

                why = "SIGTERM" if stop.signal is not None else "train.stop_at_step"
                raise Preempted(f"{why} at step {step} (end of round {r}): checkpoint saved in "
                                f"{ckpts.dir}; run the same command again (without "
                                "train.stop_at_step) to resume")
            if crossed and step < cfg.train.steps:
                ckpts.save(step, state)
        if ckpts.latest_step() != step:
            ckpts.save(step, state, force=True)
        ckpts.wait()
        export_model(workdir, state["params"], model_cfg, hf_dir(cfg))
    finally:
        if flow is not None:
            flow.close()
        stop.close()
        try:
            ckpts.close()
        finally:
            logger.close()
    totals = logger.host_totals()
    return {"workdir": workdir, "step": int(step), "stage": cfg.stage, "rounds": position.rounds,
            "loss": logger.logged.get("loss"), "reward": logger.logged.get("reward"),
            "mesh": dict(mesh.shape), "total_tokens": totals["total_tokens"],
            "computed_tokens": totals["computed_tokens"]}


def _placement_metrics(fleet: EngineFleet) -> dict[str, float]:
    """Where the sampler calls ran so far (rl.rollout_devices / rl.lend_train_devices): calls on
    the rollout devices, on lent training devices, and the time spent waiting for a replica."""
    st = fleet.stats()
    on_lent = sum(st["lent"].values())
    return {"placement/replicas": float(len(fleet.engines)),
            "placement/calls_rollout_devices": float(sum(st["placed"].values()) - on_lent),
            "placement/calls_lent_train_devices": float(on_lent),
            "placement/wait_s": float(st["wait_s"])}


def _asynchronous(cfg) -> bool:
    """Sampling in the background (kat_jax.flow.async_rollout): rl.max_staleness > 0."""
    return cfg.rl.max_staleness > 0


def _bubbles(flow, t0: float, t1: float, t3: float, busy0: float,
             busy1: float) -> dict[str, float]:
    """The round's bubbles over its wall time t0 (waiting for rollouts) .. t1 (trees,
    log-probs, steps) .. t3: train_wait_s, train_idle_fraction, rollout_idle_fraction (no
    episode in flight) and overlap (share of the trainer's busy time with episodes in
    flight). Synchronous: the trainer waits for the whole rollout and the sampler idles while
    it trains (overlap 0). busy0, busy1: the flow's busy seconds at t0 and t1."""
    wall, busy = max(t3 - t0, 1e-9), max(t3 - t1, 1e-9)
    m = {"train_wait_s": t1 - t0, "train_idle_fraction": (t1 - t0) / wall}
    if flow is None:
        m.update(rollout_idle_fraction=busy / wall, overlap=0.0)
        return m
    now = flow.busy_s()
    m["rollout_idle_fraction"] = min(1.0, max(0.0, 1.0 - (now - busy0) / wall))
    m["overlap"] = min(1.0, max(0.0, (now - busy1) / busy))
    return m


def _check_skips(cfg, step: int, metrics: dict, ckpt_dir: str) -> None:
    from kat_jax.training.trainer import _check_skips as check

    check(cfg, step, metrics, ckpt_dir)


def _load_tasks(rl) -> list:
    """The environment's tasks of rl.split ("all": every task, for environments without a
    train/test split, e.g. swe)."""
    from kat_jax.envs import ENVS, load_env_tasks

    if rl.split != "all" and ENVS[rl.env].test_fraction is None:
        _fail("rl.split", f"environment {rl.env!r} has no train/test split; set rl.split=all",
              rl.split)
    try:
        tasks = load_env_tasks(rl.env, rl.tasks_file or None,
                               split=None if rl.split == "all" else rl.split)
    except (ValueError, OSError) as e:
        key = "rl.tasks_file" if rl.tasks_file else "rl.env"
        raise config_lib.ConfigError(f"--config.{key}: {e}") from None
    if not tasks:
        _fail("rl.split", f"environment {rl.env!r} has no tasks in this split", rl.split)
    return tasks


def _load_teachers(cfg, tasks) -> dict:
    """Task id -> teacher transcripts for the online rft stage; every task needs one."""
    from kat_jax.envs.teachers import load_teachers

    rl = cfg.rl
    key = "rl.teachers" if rl.teachers else "rl.env"
    try:
        teachers = load_teachers(rl.teachers or rl.env)
    except (ValueError, OSError) as e:
        raise config_lib.ConfigError(f"--config.{key}: teachers: {e}") from None
    missing = [t.id for t in tasks if not teachers.get(t.id)]
    if missing:
        _fail(key, f"{len(missing)} of the {len(tasks)} tasks have no teacher transcript "
              f"(e.g. {missing[:3]})", rl.teachers or rl.env)
    return teachers


def _teacher_records(cfg, teachers: dict | None, tokenizer):
    """rl.teacher_loss=sft: groups -> the same groups, each followed by its task's teacher
    transcripts as teacher rollout records (kat_jax.envs.teachers.teacher_rollout_record; they
    join after the advantages and the round's filters, so they shift neither). None otherwise."""
    if teachers is None or cfg.rl.teacher_loss != "sft":
        return None
    from kat_jax.envs.teachers import teacher_rollout_record

    cache: dict[Any, list[dict]] = {}

    def add(groups: list[list[dict]]) -> list[list[dict]]:
        out = []
        for g in groups:
            task = g[0].get("task_id", g[0].get("group"))
            if task not in cache:
                cache[task] = [teacher_rollout_record(t, tokenizer, g[0].get("group"), i)
                               for i, t in enumerate(teachers[task])]
            out.append(list(g) + cache[task])
        return out

    return add


def _generated(e: dict) -> int:
    return sum(x is not None for x in e["logprobs"])


def _turn_tokens(e: dict) -> list[int]:
    """Generated tokens of each turn of an episode: the runs of its trace's sampled tokens (those
    with a behaviour log-prob; prompts, tool results and template tokens between turns have
    none)."""
    runs, n = [], 0
    for x in e["logprobs"]:
        if x is not None:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs + [n] if n else runs


def _tokens_saved(episodes: list[dict]) -> dict[str, float]:
    """Generated tokens early termination saved in a round, an estimate: an episode terminated
    after turn t would have generated, in its turns after t, what this round's episodes that ran
    to their end past turn t generated after their turn t (mean; those of its own task when it
    has some, else all such episodes; nothing when there are none).
    generated_tokens_saved_fraction: saved / (generated + saved)."""
    done = [(e.get("task_id"), _turn_tokens(e)) for e in episodes if "terminated" not in e]
    if not done:
        return {}
    saved = 0.0
    for e in episodes:
        if "terminated" not in e:
            continue
        t = len(_turn_tokens(e))
        longer = [(task, runs) for task, runs in done if len(runs) > t]
        own = [runs for task, runs in longer if task == e.get("task_id")]
        pool = own or [runs for _, runs in longer]
        if pool:
            saved += float(np.mean([sum(runs[t:]) for runs in pool]))
    generated = float(sum(_generated(e) for e in episodes))
    return {"generated_tokens_saved": saved,
            "generated_tokens_saved_fraction": saved / max(generated + saved, 1.0)}


def _round_metrics(episodes: list[dict], mstats: dict, round_index: int, rollout_s: float,
                   logprob_s: float) -> dict[str, Any]:
    n = max(len(episodes), 1)
    turns = sum(e["turns"] for e in episodes)
    m: dict[str, Any] = {
        "reward": sum(e["reward"] for e in episodes) / n,
        "pass_rate": sum(bool(e.get("passed")) for e in episodes) / n,
        "turns": turns / n,
        "tool_calls_per_turn": sum(e["tool_calls"] for e in episodes) / max(turns, 1),
        "generated_tokens": float(sum(_generated(e) for e in episodes)),
        "episodes": float(len(episodes)),
        "rollout_time_s": rollout_s, "logprob_time_s": logprob_s,
        **({"outcome_reward": sum(e["outcome_reward"] for e in episodes) / n,
            "termination_rate": sum("terminated" in e for e in episodes) / n,
            **({"termination_turn": float(np.mean([e["terminated"]["turn"] for e in episodes
                                                   if "terminated" in e])),
                **_tokens_saved(episodes)}
               if any("terminated" in e for e in episodes) else {})}
           if episodes and "outcome_reward" in episodes[0] else {}),
        "policy_version": float(round_index),
    }
    for k, v in mstats.items():
        if not isinstance(v, dict):  # token_versions: the staleness metrics' source
            m[k] = float(v)
    counts: dict[str, int] = {}
    for e in episodes:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    for k, v in counts.items():
        m[f"status_{k}"] = float(v)
    return m


def _register() -> None:
    from kat_jax.training.trainer import StageRunner, register_stage_runner

    register_stage_runner(StageRunner("online_rl", is_online, validate_online, online_stage))


_register()

__all__ = ["is_online", "online_stage", "validate_online",
           "round_tasks", "RecordGroups", "make_logprob_fn"]

"""The training loop: one linear function per stage, and a pipeline of stages.

    summary = run_train(cfg, workdir)       # cfg from kat_jax.training.config_lib.load_train_config

Per stage, in WORKDIR:
    config.json, model_config.json   the resolved configs
    metrics.jsonl, tensorboard/      one record per logged step (kat_jax.training.progress)
    checkpoints/<step>/              train state + data iterator (kat_jax.training.checkpointing)
    model/                           the final model as a kat_jax checkpoint (score, export-hf,
                                     the next stage)

The pieces come from kat_jax.training.build (config checks, model, tokenizer, mesh, the jitted
step), kat_jax.multihost (what hosts agree on) and kat_jax.training.checkpointing; this
module only runs them in order. Running again on the same WORKDIR resumes from the latest complete
checkpoint and logs the same losses as a run that never stopped. A stage whose model/ exists and
whose checkpoint reached train.steps is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from kat_jax import storage
from kat_jax.multihost import (
    StopRequests,
    all_exhausted,
    exit_after_cross_host_failure,
    maybe_initialize_distributed,
)
from kat_jax.training import config_lib
from kat_jax.training.build import (
    TrainingError,
    batch_fields,
    batch_shape,
    batch_shardings,
    data_shards,
    hf_dir,
    init_or_restore_state,
    jit_train_step,
    model_config_for,
    preflight,
    tokenizer_for,
    train_step_setup,
)
from kat_jax.training.checkpointing import Checkpoints, export_model, model_exported
from kat_jax.training.progress import Profiler, StepLogger
from kat_jax.training.sharding import global_batch, local_shard_ids, mesh_from_config, owned_shard_ids
from kat_jax.training.step import make_eval_step
from kat_jax.training.watchdog import StepWatchdog

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 143
__all__ = ["PREEMPTED_EXIT", "Preempted", "TrainingError", "run_train", "train_stage"]


class Preempted(RuntimeError):
    """SIGTERM (preemption) or train.stop_at_step: a checkpoint was saved; running again resumes."""


@dataclasses.dataclass(frozen=True)
class StageRunner:
    """A way of training a stage besides the data-fed loop below, registered by a layer above
    (kat_jax.flow registers the online rl loop): `applies(cfg)` says whether it takes the
    config, `validate(cfg)` checks its keys (ConfigError naming the key), `run(cfg, workdir)`
    trains and returns the summary."""

    name: str
    applies: Callable[[ml_collections.ConfigDict], bool]
    validate: Callable[[ml_collections.ConfigDict], None]
    run: Callable[[ml_collections.ConfigDict, str], dict]


STAGE_RUNNERS: list[StageRunner] = []


def register_stage_runner(runner: StageRunner) -> None:
    STAGE_RUNNERS[:] = [r for r in STAGE_RUNNERS if r.name != runner.name] + [runner]


def stage_runner(cfg: ml_collections.ConfigDict) -> StageRunner | None:
    """The registered runner that takes cfg (its keys checked), or None for the data-fed loop.
    Every runner validates cfg, so a key only a runner reads is checked whichever runs."""
    for r in STAGE_RUNNERS:
        r.validate(cfg)
    for r in STAGE_RUNNERS:
        if r.applies(cfg):
            return r
    if "rl" in cfg and cfg.rl.get("env"):
        raise config_lib.ConfigError(
            "--config.rl.env: the online rl loop is not registered; it lives in kat_jax.flow "
            "(import kat_jax.flow.online, as `kat-jax train` does)")
    return None


class DataFeed:
    """The stage's data on this host: the shards its devices hold, as global batches."""

    def __init__(self, cfg, source, tokenizer, model_cfg, mesh, train: bool):
        from kat_jax.data.pipeline import make_step_iterator

        self.cfg, self.mesh, self.source = cfg, mesh, source  # opened and checked by preflight
        self.shards = data_shards(cfg, mesh)
        self.shard_ids = local_shard_ids(mesh, self.shards)
        shape = batch_shape(cfg, model_cfg)
        self.make = lambda **kw: make_step_iterator(
            self.source, cfg.stage, tokenizer, shape, model_cfg.vocab_size,
            cfg.train.microbatches, len(self.shard_ids), shard_ids=self.shard_ids,
            num_shards=self.shards, pad_exhausted=jax.process_count() > 1,
            why=batch_fields(cfg)[1], **kw)
        if train:
            self.it = self.make(seed=cfg.data.seed, shuffle=cfg.data.shuffle,
                                epochs=None if cfg.data.epochs < 0 else cfg.data.epochs,
                                count_shard_ids=owned_shard_ids(mesh, self.shards))

    def peek(self):
        """One step's local batch without consuming data (the iterator state is restored)."""
        state = self.it.get_state()
        example, _ = next(self.it)
        self.it.set_state(state)
        return example

    def next(self, step: int):
        """(global batch, stats) of the next step, or None when every host's data is done."""
        try:
            local, stats = next(self.it)
            if self.cfg.data.epochs >= 0 and all_exhausted(stats):
                raise StopIteration
        except StopIteration:
            log.warning("data exhausted at step %d (data.epochs=%d)", step, self.cfg.data.epochs)
            return None
        return global_batch(local, self.mesh, self.shard_ids, self.shards), stats

    def evaluate(self, eval_fn, params) -> dict:
        """eval_loss over train.eval_batches steps of this (eval) source, from its start."""
        it = self.make(shuffle=False, epochs=1)
        num = den = 0.0
        for _ in range(self.cfg.train.eval_batches):
            try:
                local, stats = next(it)
                if all_exhausted(stats):
                    break
            except StopIteration:
                break
            with jax.set_mesh(self.mesh):
                batch = global_batch(local, self.mesh, self.shard_ids, self.shards)
                out = jax.device_get(eval_fn(params, batch))
            num += float(out["loss"][0])
            den += float(out["loss"][1])
        return {"eval_loss": num / den if den > 0 else None}


def train_stage(cfg: ml_collections.ConfigDict, workdir: str,
                sources: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train one stage in workdir. sources: what preflight(cfg) returned (a pipeline has checked
    every stage first); default: preflight here. A stage a registered runner claims (e.g. the
    rl stage with rl.env set: the online loop kat_jax.flow.online) is run by it."""
    runner = stage_runner(cfg)
    if runner is not None:
        if sources is None:
            preflight(cfg)
        maybe_initialize_distributed(cfg)
        return runner.run(cfg, workdir)
    # --- setup: config, data sources, model, mesh, state
    sources = preflight(cfg) if sources is None else sources
    maybe_initialize_distributed(cfg)
    workdir = storage.absolute(workdir)  # local, or gs://bucket/... (kat_jax.storage)
    storage.makedirs(workdir)
    model_cfg, tokenizer = model_config_for(cfg), tokenizer_for(cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's "
                            f"vocabulary of {model_cfg.vocab_size}")
    mesh = mesh_from_config(cfg.mesh)
    data = DataFeed(cfg, sources["train_files"], tokenizer, model_cfg, mesh, train=True)
    if jax.process_index() == 0:
        config_lib.save_config(cfg, os.path.join(workdir, "config.json"))
        model_cfg.save_json(os.path.join(workdir, "model_config.json"))
    setup = train_step_setup(cfg, mesh, model_cfg)  # shared with kat-jax compile-check
    ckpts = Checkpoints(workdir, cfg.train, data.it)
    state, start = init_or_restore_state(setup, cfg, model_cfg, ckpts.restore)
    if start:
        log.info("resumed %s from step %d", workdir, start)
    if start >= cfg.train.steps and model_exported(workdir):
        ckpts.close()
        return {"workdir": workdir, "step": start, "status": "already finished"}
    batch_shard = batch_shardings(data.peek(), mesh)
    jit_step = jit_train_step(setup, batch_shard)
    evaluate = None
    if cfg.data.eval_files and cfg.train.eval_every > 0:
        eval_data = DataFeed(cfg, sources["eval_files"], tokenizer, model_cfg, mesh, train=False)
        eval_fn = jax.jit(make_eval_step(setup.graphdef, setup.loss_spec, setup.constrain),
                          in_shardings=(setup.p_shard, batch_shard), out_shardings=setup.rep)
        evaluate = lambda: eval_data.evaluate(eval_fn, state["params"])

    # --- the loop
    stop, logger = StopRequests(), StepLogger(cfg, workdir, start, model_cfg)
    profiler, watchdog = Profiler(cfg.train, workdir), StepWatchdog(cfg.train.step_timeout_s)

    def save(step: int, force: bool = False) -> None:
        ckpts.save(step, state, force=force)
        logger.sync()  # a remote workdir's metrics catch up with its checkpoints

    step = start
    try:
        while step < cfg.train.steps:
            profiler.before_step(step)
            got = data.next(step)
            if got is None:
                break
            batch, stats = got
            with jax.set_mesh(mesh):  # Pallas attention then runs inside shard_map over the mesh
                state, metrics = jit_step(state, batch)
            step += 1
            watchdog.beat(step)
            profiler.after_step(step, state)
            if logger.step(step, stats, metrics, evaluate) is not None:
                watchdog.beat(step)  # an evaluation is progress too
            _check_skips(cfg, step, metrics, ckpts.dir)
            if stop.requested(step) or step == cfg.train.stop_at_step:
                save(step, force=True)
                ckpts.wait()
                why = "SIGTERM" if stop.signal is not None else "train.stop_at_step"
                raise Preempted(f"{why} at step {step}: checkpoint saved in {ckpts.dir}; run "
                                "the same command again (without stop_at_step) to resume")
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                save(step)
        watchdog.close()  # the final save and export are bounded by orbax and the barriers
        if ckpts.latest_step() != step:
            save(step, force=True)
        ckpts.wait()
        export_model(workdir, state["params"], model_cfg, hf_dir(cfg))
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        exit_after_cross_host_failure(e, step, ckpts.dir, logger.close)
    finally:
        watchdog.close()
        profiler.close()
        stop.close()
        try:
            ckpts.close()
        finally:
            logger.close()
    totals = logger.host_totals()
    return {"workdir": workdir, "step": int(step), "stage": cfg.stage,
            "loss": logger.logged.get("loss"), "sharded_fraction": setup.sharded_fraction,
            "mesh": dict(mesh.shape), "total_tokens": totals["total_tokens"],
            "computed_tokens": totals["computed_tokens"]}


def _check_skips(cfg, step: int, metrics: dict, ckpt_dir: str) -> None:
    skips = int(metrics["consecutive_skips"])
    if skips >= cfg.train.max_consecutive_skips:
        raise TrainingError(
            f"{skips} consecutive non-finite updates (loss or gradient) at step {step}: "
            f"stopping (train.max_consecutive_skips={cfg.train.max_consecutive_skips}); "
            f"the last checkpoint in {ckpt_dir} holds the state before them")


def run_train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """A stage config, or a pipeline config (key `stages`: names run in order, each in
    WORKDIR/<name>; model.checkpoint 'stage:NAME' is the model that stage ended with)."""
    if "stages" not in cfg:
        return train_stage(cfg, workdir)
    names = [s for s in cfg.stages.split(",") if s]
    for name in names:
        if name not in cfg:
            raise config_lib.ConfigError(f"--config.stages: no stage config named {name!r}")
    sources = {}
    for name in names:  # every stage's keys and data, before the first one trains
        try:
            stage_runner(cfg[name])  # its checks
            sources[name] = preflight(cfg[name])
        except (config_lib.ConfigError, TrainingError, ValueError, FileNotFoundError) as e:
            raise type(e)(str(e).replace("--config.", f"--config.{name}.")) from None
    results = {}
    for name in names:
        sub = cfg[name]
        ref = sub.model.checkpoint
        if ref.startswith("stage:"):
            prev = ref[len("stage:"):]
            if prev not in results:
                raise config_lib.ConfigError(f"--config.{name}.model.checkpoint: {ref} does not "
                                             "name an earlier stage")
            with sub.unlocked():
                sub.model.checkpoint = os.path.join(storage.absolute(workdir), prev, "model")
        results[name] = train_stage(sub, os.path.join(workdir, name), sources[name])
    return {"stages": results}

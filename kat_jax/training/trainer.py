"""The training loop: one linear function per stage, and a pipeline of stages.

    summary = run_train(cfg, workdir)       # cfg from kat_jax.training.config_lib.load_train_config

Per stage, in WORKDIR:
    config.json          the resolved config
    metrics.jsonl        one JSON object per logged step (kat_jax.training.metrics)
    tensorboard/         event files
    checkpoints/<step>/  orbax: state (params, optimizer state, step, rng, skip counters) + data
                         iterator state; async, every train.checkpoint_every steps, on SIGTERM, and
                         at the end; the last train.keep_checkpoints are kept
    model/               the final model as a kat_jax checkpoint (score, export-hf, next stage)

Running again on the same WORKDIR resumes from the latest complete checkpoint (an interrupted save
leaves only a temporary directory, which orbax ignores) and logs the same losses as a run that never
stopped: params, optimizer state, step, RNG and the data iterator are all restored. A stage whose
model/ exists and whose checkpoint reached train.steps is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from kat_jax import storage
from kat_jax.models.checkpoint import CONFIG_FILE
from kat_jax.training import aot, config_lib
from kat_jax.training.metrics import MetricsWriter, peak_flops, step_flops
from kat_jax.training.sharding import (
    batch_sharding,
    local_shard_ids,
    make_mesh,
    maybe_initialize_distributed,
    owned_shard_ids,
    sync_processes,
)
from kat_jax.training.step import LossSpec, init_state, make_eval_step
from kat_jax.training.watchdog import StepWatchdog

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 143


class IteratorState:
    """The data iterator's state the way grain's orbax handler stores it: one JSON file per
    process (process_<i>-of-<n>.json), written by every process. (orbax's JsonSave writes on the
    primary host only, which would lose the other hosts' iterator positions.) snapshot=True fixes
    the state at construction, so an asynchronous save records the step it was asked for."""

    def __init__(self, iterator, snapshot: bool = False):
        self.iterator = iterator
        self._state = json.dumps(iterator.get_state()).encode() if snapshot else None

    def get_state(self) -> bytes:
        return self._state if self._state is not None else json.dumps(
            self.iterator.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


class TrainingError(RuntimeError):
    pass


class Preempted(RuntimeError):
    """SIGTERM (preemption): a checkpoint was saved; running again resumes."""


# ---------------------------------------------------------------------------------------------
# pieces


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
    from kat_jax.models.layers import DTYPE

    dtype = DTYPE[model_cfg.param_dtype]
    return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, dtype), s), params, shardings)


def global_batch(local: dict[str, np.ndarray], mesh, shard_ids: list[int],
                 shards: int) -> dict[str, jax.Array]:
    """Host-local [M, S_local, ...] arrays holding the global shards `shard_ids` (sorted; see
    sharding.local_shard_ids) -> global [M, shards, ...] arrays split over the batch axes. Each
    device takes its shards' rows from the local arrays, whichever shards the mesh gives it."""
    pos = {sid: i for i, sid in enumerate(shard_ids)}
    out = {}
    for k, v in local.items():
        shape = (v.shape[0], shards, *v.shape[2:])

        def rows(index, v=v):
            return v[:, [pos[i] for i in range(*index[1].indices(shards))]]

        out[k] = jax.make_array_from_callback(shape, batch_sharding(mesh, v.ndim), rows)
    return out


def all_exhausted(stats: dict) -> bool:
    """Whether every host's data streams are done (an agreement across processes, so that all
    hosts stop at the same step; with one process, this one's flag)."""
    flag = int(stats.get("exhausted", 0))
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _preemption_sync():
    """multihost_utils.reached_preemption_sync_point when several processes run with JAX's
    preemption service; None otherwise (one process handles SIGTERM itself)."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    try:
        from jax._src import distributed  # no public way to ask whether the service runs
        manager = distributed.global_state.preemption_sync_manager
    except (ImportError, AttributeError):
        manager = True  # assume it does; reached_preemption_sync_point raises if not
    if manager is None:
        log.warning("multi-host run without JAX's preemption service: SIGTERM is not handled")
        return None
    return multihost_utils.reached_preemption_sync_point


def sum_over_hosts(counts: dict[str, int]) -> dict[str, int]:
    """Per-host integer counters summed over all processes (every process must call it at the
    same point; with one process, the counters themselves)."""
    if jax.process_count() == 1:
        return {k: int(v) for k, v in counts.items()}
    from jax.experimental import multihost_utils

    keys = list(counts)
    # int32 pieces of 20 bits (JAX without x64): exact for counters below 2**51 on < 2048 hosts
    vals = [int(counts[k]) for k in keys]
    local = np.asarray([[v >> 20, v & 0xFFFFF] for v in vals], np.int32)
    parts = np.asarray(multihost_utils.process_allgather(local), np.int64)
    total = parts.reshape(-1, len(keys), 2).sum(0)
    return {k: int(hi) * 2**20 + int(lo) for k, (hi, lo) in zip(keys, total)}


def _loss_spec(cfg) -> LossSpec:
    return aot.loss_spec(cfg)


def _validate(cfg) -> None:
    from kat_jax.training.losses import AGG_MODES, STAGES

    checks = [
        ("stage", cfg.stage in STAGES, f"must be one of {STAGES}"),
        ("train.steps", cfg.train.steps >= 1, "must be >= 1"),
        ("train.microbatches", cfg.train.microbatches >= 1, "must be >= 1"),
        ("train.checkpoint_every", cfg.train.checkpoint_every >= 1, "must be >= 1"),
        ("train.log_every", cfg.train.log_every >= 1, "must be >= 1"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be >= 1"),
        ("train.max_consecutive_skips", cfg.train.max_consecutive_skips >= 1, "must be >= 1"),
        ("data.rows", cfg.data.rows >= 1, "must be >= 1"),
        ("data.row_len", cfg.data.row_len >= 2, "must be >= 2"),
        ("data.trajectories", cfg.data.trajectories >= 1, "must be >= 1"),
        ("loss.agg_mode", cfg.loss.agg_mode in AGG_MODES, f"must be one of {AGG_MODES}"),
        ("loss.temperature", cfg.loss.temperature > 0, "must be > 0"),
    ]
    for key, ok, rule in checks:
        if not ok:
            node = cfg
            for part in key.split("."):
                node = node[part]
            raise config_lib.ConfigError(f"--config.{key}: {rule} (got {node!r})")


# ---------------------------------------------------------------------------------------------
# one stage


def train_stage(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    import grain
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from kat_jax.data.pipeline import STAGE_KIND, BatchShape, make_step_iterator
    from kat_jax.data.sources import open_source
    from kat_jax.models.checkpoint import save_checkpoint

    _validate(cfg)
    maybe_initialize_distributed(cfg)
    workdir = storage.absolute(workdir)  # local, or gs://bucket/... (kat_jax.storage)
    storage.makedirs(workdir)
    model_cfg = model_config_for(cfg)
    tokenizer = tokenizer_for(cfg)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise TrainingError(f"tokenizer: {tokenizer.vocab_size} tokens do not fit the model's "
                            f"vocabulary of {model_cfg.vocab_size}")
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    try:
        shards = aot.data_shards(cfg, mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    train_files = open_source(cfg.data.train_files, "data.train_files", STAGE_KIND[cfg.stage])
    if jax.process_index() == 0:
        config_lib.save_config(cfg, os.path.join(workdir, "config.json"))
        model_cfg.save_json(os.path.join(workdir, "model_config.json"))

    setup = aot.train_step_setup(cfg, mesh, model_cfg)  # shared with kat-jax compile-check
    graphdef, frac, p_shard, rep = setup.graphdef, setup.sharded_fraction, setup.p_shard, setup.rep
    tx, abstract_state, state_shard = setup.tx, setup.abstract_state, setup.state_shard

    ckpt_dir = os.path.join(workdir, "checkpoints")
    mngr = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints, create=True,
        enable_async_checkpointing=cfg.train.async_checkpointing), item_names=("state", "data"))
    shape = BatchShape(cfg.data.rows, cfg.data.row_len, cfg.data.trajectories,
                       model_cfg.attention_block_size)
    shard_ids = local_shard_ids(mesh, shards)
    data_it = make_step_iterator(
        train_files, cfg.stage, tokenizer, shape, model_cfg.vocab_size, cfg.train.microbatches,
        len(shard_ids), seed=cfg.data.seed, shuffle=cfg.data.shuffle,
        epochs=None if cfg.data.epochs < 0 else cfg.data.epochs, shard_ids=shard_ids,
        num_shards=shards, pad_exhausted=jax.process_count() > 1,
        count_shard_ids=owned_shard_ids(mesh, shards))

    start = mngr.latest_step()
    if start is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_state, state_shard)
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(IteratorState(data_it))))
        state = restored["state"]
        log.info("resumed %s from step %d", workdir, start)
    else:
        start = 0
        params = initial_params(cfg, model_cfg, p_shard)
        state = jax.jit(lambda p: init_state(p, tx, cfg.train.seed), out_shardings=state_shard,
                        donate_argnums=0)(params)  # optimizer state born sharded like params
    if start >= cfg.train.steps and storage.isfile(os.path.join(workdir, "model", CONFIG_FILE)):
        mngr.close()
        return {"workdir": workdir, "step": int(start), "status": "already finished"}

    spec, constrain = setup.loss_spec, setup.constrain
    example, _ = _peek_shapes(data_it)
    batch_shard = {k: batch_sharding(mesh, v.ndim) for k, v in example.items()}
    jit_step = aot.jit_train_step(setup, batch_shard)
    eval_fn = None
    if cfg.data.eval_files and cfg.train.eval_every > 0:
        eval_files = open_source(cfg.data.eval_files, "data.eval_files", STAGE_KIND[cfg.stage])
        eval_fn = jax.jit(make_eval_step(graphdef, spec, constrain),
                          in_shardings=(p_shard, batch_shard), out_shardings=rep)

    stop = {"signal": None}
    old_handler = None
    preemption_sync = _preemption_sync()
    if preemption_sync is None:
        try:
            old_handler = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
        except ValueError:  # not the main thread (e.g. tests): no preemption handling
            pass
    # Multi-host: JAX's preemption service catches SIGTERM on any host and makes all hosts agree
    # on the step at which to save (a host that stopped alone would leave the others waiting in
    # the next collective); installing our own handler would take SIGTERM away from it.

    def save(step: int, force: bool = False) -> None:
        # Let the in-flight step finish first: orbax's device-to-host copies must not interleave
        # with a running multi-device program (on XLA:CPU that interleaving deadlocks collectives).
        jax.block_until_ready(state)
        data_state = IteratorState(data_it, snapshot=True)  # this step's position, now
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=grain.checkpoint.CheckpointSave(data_state)),
                  force=force)
        writer.sync()  # a remote workdir's metrics catch up with its checkpoints

    writer = MetricsWriter(workdir, resume_step=start)
    peak = peak_flops()
    bar = tqdm(total=cfg.train.steps, initial=start, desc=f"{cfg.stage} {os.path.basename(workdir)}",
               disable=jax.process_index() != 0, dynamic_ncols=True)
    totals = {"total_tokens": 0, "computed_tokens": 0}
    last = {"time": time.perf_counter(), "total_tokens": 0, "computed_tokens": 0}
    profiling = False
    profile_dir = os.path.join(workdir, "profile")
    if storage.is_remote(workdir):  # the profiler writes local files; they are copied up after
        import tempfile

        profile_dir = tempfile.mkdtemp(prefix="kat_jax_profile_")
    step = start
    watchdog = StepWatchdog(cfg.train.step_timeout_s)
    logged: dict[str, Any] = {}
    try:
        while step < cfg.train.steps:
            if cfg.train.profile_steps > 0 and step == cfg.train.profile_start:
                jax.profiler.start_trace(profile_dir)
                profiling = True
            try:
                local, stats = next(data_it)
                if cfg.data.epochs >= 0 and all_exhausted(stats):
                    raise StopIteration
            except StopIteration:
                log.warning("data exhausted at step %d (data.epochs=%d)", step, cfg.data.epochs)
                break
            with jax.set_mesh(mesh):  # Pallas attention then runs inside shard_map over the mesh
                state, metrics = jit_step(state, global_batch(local, mesh, shard_ids, shards))
            step += 1
            watchdog.beat(step)
            for k in totals:
                totals[k] += stats[k]
            bar.update(1)
            if profiling and step >= cfg.train.profile_start + cfg.train.profile_steps:
                jax.block_until_ready(state["step"])
                jax.profiler.stop_trace()
                profiling = False
                if profile_dir != os.path.join(workdir, "profile"):  # remote workdir: copy it up
                    storage.upload_tree(profile_dir, os.path.join(workdir, "profile"))
            skips = int(metrics["consecutive_skips"])
            if step % cfg.train.log_every == 0 or step == cfg.train.steps or skips:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                dt = max(now - last["time"], 1e-9)
                steps_since = max(1, step - last.get("step", start))
                m["step_time_s"] = dt / steps_since
                # token counts and data counters of all hosts (each host only sees its shards)
                c = sum_over_hosts({
                    "window_total": totals["total_tokens"] - last["total_tokens"],
                    "window_computed": totals["computed_tokens"] - last["computed_tokens"],
                    **{k: stats[k] for k in ("total_tokens", "computed_tokens", "trajectories",
                                             "dropped_overlong", "excluded_env_error")}})
                m["tokens_per_s"] = c.pop("window_total") / dt
                m["computed_tokens_per_s"] = c.pop("window_computed") / dt
                m.update(c)
                m["mfu"] = None if peak is None else step_flops(
                    model_cfg, c["computed_tokens"], cfg.data.row_len) / (
                        m["step_time_s"] * peak * jax.device_count())
                if eval_fn is not None and step % cfg.train.eval_every == 0:
                    m.update(_evaluate(eval_fn, state["params"], eval_files, cfg, tokenizer, shape,
                                       model_cfg, shard_ids, shards, mesh))
                writer.write(step, m)
                watchdog.beat(step)  # an evaluation is progress too
                logged = m
                bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
                last.update(time=time.perf_counter(), step=step, **totals)
            if skips >= cfg.train.max_consecutive_skips:
                raise TrainingError(
                    f"{skips} consecutive non-finite updates (loss or gradient) at step {step}: "
                    f"stopping (train.max_consecutive_skips={cfg.train.max_consecutive_skips}); "
                    f"the last checkpoint in {ckpt_dir} holds the state before them")
            if preemption_sync is not None and preemption_sync(step):
                stop["signal"] = signal.SIGTERM
            if stop["signal"] is not None or step == cfg.train.stop_at_step:
                save(step, force=True)
                mngr.wait_until_finished()
                why = "SIGTERM" if stop["signal"] is not None else "train.stop_at_step"
                raise Preempted(f"{why} at step {step}: checkpoint saved in {ckpt_dir}; run "
                                "the same command again (without stop_at_step) to resume")
            if step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                save(step)
        watchdog.close()  # the final save and export are bounded by orbax and the barriers
        if mngr.latest_step() != step:
            save(step, force=True)
        mngr.wait_until_finished()
        model_dir = os.path.join(workdir, "model")
        if jax.process_index() == 0:
            storage.rmtree(model_dir)  # a model/ from before a restart (or a partial one)
        sync_processes(f"kat_jax model/ removed {workdir}")
        save_checkpoint(model_dir, state["params"], model_cfg, hf_dir=_hf_dir(cfg))
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = (f"process {jax.process_index()} of {jax.process_count()}, after step {step}: a "
               f"cross-host operation failed ({first}); another host has probably died or been "
               f"preempted (see its log). Checkpoints are in {ckpt_dir}: run the same command on "
               "every host to resume")
        log.error("%s", msg)
        print(f"kat-jax: {msg}", file=sys.stderr, flush=True)  # before the coordinator aborts us
        # Nothing more can be done together: closing the checkpoint manager or shutting down
        # jax.distributed would wait in barriers for the missing host (minutes). Keep what this
        # host logged and leave now; the checkpoints already committed are intact.
        try:
            writer.close()
        finally:
            os._exit(1)
    finally:
        watchdog.close()
        if profiling:
            jax.profiler.stop_trace()
            if profile_dir != os.path.join(workdir, "profile"):
                storage.upload_tree(profile_dir, os.path.join(workdir, "profile"))
        bar.close()
        try:
            mngr.wait_until_finished()
            mngr.close()
        finally:
            writer.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    totals = sum_over_hosts(totals)
    return {"workdir": workdir, "step": int(step), "stage": cfg.stage,
            "loss": logged.get("loss"), "sharded_fraction": frac, "mesh": dict(mesh.shape),
            "total_tokens": totals["total_tokens"], "computed_tokens": totals["computed_tokens"]}


def _hf_dir(cfg) -> str | None:
    from kat_jax.models import checkpoint as ck

    spec = cfg.model.checkpoint
    if spec.startswith("preset:"):
        return None
    path = ck.resolve_checkpoint_dir(spec)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def _peek_shapes(data_it):
    """Shapes of one step's arrays without consuming data (state is restored)."""
    state = data_it.get_state()
    example = next(data_it)
    data_it.set_state(state)
    return example


def _evaluate(eval_fn, params, files, cfg, tokenizer, shape, model_cfg, shard_ids, shards,
              mesh) -> dict:
    from kat_jax.data.pipeline import make_step_iterator

    it = make_step_iterator(files, cfg.stage, tokenizer, shape, model_cfg.vocab_size,
                            cfg.train.microbatches, len(shard_ids), shuffle=False, epochs=1,
                            shard_ids=shard_ids, num_shards=shards,
                            pad_exhausted=jax.process_count() > 1)
    num = den = 0.0
    for _ in range(cfg.train.eval_batches):
        try:
            local, stats = next(it)
            if all_exhausted(stats):
                break
        except StopIteration:
            break
        with jax.set_mesh(mesh):
            out = jax.device_get(eval_fn(params, global_batch(local, mesh, shard_ids, shards)))
        num += float(out["loss"][0])
        den += float(out["loss"][1])
    return {"eval_loss": num / den if den > 0 else None}


# ---------------------------------------------------------------------------------------------
# pipelines


def run_train(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """A stage config, or a pipeline config (key `stages`: names run in order, each in
    WORKDIR/<name>; model.checkpoint 'stage:NAME' is the model that stage ended with)."""
    if "stages" not in cfg:
        return train_stage(cfg, workdir)
    names = [s for s in cfg.stages.split(",") if s]
    for name in names:
        if name not in cfg:
            raise config_lib.ConfigError(f"--config.stages: no stage config named {name!r}")
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
        results[name] = train_stage(sub, os.path.join(workdir, name))
    return {"stages": results}

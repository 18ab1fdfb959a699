"""Saving and restoring a run: train state + data-iterator position (orbax), and model/ export.

    ckpts = Checkpoints(workdir, cfg.train, data_it)
    restored = ckpts.restore(target)        # (state, step) of the latest checkpoint, or None
    ckpts.save(step, state)                 # async; the iterator position is snapshotted now
    export_model(workdir, params, model_cfg, hf_dir)   # WORKDIR/model for score, export-hf, stages

WORKDIR/checkpoints/<step>/ holds "state" (params, optimizer state, step, rng, skip counters) and
"data" (the data iterator state, one JSON file per process through grain's orbax handler). An
interrupted save leaves only a temporary directory, which orbax ignores, so a restart resumes from
the latest complete checkpoint and logs the same losses as a run that never stopped.
"""

from __future__ import annotations

import json
import os

import jax

from kat_jax import storage
from kat_jax.models.checkpoint import CONFIG_FILE
from kat_jax.multihost import sync_processes


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


class Checkpoints:
    """orbax CheckpointManager over WORKDIR/checkpoints: every train.checkpoint_every steps
    (async when train.async_checkpointing), the last train.keep_checkpoints kept."""

    def __init__(self, workdir: str, train_cfg, data_it):
        import orbax.checkpoint as ocp

        self.dir = os.path.join(workdir, "checkpoints")
        self.data_it = data_it
        self.mngr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=train_cfg.keep_checkpoints, create=True,
            enable_async_checkpointing=train_cfg.async_checkpointing),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def restore(self, target) -> tuple[dict, int] | None:
        """(state, step) from the latest checkpoint (state laid out like `target`: abstract
        arrays with shardings), the data iterator set to its position; None without one."""
        import grain
        import orbax.checkpoint as ocp

        step = self.mngr.latest_step()
        if step is None:
            return None
        restored = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=grain.checkpoint.CheckpointRestore(IteratorState(self.data_it))))
        return restored["state"], int(step)

    def save(self, step: int, state: dict, force: bool = False) -> None:
        import grain
        import orbax.checkpoint as ocp

        # Let the in-flight step finish first: orbax's device-to-host copies must not interleave
        # with a running multi-device program (on XLA:CPU that interleaving deadlocks collectives).
        jax.block_until_ready(state)
        data_state = IteratorState(self.data_it, snapshot=True)  # this step's position, now
        self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_state)),
            force=force)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        try:
            self.mngr.wait_until_finished()
        finally:
            self.mngr.close()


def model_dir(workdir: str) -> str:
    return os.path.join(workdir, "model")


def model_exported(workdir: str) -> bool:
    return storage.isfile(os.path.join(model_dir(workdir), CONFIG_FILE))


def export_model(workdir: str, params: dict, model_cfg, hf_dir: str | None) -> None:
    """WORKDIR/model as a kat_jax checkpoint (written by all processes; a model/ from before a
    restart, or a partial one, is removed first)."""
    from kat_jax.models.checkpoint import save_checkpoint

    out = model_dir(workdir)
    if jax.process_index() == 0:
        storage.rmtree(out)
    sync_processes(f"kat_jax model/ removed {workdir}")
    save_checkpoint(out, params, model_cfg, hf_dir=hf_dir)

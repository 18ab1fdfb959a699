"""What several processes (hosts) of one run must agree on; with one process each is trivial.

    batch = global_batch(local, mesh, shard_ids, shards)   # host-local shards -> global arrays
    all_exhausted(stats)          # every host's data is done (all stop at the same step)
    sum_over_hosts(counters)      # host counters summed over processes (each counted once)
    sync = preemption_sync()      # JAX's preemption service: all hosts save at the same step
    exit_after_cross_host_failure(err, ...)   # a collective failed: another host died

Every function that talks to other processes must be called by all of them at the same point.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import numpy as np

from kat_jax.training.sharding import batch_sharding

log = logging.getLogger(__name__)


def global_batch(local, mesh, shard_ids: list[int], shards: int):
    """Host-local [M, S_local, ...] arrays (a StepBatch) holding the global shards `shard_ids`
    (sorted; see sharding.local_shard_ids) -> global [M, shards, ...] arrays split over the batch
    axes. Each device takes its shards' rows from the local arrays, whichever shards the mesh
    gives it."""
    pos = {sid: i for i, sid in enumerate(shard_ids)}

    def to_global(v):
        def rows(index):
            return v[:, [pos[i] for i in range(*index[1].indices(shards))]]

        return jax.make_array_from_callback((v.shape[0], shards, *v.shape[2:]),
                                            batch_sharding(mesh, v.ndim), rows)

    return jax.tree.map(to_global, local)


def _allgather(local: np.ndarray) -> np.ndarray:
    """[processes, ...] of every process's `local` (int32)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(local, np.int32)))


def all_exhausted(stats: dict) -> bool:
    """Whether every host's data streams are done (an agreement across processes, so that all
    hosts stop at the same step; with one process, this one's flag)."""
    flag = int(stats.get("exhausted", 0))
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.all(_allgather(np.asarray(flag))))


def sum_over_hosts(counts: dict[str, int]) -> dict[str, int]:
    """Per-host integer counters summed over all processes (with one process, the counters)."""
    if jax.process_count() == 1:
        return {k: int(v) for k, v in counts.items()}
    keys = list(counts)
    # int32 pieces of 20 bits (JAX without x64): exact for counters below 2**51 on < 2048 hosts
    vals = [int(counts[k]) for k in keys]
    parts = _allgather(np.asarray([[v >> 20, v & 0xFFFFF] for v in vals])).astype(np.int64)
    total = parts.reshape(-1, len(keys), 2).sum(0)
    return {k: int(hi) * 2**20 + int(lo) for k, (hi, lo) in zip(keys, total)}


def preemption_sync():
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


def exit_after_cross_host_failure(err: Exception, step: int, ckpt_dir: str, close) -> None:
    """A collective failed (another host died or was preempted): say so and exit 1 at once.
    Closing the checkpoint manager or jax.distributed would wait in barriers for the missing host
    (minutes); `close()` keeps what this host logged; committed checkpoints are intact."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    msg = (f"process {jax.process_index()} of {jax.process_count()}, after step {step}: a "
           f"cross-host operation failed ({first}); another host has probably died or been "
           f"preempted (see its log). Checkpoints are in {ckpt_dir}: run the same command on "
           "every host to resume")
    log.error("%s", msg)
    print(f"kat-jax: {msg}", file=sys.stderr, flush=True)  # before the coordinator aborts us
    try:
        close()
    finally:
        os._exit(1)


class StopRequests:
    """SIGTERM (preemption) asks the run to save and stop. One process: a signal handler sets a
    flag (main thread only). Several: JAX's preemption service catches SIGTERM on any host and
    makes all hosts agree on the step at which to save (a host that stopped alone would leave the
    others waiting in the next collective; our own handler would take SIGTERM away from it)."""

    def __init__(self):
        import signal

        self.signal = None
        self._old = None
        self._sync = preemption_sync()
        if self._sync is None:
            try:
                self._old = signal.signal(signal.SIGTERM,
                                          lambda sig, frame: setattr(self, "signal", sig))
            except ValueError:  # not the main thread (e.g. tests): no preemption handling
                pass

    def requested(self, step: int) -> bool:
        if self._sync is not None and self._sync(step):
            import signal

            self.signal = signal.SIGTERM
        return self.signal is not None

    def close(self) -> None:
        if self._old is not None:
            import signal

            signal.signal(signal.SIGTERM, self._old)
            self._old = None

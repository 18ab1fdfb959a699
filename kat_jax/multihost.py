"""Everything several JAX processes (hosts) of one run must do together; with one process each
helper is trivial.

    maybe_initialize_distributed(cfg)   # jax.distributed, once per process, before any JAX call
    sync_processes(name)                # a barrier
    all_exhausted(stats)                # every host's data is done: all stop at the same step
    sum_over_hosts(counters)            # host counters summed over processes
    stop = StopRequests()               # SIGTERM / JAX's preemption service: all save together
    exit_after_cross_host_failure(...)  # a collective failed: another host died

A root utility (it imports nothing of kat_jax), so models (checkpoint writes) and training share
it. Every function that talks to other processes must be called by all of them at the same point.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)

_DISTRIBUTED = {"initialized": False}


def maybe_initialize_distributed(cfg: Any = None) -> bool:
    """jax.distributed.initialize when the config asks (distributed.initialize=True, optional
    coordinator_address / num_processes / process_id) or the environment does
    (JAX_COORDINATOR_ADDRESS, or a Cloud TPU pod / SLURM job that JAX detects itself when
    KAT_JAX_DISTRIBUTED=1). Returns True when it initialised (once per process: the stages of a
    pipeline share it). Must run before any other JAX call.

    A host that dies is noticed by the others within distributed.heartbeat_timeout_s (the
    coordination service then terminates them with "another task died"), or sooner when a
    collective loses its peer; a host that never arrives fails the rest after
    distributed.initialization_timeout_s. CPU hosts (tests, CPU clusters) use gloo collectives."""
    if _DISTRIBUTED["initialized"]:
        return False
    dist = getattr(cfg, "distributed", None) if cfg is not None else None
    want = bool(dist and dist.get("initialize", False))
    env = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("KAT_JAX_DISTRIBUTED") == "1"
    if not (want or env):
        return False
    kwargs: dict[str, Any] = {}
    if dist:
        for key in ("coordinator_address", "num_processes", "process_id"):
            value = dist.get(key)
            if value not in (None, "", -1):
                kwargs[key] = value
        import inspect

        accepted = inspect.signature(jax.distributed.initialize).parameters
        for key, arg in (("initialization_timeout_s", "initialization_timeout"),
                         ("heartbeat_timeout_s", "heartbeat_timeout_seconds")):
            value = dist.get(key)
            if value not in (None, -1) and arg in accepted:
                kwargs[arg] = int(value)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU backend only
    jax.distributed.initialize(**kwargs)
    _DISTRIBUTED["initialized"] = True
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True




def sync_processes(name: str) -> None:
    """A barrier across all processes (no-op with one): e.g. the primary host removed a directory
    that all hosts are about to write. `name` identifies the barrier (every process passes the
    same one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
            self.signal = signal.SIGTERM
        return self.signal is not None

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None

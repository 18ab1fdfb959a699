"""Process-level helpers for runs over several JAX processes (multi-host) that layers below
training need: a barrier. With one process every helper is a no-op.

A root utility (it imports nothing of kat_jax) so that kat_jax.models.checkpoint can synchronise
the processes writing one checkpoint directory without importing kat_jax.training;
kat_jax.training.sharding re-exports `sync_processes`.
"""

from __future__ import annotations


def sync_processes(name: str) -> None:
    """A barrier across all processes (no-op with one): e.g. the primary host removed a directory
    that all hosts are about to write. `name` identifies the barrier (every process passes the
    same one)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

"""Pallas tree-attention kernels (GPU: Triton, TPU: Mosaic) and their block schedules.

`pallas_tree_attention` is the entry point (kat_jax.ops.attention_impls registers it as
attention_impl='pallas'); `kernel_schedule` / `kernel_schedule_host` build the per-block loops.
"""

from kat_jax.ops.pallas.schedule import (
    KERNEL_KEYS,
    TPU_KEYS,
    kernel_schedule,
    kernel_schedule_host,
    tpu_schedule,
    tpu_schedule_host,
)
from kat_jax.ops.pallas.tree_attention import default_backend, pallas_tree_attention

__all__ = ["KERNEL_KEYS", "TPU_KEYS", "default_backend", "kernel_schedule", "kernel_schedule_host",
           "pallas_tree_attention", "tpu_schedule", "tpu_schedule_host"]

"""Metrics at the loop's edge: DIR/metrics.jsonl, TensorBoard event files, MFU estimate.

metrics.jsonl has one JSON object per logged step. On resume, lines of steps after the restored
checkpoint (logged by the run that was stopped) are removed first, so the file reads as one run.

MFU (model FLOPs utilisation) on accelerators:
    flops/step = 6 * P * C  +  12 * L * N * H * A
with P the parameters used as matmuls (all but the embedding lookup; a tied head counts
once), C the tokens the
model computes per step (tree tokens laid out in rows, padding excluded), L layers, N query heads,
H head dim, A the visible (query, key) pairs per step (attention scores and values, forward and
backward). mfu = flops/step / (step seconds * peak FLOP/s per device * devices). A is estimated as
C * row_len / 2 (causal-like rows); tree rows see fewer pairs, so the estimate is an upper bound.
Peak FLOP/s (dense bf16) come from PEAK_FLOPS by device kind; unknown kinds (and CPU) give null.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

log = logging.getLogger(__name__)

PEAK_FLOPS = {  # dense bf16 FLOP/s per device (per chip; v4/v5p count a chip as one device)
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops(device: Any = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    for name, value in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name) or name in kind:
            return value
    return None


def step_flops(model_cfg, computed_tokens: int, row_len: int) -> float:
    """Training FLOPs of one step (forward + backward) by the formula in the module docstring."""
    table = model_cfg.vocab_size * model_cfg.hidden_size
    # matmul parameters per token: everything but the embedding lookup; a tied head reuses the table
    dense = model_cfg.num_params() - (0 if model_cfg.tie_word_embeddings else table)
    pairs = computed_tokens * row_len / 2
    attn = 12 * model_cfg.num_layers * model_cfg.num_heads * model_cfg.head_dim * pairs
    return 6.0 * dense * computed_tokens + attn


class MetricsWriter:
    """Process 0 writes; other processes hold a no-op writer.

    On a remote workdir (gs://), metrics.jsonl and the TensorBoard event files are written to a
    local staging directory and copied up by sync() (the trainer calls it with every checkpoint;
    also at most every sync_every_s seconds, and on close): cloud objects cannot be appended to,
    and re-uploading them at every logged step would cost the whole file each time."""

    def __init__(self, workdir: str, resume_step: int = 0, tensorboard: bool = True,
                 sync_every_s: float = 60.0):
        from kat_jax import storage

        self.active = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.remote = storage.is_remote(workdir)
        self.sync_every_s = sync_every_s
        self._tb = None
        self._stage = None
        if not self.active:
            return
        local = self.path
        if self.remote:
            import tempfile

            self._stage = tempfile.mkdtemp(prefix="kat_jax_metrics_")
            local = os.path.join(self._stage, "metrics.jsonl")
            if storage.isfile(self.path):
                storage.copy_file(self.path, local)
        if os.path.exists(local):  # drop what the stopped run logged after its checkpoint
            with open(local) as f:
                lines = [ln for ln in f if ln.strip()]
            keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            if len(keep) != len(lines):
                from kat_jax.atomic_io import atomic_file

                with atomic_file(local) as f:
                    f.writelines(keep)
        self._local = local
        self._file = open(local, "a")
        self._last_sync = time.monotonic()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(self._stage or workdir, "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self.remote and time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def sync(self) -> bool:
        """Copy the staged files to a remote workdir (no-op for a local one). Best effort: a
        failed upload is logged and retried at the next sync (only process 0 uploads, so an
        error here must not stop it while the other hosts carry on). True when up to date."""
        if not (self.active and self.remote):
            return True
        from kat_jax import storage

        self._last_sync = time.monotonic()
        try:
            self._file.flush()
            storage.copy_file(self._local, self.path)
            tb = os.path.join(self._stage, "tensorboard")
            if self._tb is not None:
                self._tb.flush()
            if os.path.isdir(tb):
                storage.makedirs(os.path.join(self.workdir, "tensorboard"))
                for name in sorted(n for n in os.listdir(tb)
                                   if os.path.isfile(os.path.join(tb, n))):
                    storage.copy_file(os.path.join(tb, name),
                                      os.path.join(self.workdir, "tensorboard", name))
        except Exception as e:  # noqa: BLE001 - any storage error: keep training, retry later
            log.warning("could not copy metrics to %s (will retry): %s", self.workdir, e)
            return False
        return True

    def close(self) -> None:
        if not self.active:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.remote:
            import shutil

            self._file = open(self._local, "a")  # sync flushes it
            try:
                synced = self.sync()
            finally:
                self._file.close()
            if synced:
                shutil.rmtree(self._stage, ignore_errors=True)
            else:  # keep them: nothing logged is lost
                log.error("metrics of %s are only in %s: copy them there by hand", self.workdir,
                          self._stage)


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    return v

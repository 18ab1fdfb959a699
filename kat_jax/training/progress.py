"""The loop's edge: what a run shows and records while it trains.

    logger = StepLogger(cfg, workdir, start, model_cfg)   # metrics.jsonl, TensorBoard, tqdm, MFU
    logger.step(step, stats, metrics, evaluate)           # every step; writes every log_every
    logger.close()                                        # and draws WORKDIR/plots/<metric>.png
    profiler = Profiler(cfg.train, workdir)                # a jax.profiler trace window

Logged per step (besides the step's own metrics): step_time_s, tokens_per_s (trajectory tokens),
computed_tokens_per_s (tokens laid out in rows), the data counters summed over hosts (trajectory
tokens total_tokens, prefix-tree tokens tree_tokens, kept_tokens after pruning, computed_tokens),
mfu.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax

from kat_jax import storage
from kat_jax.multihost import sum_over_hosts
from kat_jax.training.metrics import MetricsWriter, peak_flops, step_flops

log = logging.getLogger(__name__)

HOST_COUNTERS = ("total_tokens", "computed_tokens", "tree_tokens", "kept_tokens", "trajectories",
                 "dropped_overlong", "excluded_env_error")


class StepLogger:
    def __init__(self, cfg, workdir: str, start: int, model_cfg):
        from tqdm import tqdm

        self.cfg, self.model_cfg = cfg, model_cfg
        self.workdir = workdir
        self.writer = MetricsWriter(workdir, resume_step=start)
        self.peak = peak_flops()
        self.bar = tqdm(total=cfg.train.steps, initial=start,
                        desc=f"{cfg.stage} {os.path.basename(workdir)}",
                        disable=jax.process_index() != 0, dynamic_ncols=True)
        self.totals = {"total_tokens": 0, "computed_tokens": 0}
        self.last = {"time": time.perf_counter(), "step": start, **self.totals}
        self.logged: dict[str, Any] = {}

    def step(self, step: int, stats: dict, metrics: dict, evaluate=None) -> dict | None:
        """Count the step; at log steps (every train.log_every, every train.eval_every with
        evaluate() added, the last, and any skipped update) write its metrics and return them."""
        train = self.cfg.train
        for k in self.totals:
            self.totals[k] += stats[k]
        self.bar.update(1)
        eval_now = evaluate is not None and train.eval_every > 0 and step % train.eval_every == 0
        if not (step % train.log_every == 0 or step == train.steps or eval_now
                or int(metrics["consecutive_skips"])):
            return None
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = max(time.perf_counter() - self.last["time"], 1e-9)
        m["step_time_s"] = dt / max(1, step - self.last["step"])
        # token counts and data counters of all hosts (each host only sees its shards)
        c = sum_over_hosts({
            "window_total": self.totals["total_tokens"] - self.last["total_tokens"],
            "window_computed": self.totals["computed_tokens"] - self.last["computed_tokens"],
            **{k: stats[k] for k in HOST_COUNTERS}})
        m["tokens_per_s"] = c.pop("window_total") / dt
        m["computed_tokens_per_s"] = c.pop("window_computed") / dt
        m.update(c)
        m["mfu"] = None if self.peak is None else step_flops(
            self.model_cfg, c["computed_tokens"], self.cfg.data.row_len) / (
                m["step_time_s"] * self.peak * jax.device_count())
        if eval_now:
            m.update(evaluate())
        self.writer.write(step, m)
        self.logged = m
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", refresh=False)
        self.last.update(time=time.perf_counter(), step=step, **self.totals)
        return m

    def sync(self) -> None:
        """A remote workdir's metrics catch up (with every checkpoint)."""
        self.writer.sync()

    def host_totals(self) -> dict[str, int]:
        return sum_over_hosts(self.totals)

    def close(self) -> None:
        """Close the writer, then (process 0) draw WORKDIR/plots/<metric>.png from metrics.jsonl
        (kat_jax.training.plots). Drawing is best effort: a failure is a warning, never an error
        of the run."""
        self.bar.close()
        self.writer.close()
        if jax.process_index() != 0:
            return
        try:
            from kat_jax.training.plots import plot_metrics

            plot_metrics(self.workdir)
        except Exception as e:  # noqa: BLE001 - plots must not fail (or hide the error of) a run
            log.warning("could not draw the metrics plots of %s: %s", self.workdir, e)


class Profiler:
    """A jax.profiler trace of train.profile_steps steps from train.profile_start (0 steps: off),
    written to WORKDIR/profile (staged locally and copied up for a gs:// workdir)."""

    def __init__(self, train_cfg, workdir: str):
        self.start_step, self.steps = train_cfg.profile_start, train_cfg.profile_steps
        self.target = os.path.join(workdir, "profile")
        self.dir = self.target
        if storage.is_remote(workdir):  # the profiler writes local files
            import tempfile

            self.dir = tempfile.mkdtemp(prefix="kat_jax_profile_")
        self.active = False

    def before_step(self, step: int) -> None:
        if self.steps > 0 and step == self.start_step:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, step: int, state) -> None:
        if self.active and step >= self.start_step + self.steps:
            jax.block_until_ready(state["step"])
            self.close()

    def close(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        if self.dir != self.target:
            storage.upload_tree(self.dir, self.target)

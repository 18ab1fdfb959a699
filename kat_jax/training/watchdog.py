"""A step watchdog: a host that stops making progress fails the job instead of hanging it.

A host that dies is noticed by the others (lost collective peers, missed heartbeats). A host that
is alive but stuck outside JAX (a hung filesystem, a deadlocked data loader) still heartbeats, so
every other host would wait in the next collective forever. The watchdog turns that into an exit:
when no step completes for train.step_timeout_s, it prints every thread's stack (where it is
stuck) and ends the process; the other hosts then see its heartbeats stop and exit too. It arms
after the first step (compilation can take minutes) and is off with step_timeout_s <= 0.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

HUNG_EXIT = 75  # distinct from errors (1) and preemption (143)


def _exit_hung(message: str) -> None:
    sys.stderr.write(f"kat-jax: {message}\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(HUNG_EXIT)


class StepWatchdog:
    def __init__(self, timeout_s: float, on_timeout: Callable[[str], None] = _exit_hung,
                 poll_s: float | None = None):
        self.timeout_s = float(timeout_s)
        self.on_timeout = on_timeout
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(0.05, self.timeout_s / 4))
        self._last: float | None = None  # armed by the first beat
        self._step = 0
        self._stop = threading.Event()
        self._thread = None
        if self.timeout_s > 0:
            self._thread = threading.Thread(target=self._run, name="kat_jax_step_watchdog",
                                            daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """A step completed."""
        self._step = step
        self._last = time.monotonic()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            last = self._last
            if last is not None and time.monotonic() - last > self.timeout_s:
                message = (f"no training step completed for {self.timeout_s:g} s after step "
                           f"{self._step} (train.step_timeout_s): this process is stuck; exiting "
                           "so that the job fails instead of hanging (stacks below). The last "
                           "checkpoint is kept: run the same command again to resume")
                log.error("%s", message)
                self.on_timeout(message)
                return

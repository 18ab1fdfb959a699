"""The step watchdog: a process that stops making steps exits (75, with its stacks) instead of
hanging a multi-host job; it stays quiet while steps complete and before the first one."""

import subprocess
import sys
import time

from kat_jax.training.watchdog import HUNG_EXIT, StepWatchdog


def _watch(timeout_s):
    fired = []
    return StepWatchdog(timeout_s, on_timeout=fired.append, poll_s=0.02), fired


def test_fires_when_steps_stop_and_names_the_last_step():
    w, fired = _watch(0.2)
    try:
        w.beat(3)
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        w.close()
    assert len(fired) == 1 and "no training step completed for 0.2 s after step 3" in fired[0]


def test_quiet_while_stepping_and_before_the_first_step():
    w, fired = _watch(0.2)
    try:
        time.sleep(0.5)  # not armed yet (the first step compiles)
        for step in range(1, 15):
            w.beat(step)
            time.sleep(0.04)
    finally:
        w.close()
    assert fired == []
    off = StepWatchdog(0)  # off: no thread
    off.beat(1)
    off.close()


def test_a_stuck_process_exits_with_its_stacks():
    code = ("import time; from kat_jax.training.watchdog import StepWatchdog\n"
            "w = StepWatchdog(0.3, poll_s=0.05); w.beat(7)\n"
            "def stuck_in_the_data_loader():\n    time.sleep(60)\n"
            "stuck_in_the_data_loader()\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == HUNG_EXIT, proc.stderr
    assert time.monotonic() - t0 < 30
    assert "after step 7 (train.step_timeout_s): this process is stuck" in proc.stderr
    assert "stuck_in_the_data_loader" in proc.stderr  # where it was stuck

"""Multi-host training with real JAX processes: 2 processes on this machine (CPU collectives over
gloo, coordinator on 127.0.0.1), each with one device and its own shard of the data, train,
checkpoint (every process writes), stop, resume, and log the losses of a single-process run on
the same global batch. A host that dies makes the other exit with an error, not hang."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MID = os.path.join(ROOT, "configs", "mid_training.py")
SMALL = ["--config.data.row_len=64", "--config.data.rows=2", "--config.data.trajectories=8",
         "--config.train.log_every=1", "--config.train.checkpoint_every=2",
         "--config.optimizer.warmup_steps=1", "--config.data.shards=2", "--config.mesh.fsdp=-1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COORDINATOR_ADDRESS",
                                                            "KAT_JAX_DISTRIBUTED")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _train_cmd(workdir, extra=()):
    return [sys.executable, "-m", "kat_jax.cli", "train", "--config", f"{MID}:tiny",
            "--workdir", str(workdir), *SMALL, *extra]


def _launch(workdir, extra, port, log_dir, tag):
    procs = []
    for pid in range(2):
        dist = ["--config.distributed.initialize=true",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}"]
        log = open(os.path.join(log_dir, f"{tag}-{pid}.log"), "w")
        procs.append((subprocess.Popen(_train_cmd(workdir, [*extra, *dist]), env=_env(1),
                                       stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, timeout):
    deadline = time.monotonic() + timeout
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        finally:
            if p.poll() is None:
                p.kill()
            log.close()
    return codes


def _logs(log_dir, tag):
    out = []
    for pid in range(2):
        with open(os.path.join(log_dir, f"{tag}-{pid}.log")) as f:
            out.append(f"--- process {pid}\n" + f.read()[-4000:])
    return "\n".join(out)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _losses(workdir):
    return {s: r["loss"] for s, r in _rows(workdir).items()}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One process with 2 devices (fsdp=2), 4 steps: the run the multi-process runs must equal."""
    ref = tmp_path_factory.mktemp("ref")
    proc = subprocess.run(_train_cmd(ref, ["--config.train.steps=4"]), env=_env(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ref


def test_two_processes_train_checkpoint_resume_equal_one_process(ref, tmp_path):

    work = tmp_path / "multi"
    logs = tmp_path / "logs"
    logs.mkdir()
    # steps 1-2, then stop as on preemption (checkpoint at step 2, exit 143 on every host)
    procs = _launch(work, ["--config.train.steps=4", "--config.train.stop_at_step=2"],
                    _free_port(), logs, "first")
    assert _wait(procs, 600) == [143, 143], _logs(logs, "first")
    assert sorted(_losses(work)) == [1, 2]
    data_state = sorted(os.listdir(work / "checkpoints" / "2" / "data"))
    assert [n for n in data_state if n.startswith("process_")] == [
        "process_0-of-2.json", "process_1-of-2.json"], data_state  # each host's own position
    # the same command again resumes from step 2 (with a fresh coordinator)
    procs = _launch(work, ["--config.train.steps=4"], _free_port(), logs, "resume")
    assert _wait(procs, 600) == [0, 0], _logs(logs, "resume")

    got, want = _losses(work), _losses(ref)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)],
                               rtol=2e-5)
    assert len(set(want.values())) == 4  # the steps differ (the comparison is not vacuous)
    for step, row in _rows(work).items():  # counters are summed over both hosts
        ref_row = _rows(ref)[step]
        assert [row[k] for k in ("total_tokens", "computed_tokens", "trajectories")] == [
            ref_row[k] for k in ("total_tokens", "computed_tokens", "trajectories")], step
    # the exported model (written by both processes together) equals the single-process one
    check = ("import sys, numpy as np, jax; from kat_jax.models.checkpoint import load_model; "
             "from flax import nnx; a = nnx.state(load_model(sys.argv[1])[0], nnx.Param); "
             "b = nnx.state(load_model(sys.argv[2])[0], nnx.Param); "
             "[np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in "
             "zip(jax.tree.leaves(a), jax.tree.leaves(b))]; print('SAME')")
    out = subprocess.run([sys.executable, "-c", check, str(ref / "model"), str(work / "model")],
                         env=_env(1), capture_output=True, text=True, timeout=300)
    assert "SAME" in out.stdout, out.stderr[-3000:]
    assert not [n for n in os.listdir(work) if ".tmp" in n]


def test_a_dead_host_stops_the_other_with_an_error(tmp_path):
    work = tmp_path / "w"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = _start_long_run(work, logs, "run")
    try:
        procs[1][0].send_signal(signal.SIGKILL)  # host 1 dies mid-training
        t0 = time.monotonic()
        code = procs[0][0].wait(timeout=120)  # host 0 must not hang
        waited = time.monotonic() - t0
    finally:
        _wait(procs, 5)
    text = _logs(logs, "run")
    print(f"host 0 exited with {code} {waited:.1f} s after host 1 died")
    assert code != 0, text
    assert waited < 60, (waited, text)
    # ours (a collective lost its peer) or the coordination service's (missed heartbeats)
    assert ("a cross-host operation failed" in text and "run the same command on every host "
            "to resume" in text) or "another task died" in text or (
            "stopped sending heartbeats" in text), text


def test_hosts_sharing_shards_when_tensor_parallel_spans_them(ref, tmp_path):
    """tensor=2 across the two processes: both hosts hold both data shards (each reads them; one
    counts them). The losses and the logged token counts equal the one-process fsdp=2 run's."""
    work, logs = tmp_path / "multi", tmp_path / "logs"
    logs.mkdir()
    extra = ["--config.train.steps=4", "--config.train.stop_at_step=2", "--config.mesh.fsdp=1",
             "--config.mesh.tensor=2"]
    assert _wait(_launch(work, extra, _free_port(), logs, "tp"), 600) == [143, 143], \
        _logs(logs, "tp")
    got, want = _rows(work), _rows(ref)
    assert sorted(got) == [1, 2]
    for step in (1, 2):
        np.testing.assert_allclose(got[step]["loss"], want[step]["loss"], rtol=2e-5)
        for k in ("total_tokens", "computed_tokens", "trajectories"):
            assert got[step][k] == want[step][k], (step, k)


def _start_long_run(work, logs, tag, extra=()):
    """Both processes on a long run; returns once process 0 has logged a step."""
    procs = _launch(work, ["--config.train.steps=100000", "--config.train.checkpoint_every=1000",
                           "--config.distributed.heartbeat_timeout_s=5", *extra],
                    _free_port(), logs, tag)
    deadline = time.monotonic() + 400
    while not (work / "metrics.jsonl").exists() or not _losses(work):
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            _wait(procs, 1)
            raise AssertionError(_logs(logs, tag))
        time.sleep(0.5)
    return procs


def test_sigterm_on_one_host_makes_every_host_save_and_exit_143(tmp_path):
    """A preemption notice reaches one host; JAX's preemption service makes all hosts agree on the
    step, save one checkpoint together and exit 143 (a host stopping alone would hang the rest)."""
    work, logs = tmp_path / "w", tmp_path / "logs"
    logs.mkdir()
    procs = _start_long_run(work, logs, "term")
    procs[1][0].send_signal(signal.SIGTERM)
    codes = _wait(procs, 120)
    text = _logs(logs, "term")
    assert codes == [143, 143], text
    steps = [int(m.group(1)) for m in re.finditer(r"preempted: SIGTERM at step (\d+)", text)]
    assert len(steps) == 2 and steps[0] == steps[1], text  # the same step on both hosts
    saved = work / "checkpoints" / str(steps[0])
    assert sorted(n for n in os.listdir(saved / "data") if n.startswith("process_")) == [
        "process_0-of-2.json", "process_1-of-2.json"]

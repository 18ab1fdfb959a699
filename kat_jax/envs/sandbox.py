"""The sandbox protocol shared by the local and docker backends, output capping, and a warm pool.

The backends (local_sandbox, docker_sandbox) import this module; the registry of backends by name
and ``make_sandbox`` live in kat_jax.envs.sandbox_backends, which imports them.

A sandbox holds one working copy of a repository (``workdir``) that the agent's commands run in. It
starts from a directory (local backend) or an image (docker backend), runs shell commands with a
timeout, reads and writes files, and reports the diff of the working copy against its start (a git
baseline commit made at start when the source is not a git repository).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import queue
import shlex
import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

DEFAULT_OUTPUT_LIMIT = 16_384
GIT = "git -c user.name=kat -c user.email=kat@localhost -c safe.directory=* -c core.pager=cat"
# Fixed dates make the baseline commit of a plain directory reproducible (same tree -> same hash).
BASELINE_ENV = {"GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"}
# Left out when a source directory is copied into a sandbox (both backends: same tree, same baseline).
COPY_IGNORE = ("__pycache__", "*.pyc", ".pytest_cache")


@dataclasses.dataclass
class ExecResult:
    """The result of one command. ``output`` is stdout and stderr interleaved, capped to a limit."""

    exit_code: int
    output: str
    timed_out: bool = False
    truncated: bool = False
    killed_reason: str | None = None   # "timeout" or "output_limit" when the sandbox killed the command

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class SandboxError(RuntimeError):
    """The sandbox itself failed (could not start, vanished): an infrastructure error."""


@runtime_checkable
class Sandbox(Protocol):
    """What every backend provides. ``close`` is idempotent; all other calls need an open sandbox."""

    workdir: str

    def exec(self, cmd: str, timeout: float = 60.0, cwd: str | None = None,
             output_limit: int = DEFAULT_OUTPUT_LIMIT) -> ExecResult: ...

    def read_file(self, path: str) -> bytes: ...

    def write_file(self, path: str, data: bytes) -> None: ...

    def diff(self) -> str: ...

    def add_readonly_dir(self, host_dir: str, name: str) -> str:
        """Copies host directory ``host_dir`` into the sandbox outside the working copy, read-only
        for the sandbox's user (replacing an earlier copy of the same ``name``); returns its path
        inside the sandbox."""
        ...

    def healthy(self) -> bool: ...

    def close(self) -> None: ...


class SandboxLifecycle(abc.ABC):
    """What every sandbox backend shares about its life: a closed flag under a lock, healthy()
    that is False once closed or when the backend's `_probe()` fails (a SandboxError), close()
    whose work (`_close()`) runs once whatever the number of callers, and `with` support."""

    def _init_lifecycle(self) -> None:
        self._closed = False
        self._lock = threading.Lock()

    def healthy(self) -> bool:
        if self._closed:
            return False
        try:
            return self._probe()
        except SandboxError:
            return False

    def close(self) -> None:
        """Releases the sandbox (see the backend's _close); idempotent and thread-safe."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._close()

    @abc.abstractmethod
    def _probe(self) -> bool:
        """Whether the sandbox still runs commands (a SandboxError counts as no)."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release what the sandbox holds; called once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OutputCap:
    """Keeps the head and the tail of a byte stream, dropping the middle beyond ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = max(int(limit), 64)
        self.head = bytearray()
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_len = 0
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail.append(chunk)
            self.tail_len += len(chunk)
            keep = self.limit - self.limit // 2
            while self.tail and self.tail_len - len(self.tail[0]) >= keep:
                self.tail_len -= len(self.tail.popleft())

    @property
    def truncated(self) -> bool:
        return self.total > self.limit

    def text(self) -> str:
        tail = b"".join(self.tail)
        if not self.truncated:
            return (bytes(self.head) + tail).decode("utf-8", "replace")
        keep = self.limit - self.limit // 2
        tail = tail[-keep:]
        dropped = self.total - len(self.head) - len(tail)
        return (bytes(self.head).decode("utf-8", "replace")
                + f"\n[... {dropped} bytes of output truncated ...]\n"
                + tail.decode("utf-8", "replace"))


def git_baseline_script(base_commit: str | None) -> str:
    """Shell that makes HEAD the start of the diff: checks out ``base_commit`` in a git repository, or
    commits the whole tree of a plain directory as the baseline. Prints the baseline hash."""
    env = " ".join(f"{k}={v}" for k, v in BASELINE_ENV.items())
    if base_commit:
        checkout = (f"{GIT} checkout -q -f {shlex.quote(base_commit)} 2>/dev/null || "
                    f"{{ echo 'base_commit not found'; exit 3; }}")
    else:
        checkout = "true"
    return (f"if [ -d .git ]; then {checkout} && {GIT} clean -qfdx; else "
            f"{GIT} init -q && {GIT} add -A && {env} {GIT} commit -q --allow-empty -m baseline; fi "
            f"&& {GIT} rev-parse HEAD")


def git_diff_script(base: str) -> str:
    """Shell that prints the working copy's diff (new files included) against ``base``."""
    return f"{GIT} add -A >/dev/null 2>&1; {GIT} diff --cached --binary {shlex.quote(base)}"


def git_baseline(sb: Sandbox, base_commit: str | None, timeout: float) -> str:
    """Runs git_baseline_script in ``sb``; returns the baseline commit every diff is taken against."""
    r = sb.exec(git_baseline_script(base_commit), timeout=timeout)
    if r.exit_code != 0:
        raise SandboxError(f"could not set up the baseline commit: {r.output[-2000:]}")
    return r.output.strip().splitlines()[-1]


def git_commit_all(sb: Sandbox, message: str, timeout: float) -> str:
    """Commits the whole working copy (untracked files included, ignored ones not) with fixed dates
    and returns the commit: after instance setup, the set-up tree becomes the start of the diff, so
    what setup generated is never part of the agent's patch."""
    env = " ".join(f"{k}={v}" for k, v in BASELINE_ENV.items())
    r = sb.exec(f"{GIT} add -A && {env} {GIT} commit -q --allow-empty -m {shlex.quote(message)} "
                f"&& {GIT} rev-parse HEAD", timeout=timeout)
    if r.exit_code != 0:
        raise SandboxError(f"could not commit the set-up working copy: {r.output[-2000:]}")
    return r.output.strip().splitlines()[-1]


def git_diff(sb: Sandbox, base: str) -> str:
    """The working copy's changes in ``sb`` (new files included) against ``base``, as a git patch."""
    r = sb.exec(git_diff_script(base), timeout=120, output_limit=64 << 20)
    if r.exit_code != 0 or r.truncated:
        raise SandboxError(f"git diff failed: {r.output[-2000:]}")
    return r.output


class SandboxPool:
    """A pool of warm sandboxes made by ``factory``; ``acquire`` hands out a healthy one.

    A sandbox is handed out once: after an episode its working copy is dirty, so ``release`` closes it
    and a fresh one is warmed in the background to keep ``size`` ready. ``close`` closes them all
    (idempotent).
    """

    def __init__(self, factory: Callable[[], Sandbox], size: int = 2, warm: bool = True) -> None:
        self.factory, self.size = factory, size
        self._ready: queue.Queue[Sandbox] = queue.Queue()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        if warm:
            for _ in range(size):
                self._refill()

    def _warm_one(self) -> None:
        try:
            sb = self.factory()
        except Exception:  # noqa: BLE001  (acquire builds one synchronously and reports the error)
            return
        with self._lock:
            if self._closed:
                sb.close()
                return
            self._ready.put(sb)

    def _refill(self) -> None:
        t = threading.Thread(target=self._warm_one, daemon=True)
        t.start()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def acquire(self, timeout: float = 0.0) -> Sandbox:
        """A healthy warm sandbox (waiting up to ``timeout`` s for one), else a newly built one."""
        if self._closed:
            raise SandboxError("pool is closed")
        while True:
            try:
                sb = self._ready.get(timeout=timeout) if timeout > 0 else self._ready.get_nowait()
            except queue.Empty:
                return self.factory()   # the warm ones in flight keep the pool at ``size``
            self._refill()
            if sb.healthy():
                return sb
            sb.close()

    def release(self, sb: Sandbox) -> None:
        sb.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=60)
        while True:
            try:
                self._ready.get_nowait().close()
            except queue.Empty:
                break

"""Local sandbox: a copy of the repository in a temp dir, commands isolated as far as this host allows.

Every command runs as ``bash`` in a new process group (session) with rlimits set by ``ulimit``: CPU time
(``-t``), address space (``-v``), file size (``-f``), processes (``-u``), no core files. On top of that,
detected at runtime once per process (:func:`probe_isolation`):

- **network**: a new, empty network namespace (``unshare -n`` as root, ``unshare -rn`` otherwise) holding
  only a down loopback, so no connection can be opened;
- **pid namespace** (``unshare -p -f --kill-child``): when the command ends or is killed, the kernel
  kills every process it started, including ones that left the process group with ``setsid``;
- **unprivileged uid**: when the host process is root, commands run under a uid of their own
  (``setpriv --reuid``, no capabilities, no new privileges), which owns only the working copy: it cannot
  write outside it (except world-writable places such as /tmp), and ``ulimit -u`` then really caps its
  processes (the kernel exempts root from that limit). A fork bomb meets ``-u``.

Weaker mode, where the kernel forbids namespaces (``unshare`` fails): commands keep the network of the
host and background processes are killed by process group only (a ``setsid`` escapee survives until
:meth:`LocalSandbox.close`, which kills what it can find by uid). ``Isolation.describe()`` says which
mode is active. This is not a filesystem jail: the host's files stay readable; use the docker backend
where that matters.

Output: stdout and stderr interleaved, head and tail kept up to ``output_limit`` bytes; a command that
writes more than ``kill_output_bytes`` is killed (``killed_reason="output_limit"``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

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

_UID_BASE, _UID_SPAN = 200_000, 60_000
_uid_counter = itertools.count()


@dataclasses.dataclass(frozen=True)
class Isolation:
    """Which isolation this host allows for local sandboxes (see the module docstring)."""

    network: bool
    pid_namespace: bool
    drop_uid: bool
    prefix: tuple[str, ...]          # argv prefix (unshare ...) put before every command
    python: str                      # interpreter the sandboxed commands get as ``python``

    def describe(self) -> str:
        parts = ["network namespace (no network)" if self.network else "host network (NOT isolated)",
                 "pid namespace (all descendants killed)" if self.pid_namespace
                 else "process-group kill only",
                 "own unprivileged uid" if self.drop_uid else "runs as the calling user"]
        return ", ".join(parts)


def _try(argv: list[str], timeout: float = 10.0) -> bool:
    try:
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd="/",
                           stderr=subprocess.DEVNULL, timeout=timeout, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _setpriv(uid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"]


@functools.cache
def probe_isolation(allow_namespaces: bool = True, allow_drop_uid: bool = True) -> Isolation:
    """Detects the strongest isolation available (cached per process)."""
    root = os.geteuid() == 0
    prefix: tuple[str, ...] = ()
    network = pid = False
    if allow_namespaces and shutil.which("unshare"):
        base = ["unshare", "-n"] if root else ["unshare", "-r", "-n"]
        for cand, has_pid in ((base + ["-p", "-f", "--kill-child"], True), (base, False)):
            if _try(cand + ["true"]):
                prefix, network, pid = tuple(cand), True, has_pid
                break
    drop = bool(allow_drop_uid and root and shutil.which("setpriv"))
    candidates = [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    python = next((c for c in candidates if c and os.path.exists(c)), sys.executable)
    if drop:
        probe_uid = _UID_BASE + _UID_SPAN - 1
        runs = lambda c: _try([*prefix, *_setpriv(probe_uid), "/bin/bash", "-c",
                               f"{shlex.quote(c)} -c 0"])
        ok = [c for c in candidates if c and runs(c)]
        if ok:
            python = ok[0]
        else:
            drop = False
    return Isolation(network=network, pid_namespace=pid, drop_uid=drop, prefix=prefix, python=python)


def _make_writable(path: str) -> None:
    """Gives the owner write access again to a tree made read-only (so that it can be removed)."""
    for dirpath, _dirnames, _filenames in os.walk(path):
        os.chmod(dirpath, 0o755)


def _procs_of_uid(uid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    pids.append(int(name))
            except OSError:
                pass
    return pids


class LocalSandbox(SandboxLifecycle):
    """A sandbox on this machine (see the module docstring for the isolation).

    Args:
      source: directory (plain or a git repository) copied as the working copy.
      base_commit: in a git ``source``, the commit checked out as the start; a plain directory is
        committed as a baseline (fixed dates, so the same tree always gives the same hash).
      cpu_seconds, memory_mb, file_size_mb, max_procs: rlimits of every command.
      kill_output_bytes: a command printing more than this is killed.
      isolation: override :func:`probe_isolation` (tests use it to force the weaker mode).
    """

    def __init__(self, source: str, base_commit: str | None = None, *, cpu_seconds: int = 600,
                 memory_mb: int = 4096, file_size_mb: int = 256, max_procs: int = 256,
                 kill_output_bytes: int = 32 << 20, isolation: Isolation | None = None,
                 start_timeout: float = 120.0) -> None:
        if not os.path.isdir(source):
            raise SandboxError(f"sandbox source {source!r} is not a directory")
        self.iso = isolation or probe_isolation()
        self.limits = dict(cpu=cpu_seconds, mem_kb=memory_mb * 1024, fsize=file_size_mb * 1024,
                           nproc=max_procs)
        self.kill_output_bytes = kill_output_bytes
        self._init_lifecycle()
        self._running: set[subprocess.Popen] = set()
        self.uid = (_UID_BASE + (os.getpid() * 97 + next(_uid_counter)) % _UID_SPAN
                    if self.iso.drop_uid else None)
        self.root = tempfile.mkdtemp(prefix="kat-sbx-")
        try:
            self._setup(source, base_commit, start_timeout)
        except BaseException:
            self.close()
            raise

    def _setup(self, source: str, base_commit: str | None, timeout: float) -> None:
        os.chmod(self.root, 0o755)
        self.workdir = os.path.join(self.root, "work")
        self.home = os.path.join(self.root, "home")
        shutil.copytree(source, self.workdir, symlinks=True,
                        ignore=shutil.ignore_patterns(*COPY_IGNORE))
        os.makedirs(os.path.join(self.home, "tmp"))
        bindir = os.path.join(self.root, "bin")
        os.makedirs(bindir)
        for name in ("python", "python3"):
            os.symlink(self.iso.python, os.path.join(bindir, name))
        if not self.iso.drop_uid and not self.iso.prefix and os.geteuid() != 0:
            # -u counts every process of this user: leave room for the ones already running.
            self.limits["nproc"] += len(_procs_of_uid(os.geteuid()))
        if self.uid is not None:
            for d in (self.workdir, self.home):
                os.chown(d, self.uid, self.uid)
                for dirpath, dirnames, filenames in os.walk(d):
                    for n in dirnames + filenames:
                        os.chown(os.path.join(dirpath, n), self.uid, self.uid, follow_symlinks=False)
        self.env = {"PATH": f"{bindir}:/usr/local/bin:/usr/bin:/bin", "HOME": self.home,
                    "TMPDIR": os.path.join(self.home, "tmp"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                    "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "TERM": "dumb",
                    "GIT_CONFIG_NOSYSTEM": "1", "PAGER": "cat"}
        self.base = git_baseline(self, base_commit, timeout)

    # -- commands -----------------------------------------------------------------------------
    def _argv(self, cmd: str, cwd: str) -> list[str]:
        lim = self.limits
        script = (f"ulimit -c 0 -t {lim['cpu']} -v {lim['mem_kb']} -f {lim['fsize']} -u {lim['nproc']}"
                  f" || exit 125; cd \"$1\" || exit 126; eval \"$2\"")
        user = _setpriv(self.uid) if self.uid is not None else []
        return [*self.iso.prefix, *user, "/bin/bash", "-c", script, "kat-sbx", cwd, cmd]

    def exec(self, cmd: str, timeout: float = 60.0, cwd: str | None = None,
             output_limit: int = DEFAULT_OUTPUT_LIMIT) -> ExecResult:
        """Runs ``cmd`` with bash in ``cwd`` (default: the working copy); kills everything on timeout."""
        if self._closed:
            raise SandboxError("sandbox is closed")
        cwd = self._resolve(cwd) if cwd else self.workdir
        try:
            p = subprocess.Popen(self._argv(cmd, cwd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=self.env, start_new_session=True,
                                 close_fds=True)
        except OSError as e:
            raise SandboxError(f"cannot start a command: {e}") from e
        with self._lock:
            self._running.add(p)
        cap, reason = OutputCap(output_limit), None
        deadline = time.monotonic() + timeout
        fd = p.stdout.fileno()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    reason = "timeout"
                    break
                ready, _, _ = select.select([fd], [], [], min(left, 1.0))
                if not ready:
                    continue
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    break
                cap.feed(chunk)
                if cap.total > self.kill_output_bytes:
                    reason = "output_limit"
                    break
            if reason is None:
                try:
                    p.wait(timeout=max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    reason = "timeout"
        finally:
            self._kill_group(p)
            p.stdout.close()
            p.wait()
            with self._lock:
                self._running.discard(p)
        text = cap.text()
        if reason == "timeout":
            text += f"\n[command timed out after {timeout:g}s and was killed]"
        elif reason == "output_limit":
            text += f"\n[command killed: more than {self.kill_output_bytes} bytes of output]"
        code = p.returncode if reason is None else 137
        return ExecResult(exit_code=code, output=text, timed_out=reason == "timeout",
                          truncated=cap.truncated, killed_reason=reason)

    @staticmethod
    def _kill_group(p: subprocess.Popen) -> None:
        for _ in range(3):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                return

    # -- files --------------------------------------------------------------------------------
    def _resolve(self, path: str) -> str:
        """Absolute host path of ``path`` (relative to the working copy), refused outside of it."""
        full = os.path.realpath(os.path.join(self.workdir, path))
        work = os.path.realpath(self.workdir)
        if full != work and not full.startswith(work + os.sep):
            raise ValueError(f"path {path!r} is outside the working copy {self.workdir}")
        return full

    def read_file(self, path: str) -> bytes:
        full = self._resolve(path)
        with open(full, "rb") as f:
            return f.read()

    def write_file(self, path: str, data: bytes) -> None:
        full = self._resolve(path)
        parent = os.path.dirname(full)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        if self.uid is not None:
            for p in [full, *missing]:
                os.chown(p, self.uid, self.uid)

    def add_readonly_dir(self, host_dir: str, name: str) -> str:
        """Copies ``host_dir`` to ``<sandbox root>/ro/<name>`` (outside the working copy), owned by
        the calling user and read-only (dirs 0o555, files 0o444): the sandbox's own uid can read it
        but not change it. Returns the copy's path."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"add_readonly_dir: bad name {name!r}")
        dest = os.path.join(self.root, "ro", name)
        if os.path.exists(dest):
            _make_writable(dest)
            shutil.rmtree(dest)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        shutil.copytree(host_dir, dest, ignore=shutil.ignore_patterns(*COPY_IGNORE))
        for dirpath, _dirnames, filenames in os.walk(dest, topdown=False):
            for n in filenames:
                os.chmod(os.path.join(dirpath, n), 0o444)
            os.chmod(dirpath, 0o555)
        return dest

    def diff(self) -> str:
        """The working copy's changes (new files included) against the start, as a git patch."""
        return git_diff(self, self.base)

    # -- lifecycle ----------------------------------------------------------------------------
    def _probe(self) -> bool:
        return self.exec("true", timeout=20).exit_code == 0

    def _close(self) -> None:
        """Kills whatever still runs and deletes the working copy."""
        with self._lock:
            running = list(self._running)
        for p in running:
            self._kill_group(p)
        if self.uid is not None:
            for _ in range(5):
                pids = _procs_of_uid(self.uid)
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
        ro = os.path.join(self.root, "ro")
        if os.path.isdir(ro):
            _make_writable(ro)
        shutil.rmtree(self.root, ignore_errors=True)


    def __repr__(self) -> str:
        return f"LocalSandbox({self.root!r}, {self.iso.describe()})"


"""Coding tools over a sandbox: ``bash`` (cwd kept between calls) and ``str_replace_editor``.

The editor follows the SWE-agent / Anthropic ``str_replace_editor`` contract: ``view`` (a file with line
numbers, optionally a ``view_range``, or a directory two levels deep), ``create`` (a new file),
``str_replace`` (``old_str`` must occur exactly once), ``insert`` (``new_str`` after line
``insert_line``, 0 = top) and ``undo_edit`` (reverts the last edit of that file). Errors are returned as
``ValueError`` so the environment turns them into error tool-result messages.
"""

from __future__ import annotations

import posixpath
import shlex
import threading
from typing import Any

from kat_jax.envs.base import ToolSchema, function_schema
from kat_jax.envs.sandbox import Sandbox

_CWD_MARK = "__KAT_CWD__"
SNIPPET_LINES = 4


def bash_schema(max_timeout: float) -> ToolSchema:
    return function_schema(
        "bash",
        "Run a bash command in the repository. The working directory is kept between calls "
        "(environment variables and background processes are not). Output is truncated when long.",
        {"command": {"type": "string", "description": "The bash command to run."},
         "timeout": {"type": "number",
                     "description": f"Seconds before the command is killed (at most {max_timeout:g})."}},
        ["command"])


EDITOR_SCHEMA = function_schema(
    "str_replace_editor",
    "View, create and edit files. `view` shows a file with line numbers (or a directory); `create` "
    "writes a new file; `str_replace` replaces `old_str`, which must occur exactly once, by `new_str`; "
    "`insert` adds `new_str` after line `insert_line` (0 = top); `undo_edit` reverts the last edit.",
    {"command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "undo_edit"]},
     "path": {"type": "string", "description": "Absolute path, or relative to the repository root."},
     "file_text": {"type": "string", "description": "Content of the file for `create`."},
     "old_str": {"type": "string"}, "new_str": {"type": "string"},
     "insert_line": {"type": "integer"},
     "view_range": {"type": "array", "items": {"type": "integer"},
                    "description": "[start, end] lines for `view` (1-based, end -1 = to the end)."}},
    ["command", "path"])


class BashTool:
    """``bash``: runs a command in the sandbox; a ``cd`` persists to the next call."""

    def __init__(self, sandbox: Sandbox, default_timeout: float = 60.0, max_timeout: float = 300.0,
                 output_limit: int = 16_384) -> None:
        self.sb, self.default_timeout, self.max_timeout = sandbox, default_timeout, max_timeout
        self.output_limit = output_limit
        self.cwd = sandbox.workdir
        self.schema = bash_schema(max_timeout)

    def __call__(self, args: dict[str, Any]) -> str:
        command = args.get("command")
        if not isinstance(command, str) or not command.strip():
            raise ValueError("`command` must be a non-empty string")
        timeout = float(args.get("timeout") or self.default_timeout)
        timeout = min(max(timeout, 1.0), self.max_timeout)
        script = (f"cd {shlex.quote(self.cwd)} 2>/dev/null || cd {shlex.quote(self.sb.workdir)}\n"
                  f"{command}\n__kat_rc=$?\nprintf '\\n{_CWD_MARK}%s\\n' \"$PWD\"\nexit $__kat_rc")
        r = self.sb.exec(script, timeout=timeout, output_limit=self.output_limit)
        out = r.output
        pos = out.rfind(_CWD_MARK)
        if pos >= 0:
            end = out.find("\n", pos)
            self.cwd = out[pos + len(_CWD_MARK): end if end >= 0 else None].strip() or self.cwd
            out = out[:pos].rstrip("\n") + (out[end:] if end >= 0 else "")
            out = out.rstrip("\n")
        if r.timed_out:
            return f"{out}\n[timed out after {timeout:g}s; the command was killed]".lstrip("\n")
        if r.killed_reason == "output_limit":
            return f"{out}\n[killed: too much output]".lstrip("\n")
        if r.exit_code != 0:
            return f"{out}\n[exit code {r.exit_code}]".lstrip("\n")
        return out or "[no output]"


class EditorTool:
    """``str_replace_editor`` over the sandbox's files, with a per-file undo history."""

    schema = EDITOR_SCHEMA

    def __init__(self, sandbox: Sandbox, max_view_chars: int = 16_384) -> None:
        self.sb, self.max_view_chars = sandbox, max_view_chars
        self.history: dict[str, list[bytes | None]] = {}
        self._lock = threading.Lock()

    def _path(self, path: Any) -> str:
        if not isinstance(path, str) or not path:
            raise ValueError("`path` must be a non-empty string")
        full = posixpath.normpath(posixpath.join(self.sb.workdir, path))
        root = posixpath.normpath(self.sb.workdir)
        if full != root and not full.startswith(root + "/"):
            raise ValueError(f"path {path} is outside the repository {self.sb.workdir}")
        return full

    def _read(self, path: str) -> str | None:
        try:
            return self.sb.read_file(path).decode("utf-8", "replace")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def _is_dir(self, path: str) -> bool:
        return self.sb.exec(f"test -d {shlex.quote(path)}", timeout=30).exit_code == 0

    def _save(self, path: str, text: str) -> None:
        with self._lock:
            prev = None
            try:
                prev = self.sb.read_file(path)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                pass
            self.history.setdefault(path, []).append(prev)
        self.sb.write_file(path, text.encode())

    def _snippet(self, text: str, line: int, n_new: int) -> str:
        lines = text.split("\n")
        lo, hi = max(line - SNIPPET_LINES, 0), min(line + n_new + SNIPPET_LINES, len(lines))
        return "\n".join(f"{i + 1:6d}\t{lines[i]}" for i in range(lo, hi))

    def __call__(self, args: dict[str, Any]) -> str:
        cmd = args.get("command")
        path = self._path(args.get("path"))
        fn = {"view": self.view, "create": self.create, "str_replace": self.str_replace,
              "insert": self.insert, "undo_edit": self.undo_edit}.get(cmd)
        if fn is None:
            raise ValueError(f"unknown command {cmd!r}: use view, create, str_replace, insert or "
                             "undo_edit")
        return fn(path, args)

    def view(self, path: str, args: dict[str, Any]) -> str:
        text = self._read(path)
        if text is None:
            if not self._is_dir(path):
                raise ValueError(f"{path} does not exist")
            r = self.sb.exec(f"find {shlex.quote(path)} -maxdepth 2 -not -path '*/.*' | sort",
                             timeout=30)
            return f"Files and directories up to 2 levels deep in {path}:\n{r.output.rstrip()}"
        lines = text.split("\n")
        start, end = 1, len(lines)
        rng = args.get("view_range")
        if rng is not None:
            if (not isinstance(rng, list) or len(rng) != 2
                    or not all(isinstance(x, int) for x in rng)):
                raise ValueError("`view_range` must be [start, end]")
            start, end = rng[0], (len(lines) if rng[1] == -1 else rng[1])
            if not 1 <= start <= len(lines) or end < start:
                raise ValueError(f"invalid view_range {rng}: the file has {len(lines)} lines")
            end = min(end, len(lines))
        body = "\n".join(f"{i:6d}\t{lines[i - 1]}" for i in range(start, end + 1))
        if len(body) > self.max_view_chars:
            body = body[: self.max_view_chars] + "\n[... truncated; use view_range ...]"
        return f"Here's the result of running `cat -n` on {path}:\n{body}"

    def create(self, path: str, args: dict[str, Any]) -> str:
        text = args.get("file_text")
        if not isinstance(text, str):
            raise ValueError("`file_text` is required for create")
        if self._read(path) is not None or self._is_dir(path):
            raise ValueError(f"{path} already exists; use str_replace to edit it")
        self._save(path, text)
        return f"File created successfully at: {path}"

    def str_replace(self, path: str, args: dict[str, Any]) -> str:
        old, new = args.get("old_str"), args.get("new_str", "")
        if not isinstance(old, str) or not old:
            raise ValueError("`old_str` is required for str_replace")
        if not isinstance(new, str):
            raise ValueError("`new_str` must be a string")
        text = self._read(path)
        if text is None:
            raise ValueError(f"{path} is not a file")
        count = text.count(old)
        if count == 0:
            raise ValueError(f"no replacement: `old_str` does not appear verbatim in {path}")
        if count > 1:
            lines = [i + 1 for i, ln in enumerate(text.split("\n")) if old.split("\n")[0] in ln]
            raise ValueError(f"no replacement: `old_str` occurs {count} times (lines {lines}); "
                             "make it unique")
        self._save(path, text.replace(old, new, 1))
        line = text[: text.index(old)].count("\n")
        new_text = text.replace(old, new, 1)
        return (f"The file {path} has been edited. Snippet:\n"
                f"{self._snippet(new_text, line, new.count(chr(10)) + 1)}")

    def insert(self, path: str, args: dict[str, Any]) -> str:
        new, at = args.get("new_str"), args.get("insert_line")
        if not isinstance(new, str) or not isinstance(at, int) or isinstance(at, bool):
            raise ValueError("insert needs `new_str` (string) and `insert_line` (integer)")
        text = self._read(path)
        if text is None:
            raise ValueError(f"{path} is not a file")
        lines = text.split("\n")
        if not 0 <= at <= len(lines):
            raise ValueError(f"`insert_line` {at} is out of range [0, {len(lines)}]")
        new_text = "\n".join(lines[:at] + new.split("\n") + lines[at:])
        self._save(path, new_text)
        return (f"The file {path} has been edited. Snippet:\n"
                f"{self._snippet(new_text, at, new.count(chr(10)) + 1)}")

    def undo_edit(self, path: str, args: dict[str, Any]) -> str:
        with self._lock:
            stack = self.history.get(path)
            if not stack:
                raise ValueError(f"no edit to undo for {path}")
            prev = stack.pop()
        if prev is None:
            self.sb.exec(f"rm -f {shlex.quote(path)}", timeout=30)
            return f"Undid the creation of {path} (file removed)."
        self.sb.write_file(path, prev)
        return f"Last edit to {path} undone."

"""Paths that may be local or on cloud storage (gs://bucket/...): the few file operations the
trainer, checkpoints and data sources need, through etils.epath (gs:// needs gcsfs:
`pip install 'kat_jax[gcs]'`). Arrays never pass through here: orbax writes them with tensorstore,
which reads gs:// itself.

Local writes of single files are atomic (temporary file, then os.replace); on cloud storage one
object write is atomic by itself. Directories cannot be renamed atomically there, so directory
outputs (kat_jax.models.checkpoint) write their marker file last instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def absolute(path: str | os.PathLike) -> str:
    """os.path.abspath for local paths; remote paths unchanged."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return os.path.join(str(path), *parts)


def _require_backend(path: str) -> None:
    if str(path).startswith("gs://"):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise ImportError(f"{path}: gs:// paths need gcsfs; pip install 'kat_jax[gcs]'"
                              ) from None


def path(p: str | os.PathLike) -> epath.Path:
    if is_remote(p):
        _require_backend(str(p))
        return epath.Path(str(p))
    return epath.Path(os.path.abspath(p))


def exists(p: str) -> bool:
    return os.path.exists(p) if not is_remote(p) else path(p).exists()


def isdir(p: str) -> bool:
    return os.path.isdir(p) if not is_remote(p) else path(p).is_dir()


def isfile(p: str) -> bool:
    if not is_remote(p):
        return os.path.isfile(p)
    q = path(p)
    return q.exists() and not q.is_dir()


def listdir(p: str) -> list[str]:
    return os.listdir(p) if not is_remote(p) else [c.name for c in path(p).iterdir()]


def makedirs(p: str) -> None:
    if is_remote(p):
        path(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=True)


def rmtree(p: str) -> None:
    """Remove a directory tree (nothing if it is absent)."""
    if not is_remote(p):
        shutil.rmtree(p, ignore_errors=True)
    elif path(p).exists():
        path(p).rmtree()


def read_text(p: str) -> str:
    if not is_remote(p):
        with open(p) as f:
            return f.read()
    return path(p).read_text()


def write_text(p: str, text: str) -> None:
    """Write a whole file atomically (readers see the old content or the new, never a part)."""
    if is_remote(p):
        path(p).write_text(text)
        return
    from kat_jax.atomic_io import atomic_file

    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    with atomic_file(p) as f:
        f.write(text)


def copy_file(src: str, dst: str) -> None:
    """Copy one file between any two locations (local or remote), replacing dst."""
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
        return
    path(src).copy(path(dst), overwrite=True)


def upload_tree(local_dir: str, dst: str) -> None:
    """Copy a local directory tree into dst (local or remote), file by file."""
    for root, _dirs, files in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        target = dst if rel == "." else join(dst, rel)
        makedirs(target)
        for name in files:
            copy_file(os.path.join(root, name), join(target, name))


_CACHE: dict[str, str] = {}


def local_copy(p: str) -> str:
    """A local path holding the file p: p itself when local; a remote file is downloaded once per
    process into a temporary directory, removed when the process exits (data files are read many
    times, at random offsets)."""
    if not is_remote(p):
        return p
    if p not in _CACHE:
        root = os.path.join(tempfile.gettempdir(), f"kat_jax_cache_{os.getpid()}")
        if not os.path.isdir(root):
            import atexit

            os.makedirs(root)
            atexit.register(shutil.rmtree, root, ignore_errors=True)  # removed at exit
        name = hashlib.sha1(p.encode()).hexdigest()[:16] + "_" + os.path.basename(p)
        local = os.path.join(root, name)
        tmp = local + ".part"
        copy_file(p, tmp)
        os.replace(tmp, local)
        _CACHE[p] = local
    return _CACHE[p]


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob pattern, local or remote (gs://b/data/*.jsonl)."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    if "**" in pattern:
        raise ValueError(f"{pattern}: '**' is not supported for remote paths; list the "
                         "directories, or use one '*' per level")
    first = min(i for i, c in enumerate(pattern) if c in "*?[")
    bucket_end = pattern.find("/", pattern.index("://") + 3)
    if bucket_end < 0 or first < bucket_end:
        raise ValueError(f"{pattern}: wildcards are allowed in object names, not in the bucket")
    base = pattern[:pattern.rfind("/", 0, first)]
    rest = pattern[len(base) + 1:]
    return sorted(str(m) for m in path(base).glob(rest))

"""Files that are either the old version or the complete new one, never a part (a killed run, a reader).

The temporary file sits in the target's folder because os.replace is only atomic within one file
system. It gets the permissions a plain open() would (0666 minus the umask): mkstemp's 0600 would
leave metrics and images unreadable to the rest of a team.
"""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, not while other threads create files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def write_with(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object]) -> str:
    """Calls write_fn on a temporary file beside `path`, syncs it and renames it into place; returns the path."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
    return write_with(path, lambda f: f.write(data))

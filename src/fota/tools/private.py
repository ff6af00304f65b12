"""Files and directories only their owner may read: 0700 directories, 0600 files.

A fota home holds secrets (the database with wrapped keys, the KEK, signing keys, broker and
device passwords); device directories hold a device's broker password and payload key. Modes
are set explicitly (chmod after creation), whatever the process's umask, and also tightened on
what an older version created with wider modes.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_tree", "tighten", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and missing parents) and make it 0700; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def tighten(path: str | os.PathLike) -> None:
    """Drop group and other permissions of an existing file or directory (no-op if missing)."""
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


def private_tree(root: str | os.PathLike) -> None:
    """Tighten ``root`` and everything under it (a device directory, a home made before)."""
    root = Path(root)
    if not root.exists():
        return
    tighten(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            tighten(os.path.join(dirpath, name))


def write_private(path: str | os.PathLike, data: str | bytes, exclusive: bool = False) -> Path:
    """Write ``data`` to a 0600 file, atomically (a temporary file renamed over it).

    exclusive: fail with FileExistsError if ``path`` exists (a key created once)."""
    path = Path(path)
    if not path.parent.exists():
        private_dir(path.parent)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, raw)
        os.fsync(fd)
    finally:
        os.close(fd)
    if exclusive:
        try:
            os.link(tmp, path)  # fails if another process created it meanwhile
        finally:
            tmp.unlink()
    else:
        tmp.replace(path)
    return path

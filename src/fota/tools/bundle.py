"""App bundles (docs/protocol.md §7): a flat stream of files the device unpacks.

    "FOTB" | version u8 = 1 | count u16 BE | count x (name len u16 BE | name | size u32 BE | data)

The device-side reader is fota.device.bundle; this is the CPython writer (and a reader
for tests and tooling). Both refuse the same names.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

__all__ = ["MAGIC", "VERSION", "BundleError", "check_name", "pack_dir", "pack_files", "unpack"]

MAGIC = b"FOTB"
VERSION = 1
MAX_FILES = 0xFFFF
MAX_NAME = 255
MAX_FILE_SIZE = 0xFFFFFFFF
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/")
APP_FILES = ("app.py", "app.mpy")
# Build artefacts that never belong in a bundle (CPython bytecode is useless on the device).
SKIP_DIRS = frozenset({"__pycache__"})


class BundleError(ValueError):
    """A bundle, or the files to bundle, violate the format."""


def check_name(name: str) -> bool:
    """True if name is a valid bundle file name (relative, '/'-separated, safe characters)."""
    if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_NAME or name.startswith("/"):
        return False
    if any(ch not in NAME_CHARS for ch in name):
        return False
    return all(seg not in ("", ".", "..") for seg in name.split("/"))


def pack_files(files: dict[str, bytes]) -> bytes:
    """Bundle name -> content, in sorted name order; requires app.py or app.mpy."""
    if len(files) > MAX_FILES:
        raise BundleError(f"too many files: {len(files)} > {MAX_FILES}")
    bad = sorted(name for name in files if not check_name(name))
    if bad:
        raise BundleError(f"invalid file name(s): {', '.join(map(repr, bad))} "
                          "(allowed: [A-Za-z0-9_.-/], relative, no empty/'.'/'..' segment, <= 255 bytes)")
    if not any(app in files for app in APP_FILES):
        raise BundleError("a bundle needs app.py or app.mpy")
    out = [MAGIC, struct.pack(">BH", VERSION, len(files))]
    for name in sorted(files):
        data = bytes(files[name])
        if len(data) > MAX_FILE_SIZE:
            raise BundleError(f"{name}: file too large")
        encoded = name.encode()
        out += [struct.pack(">H", len(encoded)), encoded, struct.pack(">I", len(data)), data]
    return b"".join(out)


def pack_dir(path: str | os.PathLike) -> bytes:
    """Bundle every regular file below path (names relative to it, '/'-separated)."""
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"not a directory: {root}")
    files: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for filename in filenames:
            full = Path(dirpath) / filename
            if not full.is_file():
                continue  # sockets, fifos, dangling links
            files[full.relative_to(root).as_posix()] = full.read_bytes()
    if not files:
        raise BundleError(f"no files in {root}")
    return pack_files(files)


def unpack(data: bytes) -> dict[str, bytes]:
    """Parse a bundle; BundleError on any deviation (including trailing bytes)."""
    view = memoryview(bytes(data))
    pos = 0

    def take(n: int, what: str) -> memoryview:
        nonlocal pos
        if pos + n > len(view):
            raise BundleError(f"bundle truncated in {what}")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    if bytes(take(4, "magic")) != MAGIC:
        raise BundleError("not a bundle (bad magic)")
    version, count = struct.unpack(">BH", take(3, "header"))
    if version != VERSION:
        raise BundleError(f"bundle version {version} not supported")
    files: dict[str, bytes] = {}
    for _ in range(count):
        (name_len,) = struct.unpack(">H", take(2, "name length"))
        try:
            name = bytes(take(name_len, "name")).decode()
        except UnicodeDecodeError:
            raise BundleError("file name is not UTF-8") from None
        if not check_name(name):
            raise BundleError(f"invalid file name {name!r}")
        if name in files:
            raise BundleError(f"duplicate file name {name!r}")
        (size,) = struct.unpack(">I", take(4, "file size"))
        files[name] = bytes(take(size, f"data of {name}"))
    if pos != len(view):
        raise BundleError(f"{len(view) - pos} bytes after the last file")
    if not any(app in files for app in APP_FILES):
        raise BundleError("bundle has no app.py or app.mpy")
    return files

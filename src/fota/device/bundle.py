# Streaming reader of app bundles (docs/protocol.md section 7), with a small fixed buffer.
import struct
import hashlib
from binascii import hexlify

from fota.device import fsutil

MAGIC = b"FOTB"
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-/"


class BundleError(Exception):
    pass


def check_name(name):
    if not 0 < len(name) <= 255 or name.startswith("/"):
        return False
    for ch in name:
        if ch not in NAME_CHARS:
            return False
    for seg in name.split("/"):
        if seg in ("", ".", ".."):
            return False
    return True


def _read_exact(f, n, remaining):
    if n > remaining[0]:
        raise BundleError("bundle truncated")
    data = f.read(n)
    if len(data) != n:
        raise BundleError("bundle truncated")
    remaining[0] -= n
    return data


STEP_BYTES = 16384  # bytes unpacked between two yields of extract_steps


def extract(f, size, dest, files=None, buf_size=512):
    """Unpack `size` bytes of bundle from file object f into directory dest. Returns names.

    files: the signed manifest's [name, size, sha256] list; when given, the bundle must hold
    exactly those files with those sizes and hashes.
    """
    names = []
    for _ in extract_steps(f, size, dest, files, buf_size, names):
        pass
    return names


def extract_steps(f, size, dest, files=None, buf_size=512, names=None, step=STEP_BYTES):
    """extract() as a generator that yields after every `step` bytes unpacked, so that a
    runner can unpack a large bundle in bounded steps between its other work. `names` (a list)
    receives the names unpacked."""
    expected = None
    if files is not None:
        expected = {}
        for name, fsize, digest in files:
            expected[name] = (fsize, digest.lower())
    remaining = [size]
    if _read_exact(f, 4, remaining) != MAGIC:
        raise BundleError("not a bundle (bad magic)")
    version, count = struct.unpack(">BH", _read_exact(f, 3, remaining))
    if version != 1:
        raise BundleError("bundle version %d not supported" % version)
    if names is None:
        names = []
    buf = bytearray(buf_size)
    since = 0  # bytes unpacked since the last yield
    for _ in range(count):
        (nlen,) = struct.unpack(">H", _read_exact(f, 2, remaining))
        try:
            name = _read_exact(f, nlen, remaining).decode()
        except UnicodeError:
            raise BundleError("file name is not UTF-8")
        if not check_name(name):
            raise BundleError("bad file name %r" % name)
        for prev in names:  # one name as both a file and a directory cannot be unpacked
            if prev.startswith(name + "/") or name.startswith(prev + "/"):
                raise BundleError("file %s conflicts with %s" % (name, prev))
        if name in names:
            raise BundleError("file %s appears twice" % name)
        (fsize,) = struct.unpack(">I", _read_exact(f, 4, remaining))
        if fsize > remaining[0]:
            raise BundleError("file %s truncated" % name)
        if expected is not None:
            if name not in expected or expected[name][0] != fsize:
                raise BundleError("file %s (%d bytes) is not in the signed manifest" % (name, fsize))
        h = hashlib.sha256()
        if "/" in name:
            fsutil.makedirs(dest + "/" + name.rsplit("/", 1)[0])
        with fsutil.open_file(dest + "/" + name, "wb") as out:
            left = fsize
            mv = memoryview(buf)
            while left:
                n = f.readinto(mv[:min(left, buf_size)])
                if not n:
                    raise BundleError("file %s truncated" % name)
                out.write(mv[:n])
                h.update(mv[:n])
                left -= n
                since += n
                if since >= step:
                    since = 0
                    yield
        remaining[0] -= fsize
        if expected is not None and hexlify(h.digest()).decode() != expected[name][1]:
            raise BundleError("file %s does not match its signed sha256" % name)
        names.append(name)
    if remaining[0]:
        raise BundleError("%d bytes after the last file" % remaining[0])
    if expected is not None and len(names) != len(expected):
        raise BundleError("bundle lacks files the signed manifest lists")
    if "app.py" not in names and "app.mpy" not in names:
        raise BundleError("bundle has no app.py or app.mpy")

# Streaming reader of app bundles (docs/protocol.md section 7), with a small fixed buffer.
import struct

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


def extract(f, size, dest, buf_size=512):
    """Unpack `size` bytes of bundle from file object f into directory dest. Returns names."""
    remaining = [size]
    if _read_exact(f, 4, remaining) != MAGIC:
        raise BundleError("not a bundle (bad magic)")
    version, count = struct.unpack(">BH", _read_exact(f, 3, remaining))
    if version != 1:
        raise BundleError("bundle version %d not supported" % version)
    names = []
    buf = bytearray(buf_size)
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
        (fsize,) = struct.unpack(">I", _read_exact(f, 4, remaining))
        if fsize > remaining[0]:
            raise BundleError("file %s truncated" % name)
        if "/" in name:
            fsutil.makedirs(dest + "/" + name.rsplit("/", 1)[0])
        with open(dest + "/" + name, "wb") as out:
            left = fsize
            mv = memoryview(buf)
            while left:
                n = f.readinto(mv[:min(left, buf_size)])
                if not n:
                    raise BundleError("file %s truncated" % name)
                out.write(mv[:n])
                left -= n
        remaining[0] -= fsize
        names.append(name)
    if remaining[0]:
        raise BundleError("%d bytes after the last file" % remaining[0])
    if "app.py" not in names and "app.mpy" not in names:
        raise BundleError("bundle has no app.py or app.mpy")
    return names

# Small file helpers that MicroPython's os module lacks (no os.path, no makedirs, no rmtree),
# written for the filesystems boards have as well as the unix port's:
#
#   LittleFS (ESP32, RP2040, ESP8266 builds since 1.12 by choice): a rename over an existing file
#     is atomic; what was written to a file since its last flush/close may be lost at a power cut.
#   FAT (ESP8266's stock filesystem on older builds, SD cards): FatFs cannot rename onto an
#     existing file. MicroPython's VfsFat does it anyway by removing the target first (measured:
#     the unix port 1.29 renames over an existing file on a mounted VfsFat); another FAT driver
#     refuses (EEXIST), and replace() then removes it itself. Either way the replacement is
#     remove-then-rename, not atomic: read_json recovers the complete temporary file (it was
#     closed before the remove) when a cut fell between the two.
#
# Paths: the agent works with absolute paths under its device directory (abspath at start), so an
# app that changes the working directory (os.chdir) does not move the agent's files.
import os
import json

# Power-cut simulation only (fota.device.slots.sim.Power): counts every file replacement and
# removal as a persistent operation and may cut power there. None on a real device.
power = None
# Power-cut simulation only: a filesystem model (fota.powercut.littlefs) that every file the agent
# writes, and every rename, remove and mkdir, goes through (open_file, rename, remove, mkdir,
# rmdir below). None on a real device: the calls go straight to the builtins.
fs = None


def open_file(path, mode="rb"):
    """open() for every file the agent writes (and the slot files it reads)."""
    if fs is not None:
        return fs.open(path, mode)
    return open(path, mode)


def rename(src, dst):
    if fs is not None:
        return fs.rename(src, dst)
    os.rename(src, dst)


def mkdir(path):
    if fs is not None:
        return fs.mkdir(path)
    os.mkdir(path)


def rmdir(path):
    if fs is not None:
        return fs.rmdir(path)
    os.rmdir(path)


def _remove(path):
    if fs is not None:
        return fs.remove(path)
    os.remove(path)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def is_dir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def makedirs(path):
    parts = path.split("/")
    cur = "/" if path.startswith("/") else ""
    for part in parts:
        if not part:
            continue
        cur = cur + part if cur.endswith("/") or not cur else cur + "/" + part
        if not exists(cur):
            mkdir(cur)


def rmtree(path):
    if not exists(path):
        return
    if not is_dir(path):
        _remove(path)
        return
    for name in os.listdir(path):
        rmtree(path + "/" + name)
    rmdir(path)


def abspath(path):
    """`path` made absolute against the working directory now ("." and "./x" included)."""
    if path.startswith("/"):
        return path.rstrip("/") or "/"
    cwd = os.getcwd().rstrip("/")
    while path.startswith("./"):
        path = path[2:]
    if path in ("", "."):
        return cwd or "/"
    return cwd + "/" + path.rstrip("/")


def free_bytes(path):
    """Bytes free for writing on the filesystem holding `path` (os.statvfs: f_bavail blocks of
    f_frsize bytes), or None where the port has no statvfs."""
    try:
        st = os.statvfs(path)
    except (AttributeError, OSError):
        return None
    return st[4] * (st[1] or st[0])


def tree_bytes(path):
    """Bytes held by the files under `path` (0 if it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return 0
    if not st[0] & 0x4000:
        return st[6]
    total = 0
    for name in os.listdir(path):
        total += tree_bytes(path + "/" + name)
    return total


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        pass
    except ValueError:
        return default
    # Missing: a FAT replacement cut between its remove and its rename leaves the new file,
    # complete (it was closed before the remove), under the temporary name. Take it.
    tmp = path + ".tmp"
    try:
        with open(tmp) as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return default
    try:
        rename(tmp, path)
    except OSError:
        pass
    return obj


def write_json(path, obj):
    # Write-then-rename: a power cut leaves either the old or the new file, never half of one.
    tmp = path + ".tmp"
    if power is not None and power.step("replace " + path.rsplit("/", 1)[-1]):
        # Torn: half of the temporary file is written; the rename (atomic) never happens.
        text = json.dumps(obj)
        with open(tmp, "w") as f:
            f.write(text[:len(text) // 2])
        from fota.device.slots.sim import PowerCut
        raise PowerCut("in the middle of writing " + tmp)
    with open_file(tmp, "w") as f:
        if fs is None:
            json.dump(obj, f)  # streamed to the file: the text is never whole in the heap
        else:
            f.write(json.dumps(obj))  # one write: one operation for the filesystem model
    replace(tmp, path)


def replace(src, dst):
    """Rename src over dst: atomic on LittleFS and POSIX. FAT refuses to rename onto an existing
    file: there dst is removed first (read_json recovers a cut in between)."""
    try:
        rename(src, dst)
    except OSError:
        if not exists(dst) or not exists(src):
            raise
        _remove(dst)
        rename(src, dst)


def remove(path):
    # Removing an existing file counts as a persistent operation (atomic: torn = not done).
    if power is not None and exists(path) and power.step("remove " + path.rsplit("/", 1)[-1]):
        from fota.device.slots.sim import PowerCut
        raise PowerCut("in the middle of removing " + path)
    try:
        _remove(path)
    except OSError:
        pass

# Small file helpers that MicroPython's os module lacks (no os.path, no makedirs, no rmtree).
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


def read_json(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


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
    text = json.dumps(obj)  # one write: small files, and one operation for a filesystem model
    with open_file(tmp, "w") as f:
        f.write(text)
    rename(tmp, path)


def remove(path):
    # Removing an existing file counts as a persistent operation (atomic: torn = not done).
    if power is not None and exists(path) and power.step("remove " + path.rsplit("/", 1)[-1]):
        from fota.device.slots.sim import PowerCut
        raise PowerCut("in the middle of removing " + path)
    try:
        _remove(path)
    except OSError:
        pass

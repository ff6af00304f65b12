# A model of what LittleFS keeps across a power cut, for the power-cut harness (MicroPython and
# CPython). Installed as fota.device.fsutil.fs, it sees every file the agent writes (and every
# rename, remove, mkdir and rmdir it makes) while the files themselves stay ordinary files of the
# host: after each operation they hold what the running agent sees; at a power cut the model
# puts back what LittleFS would find at the next mount.
#
# The guarantees modelled, from the littlefs project (littlefs-project/littlefs):
# - README.md: "When updating a file, the original file will remain unmodified until the file
#   is closed, or sync is called" (the copy-on-write guarantee; today's README: "if power is
#   lost the filesystem will fall back to the last known good state"). So at a cut, a file open
#   for writing reverts to its contents at its last sync or close: everything written since is
#   lost, whether or not its blocks reached the flash. A file created by open() exists (the
#   creation is a metadata commit at open, lfs_file_opencfg), empty until its first sync.
# - DESIGN.md ("metadata pairs", "the move problem"): every metadata change is one atomic
#   commit, so rename (over an existing file too), remove, mkdir and rmdir happen entirely or not
#   at all.
# - MicroPython's LittleFS files (extmod/vfs_lfsx_file.c): flush() is lfs_file_sync, close() is
#   lfs_file_close (a sync).
#
# Operations counted (each one a point a cut can fall before, or in the middle of): open for
# writing, write, flush (sync), close of a file opened for writing, rename, remove, mkdir,
# rmdir. Reads are not persistent operations and are not counted. A cut in the middle of a
# write leaves half of it written, then the cut loses it with the rest of the unsynced tail;
# a cut in the middle of an atomic operation (sync, close, rename, remove, mkdir, rmdir, the
# creation at open) lets it complete, and power fails right after.
#
# Not modelled: two handles on one file seeing different versions (LittleFS shows the
# committed one to the second handle; the agent never opens a file twice), running out of space.
import os

from fota.device.slots.sim import PowerCut


def _name(path):
    return path.rsplit("/", 1)[-1]


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return None


class _File:
    """A file handle through the model. Written bytes go to the host file at once (so the
    agent reads them back); an undo log keeps what the last sync left, for a cut."""

    def __init__(self, fs, path, mode):
        self.fs = fs
        self.path = path
        self.writing = "w" in mode or "a" in mode or "+" in mode
        self.dead = False
        self.undo = []          # (offset, old bytes) of the synced contents written over
        self.whole = False      # undo holds the whole synced file (opened with "w")
        raw = mode.replace("t", "")
        if "b" not in raw:
            raw += "b"          # bytes underneath; text is encoded on write
        if self.writing:
            old = _size(path)
            self.synced_size = old if old is not None else 0  # created: empty once committed
            if old and "w" in mode:  # truncation is committed only at the next sync
                with open(path, "rb") as f:
                    self.undo.append((0, f.read()))
                self.whole = True
        self.f = open(path, raw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _live(self, kind):
        if self.dead and not self.fs.power.down:
            raise OSError(9, "file closed by a power cut")
        return self.fs.step(kind, self.path)  # PowerCut while the power is off

    # ---- reads ---------------------------------------------------------------------------------
    def read(self, n=-1):
        if self.dead:
            raise OSError(9, "file closed by a power cut")
        return self.f.read(n) if n >= 0 else self.f.read()

    def readinto(self, buf):
        if self.dead:
            raise OSError(9, "file closed by a power cut")
        return self.f.readinto(buf)

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    # ---- writes --------------------------------------------------------------------------------
    def write(self, data):
        if isinstance(data, str):
            data = data.encode()
        torn = self._live("write")
        at = self.f.tell()
        if at < self.synced_size and not self.whole:  # keep the synced bytes this write covers
            self.f.seek(at)
            old = self.f.read(min(len(data), self.synced_size - at))
            self.undo.append((at, old))
            self.f.seek(at)
        if torn:
            self.f.write(data[:len(data) // 2])
            self.f.flush()
            self.fs.cut("write " + _name(self.path))
        n = self.f.write(data)
        self.f.flush()  # the host file shows it at once; durability is the model's business
        return n

    def _sync(self):
        self.synced_size = _size(self.path) or 0
        self.undo = []
        self.whole = False

    def flush(self):
        if not self.writing:
            return
        torn = self._live("sync")
        self._sync()  # atomic: a torn sync completed
        if torn:
            self.fs.cut("sync " + _name(self.path))

    def close(self):
        if self.dead:
            return
        self.f.close()
        self.dead = True
        if self.fs.power.down:
            # A cut unwinding through a `with` block: nothing is synced, and the handle stays
            # listed for the cut's rollback (LittleFS.crash).
            return
        if self.writing:
            torn = self.fs.step("close", self.path)  # a cut before: crash() rolls this handle back
            self._sync()
            self.fs.forget(self)
            if torn:  # the close (a sync) completed: power fails right after
                self.fs.cut("close " + _name(self.path))
            return
        self.fs.forget(self)

    def rollback(self):
        """What LittleFS finds at the next mount: the contents of the last sync."""
        if not self.dead:
            self.f.close()
            self.dead = True
        if not self.writing or _size(self.path) is None:
            return  # read only, or removed since (a remove is atomic: it stays removed)
        with open(self.path, "r+b") as f:
            for at, old in reversed(self.undo):
                f.seek(at)
                f.write(old)
        if (_size(self.path) or 0) > self.synced_size:  # MicroPython files have no truncate()
            tmp = self.path + ".lfs-rollback"
            with open(self.path, "rb") as f, open(tmp, "wb") as g:
                left = self.synced_size
                while left:
                    piece = f.read(min(1024, left))
                    g.write(piece)
                    left -= len(piece)
            os.rename(tmp, self.path)
        self.undo = []


class LittleFS:
    """The model: fota.device.fsutil.fs during a power-cut run. `power` is the run's
    fota.device.slots.sim.Power (it counts and cuts every persistent operation of the device)."""

    def __init__(self, power):
        self.power = power
        self.files = []  # handles open on the model

    def step(self, kind, path):
        try:
            return self.power.step(kind + " " + _name(path))
        except PowerCut:
            self.crash()
            raise

    def cut(self, what):
        """Power fails during a torn operation (after its partial effect)."""
        self.crash()
        self.power.fail(what)

    def forget(self, handle):
        if handle in self.files:
            self.files.remove(handle)

    def crash(self):
        """Power is gone: every open file reverts to its last sync (idempotent)."""
        for handle in self.files:
            handle.rollback()
        self.files = []

    def open(self, path, mode="rb"):
        writing = "w" in mode or "a" in mode or "+" in mode
        torn = self.step("open", path) if writing else False
        handle = _File(self, path, mode)
        self.files.append(handle)
        if torn:  # the open (the creation's commit) happened: power fails right after
            self.cut("open " + _name(path))
        return handle

    def _atomic(self, kind, path, fn, *args):
        torn = self.step(kind, path)
        fn(*args)
        if torn:
            self.cut(kind + " " + _name(path))

    def rename(self, src, dst):
        self._atomic("rename", src, os.rename, src, dst)

    def remove(self, path):
        self._atomic("remove", path, os.remove, path)

    def mkdir(self, path):
        self._atomic("mkdir", path, os.mkdir, path)

    def rmdir(self, path):
        self._atomic("rmdir", path, os.rmdir, path)

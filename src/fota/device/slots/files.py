# The `files` backend: an app bundle per slot directory (slots/a, slots/b).
#
# The download streams into slots/<x>/image.bin; after the hash verified, finalize() unpacks it
# into slots/<x>/app/, which the boot selector puts on sys.path. image.bin stays: it is the base
# the next delta update is applied to (an unchanged file then costs the patch a few bytes). Works on every port with a
# filesystem (unix, RP2040, ESP8266, ESP32).
from fota.device import fsutil
from fota.device.bundle import extract_steps


class FilesBackend:
    KINDS = ("bundle",)
    DECRYPTS = True  # encrypted releases are decrypted while unpacking

    def __init__(self, root, capacity):
        self.root = root
        self.capacity = capacity
        self._f = None
        self._slot = None
        self._r = None      # a read handle on another slot's image (the base of a delta)
        self._r_slot = None

    def _dir(self, slot):
        return self.root + "/" + slot

    def _image(self, slot):
        return self._dir(slot) + "/image.bin"

    def app_dir(self, slot):
        return self._dir(slot) + "/app"

    def _open(self, slot):
        if self._slot != slot or self._f is None:
            self.close()
            self._f = fsutil.open_file(self._image(slot), "r+b")
            self._slot = slot
        return self._f

    def close(self):
        if self._f is not None:
            self._f.close()
        if self._r is not None:
            self._r.close()
        self._f = self._r = None
        self._slot = self._r_slot = None

    def free_space(self, slot):
        """Bytes a new image for `slot` may use: the filesystem's free space plus what the slot
        holds now (begin() removes it); None if the port cannot tell."""
        free = fsutil.free_bytes(self.root)
        if free is None:
            return None
        return free + fsutil.tree_bytes(self._dir(slot))

    def has_image(self, slot):
        return fsutil.exists(self._image(slot))

    def begin(self, slot, size):
        self.close()
        fsutil.rmtree(self._dir(slot))
        fsutil.makedirs(self._dir(slot))
        with fsutil.open_file(self._image(slot), "wb"):
            pass

    def resume(self, slot, offset):
        if not fsutil.exists(self._image(slot)):
            raise OSError(2, "no partial image to resume")

    def write(self, slot, offset, data):
        f = self._open(slot)
        f.seek(offset)
        f.write(data)

    def flush(self, slot):
        if self._f is not None:
            self._f.flush()

    def read(self, slot, offset, n):
        if self._f is not None and self._slot != slot:
            # Writing one slot while reading the other (a delta): keep both open.
            if self._r_slot != slot:
                if self._r is not None:
                    self._r.close()
                self._r = fsutil.open_file(self._image(slot), "rb")
                self._r_slot = slot
            f = self._r
        else:
            f = self._open(slot)
        f.seek(offset)
        return f.read(n)

    def finalize(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        for _ in self.finalize_steps(slot, size, files, key, plain_size, sha256):
            pass

    def finalize_steps(self, slot, size, files=None, key=None, plain_size=None, sha256=None):
        """finalize() in bounded steps (a generator): the bundle is unpacked a few KiB at a time."""
        self.close()
        app = self.app_dir(slot)
        fsutil.rmtree(app)
        fsutil.makedirs(app)
        yield
        with fsutil.open_file(self._image(slot), "rb") as f:
            if key is None:
                yield from extract_steps(f, size, app, files)
            else:
                # The slot keeps the ciphertext that was hashed; plaintext exists only unpacked.
                from fota.device.aes import DecryptingReader
                yield from extract_steps(DecryptingReader(f, size, key), plain_size, app, files)

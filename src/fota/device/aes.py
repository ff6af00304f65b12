# AES for optional payload encryption: AES-256-CBC to decrypt a release, RFC 3394 key unwrap
# for the per-release key. MicroPython's cryptolib on the device; `cryptography` on CPython
# (the fleet simulator and tests).
import struct

try:
    import cryptolib

    def _ecb_decrypt(key, block):
        return cryptolib.aes(key, 1).decrypt(block)

    def cbc_decryptor(key, iv):
        return cryptolib.aes(key, 2, iv).decrypt
except ImportError:  # CPython
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    def _ecb_decrypt(key, block):
        return Cipher(algorithms.AES(key), modes.ECB()).decryptor().update(block)

    def cbc_decryptor(key, iv):
        return Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor().update

IV = b"\xa6" * 8  # RFC 3394 default initial value


class DecryptError(Exception):
    pass


def unwrap(kek, wrapped):
    """RFC 3394 AES key unwrap; raises DecryptError if the integrity check fails."""
    if len(wrapped) % 8 or len(wrapped) < 24:
        raise DecryptError("wrapped key has a bad length")
    n = len(wrapped) // 8 - 1
    a = wrapped[:8]
    r = [wrapped[8 * (i + 1):8 * (i + 2)] for i in range(n)]
    for j in range(5, -1, -1):
        for i in range(n, 0, -1):
            t = n * j + i
            a_int = struct.unpack(">Q", a)[0] ^ t
            b = _ecb_decrypt(kek, struct.pack(">Q", a_int) + r[i - 1])
            a = b[:8]
            r[i - 1] = b[8:]
    if a != IV:
        raise DecryptError("key unwrap integrity check failed (wrong device key?)")
    return b"".join(r)


class DecryptingReader:
    """Reads the plaintext of IV || AES-256-CBC(PKCS#7(plaintext)) from a file object.

    Memory stays at one small buffer: blocks are decrypted as they are read, and the last
    block is held back until the end to strip its padding.
    """

    def __init__(self, f, size, key):
        if size < 32 or size % 16:
            raise DecryptError("ciphertext size %d is not a multiple of 16 (>= 32)" % size)
        iv = f.read(16)
        if len(iv) != 16:
            raise DecryptError("ciphertext truncated")
        self.f = f
        self.left = size - 16          # ciphertext bytes not read yet
        self.dec = cbc_decryptor(key, iv)
        self.out = b""                 # decrypted bytes not handed out yet (padding included)

    def _fill(self, n):
        while len(self.out) < n + 16 and self.left:
            want = min(self.left, max(512, (n + 15) // 16 * 16))
            data = self.f.read(want)
            if len(data) != want:
                raise DecryptError("ciphertext truncated")
            self.left -= want
            self.out += self.dec(data)
        if not self.left and self.out is not None and not getattr(self, "_stripped", False):
            pad = self.out[-1] if self.out else 0
            if not 1 <= pad <= 16 or self.out[-pad:] != bytes([pad]) * pad:
                raise DecryptError("bad padding (wrong key or corrupt payload)")
            self.out = self.out[:-pad]
            self._stripped = True

    def read(self, n):
        self._fill(n)
        data, self.out = self.out[:n], self.out[n:]
        return data

    def readinto(self, mv):
        data = self.read(len(mv))
        mv[:len(data)] = data
        return len(data)

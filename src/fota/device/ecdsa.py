# ECDSA P-256 (secp256r1) / SHA-256 signature verification in pure Python.
# Runs on MicroPython (any port with arbitrary-precision ints) and on CPython.
#
# Math choices:
# - Curve y^2 = x^3 - 3x + b over GF(p). Points are kept in Jacobian
#   coordinates (X, Y, Z) <-> affine (X/Z^2, Y/Z^3), so the main loop never
#   divides; Z == 0 is the point at infinity.
# - Doubling uses the a = -3 shortcut (3*(X-Z^2)*(X+Z^2)); additions are
#   "mixed" (the added point is affine, Z2 = 1), which saves multiplications.
# - u1*G + u2*Q is computed in ONE double-and-add pass (Shamir's trick): for
#   each of the 256 bit positions, double once, then add G, Q or G+Q from a
#   3-entry table. G+Q is made affine with a single inversion.
# - Inversions use Fermat: x^-1 = pow(x, m-2, m) (m prime); only two are
#   needed (s^-1 mod n, and G+Q). The final check avoids a third one by
#   comparing r*Z^2 == X (mod p) instead of converting R to affine; since
#   n < p < 2n, x(R) mod n == r means x(R) is r or r+n.
# - Memory: only a handful of 256/512-bit ints are live at a time; scalar bits
#   are read from bytes, so no big-int shifting in the loop. A verify needs a
#   few KB of heap; compiling this file from source needs ~19 KB at peak (use
#   mpy-cross on small boards). Comments, not docstrings, to keep that low.
# - The key is checked to be on the curve: the formulas never use b, so an
#   off-curve key would let a forger work on a weaker curve (invalid-curve attack).
# Verification uses only public data, so no constant-time care is taken.
import hashlib
import binascii

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5


def _dbl(X, Y, Z):
    # dbl-2001-b (a = -3)
    if not Z:
        return X, Y, 0
    d = Z * Z % P
    g = Y * Y % P
    be = X * g % P
    al = 3 * (X - d) * (X + d) % P
    X3 = (al * al - 8 * be) % P
    Z3 = ((Y + Z) * (Y + Z) - g - d) % P
    Y3 = (al * (4 * be - X3) - 8 * g * g) % P
    return X3, Y3, Z3


def _add(X, Y, Z, x2, y2):
    # Jacobian (X, Y, Z) + affine (x2, y2)
    if not Z:
        return x2, y2, 1
    zz = Z * Z % P
    h = (x2 * zz - X) % P
    r = (y2 * zz * Z - Y) % P
    if not h:
        if r:
            return 1, 1, 0  # P + (-P)
        return _dbl(X, Y, Z)
    hh = h * h % P
    hhh = h * hh % P
    v = X * hh % P
    X3 = (r * r - hhh - 2 * v) % P
    Y3 = (r * (v - X3) - Y * hhh) % P
    return X3, Y3, Z * h % P


def _on_curve(x, y):
    return x < P and y < P and (y * y - x * x * x + 3 * x - B) % P == 0


def _shamir(u1, u2, qx, qy):
    X, Y, Z = _add(GX, GY, 1, qx, qy)
    if Z:
        zi = pow(Z, P - 2, P)
        z2 = zi * zi % P
        gq = (X * z2 % P, Y * z2 * zi % P)
    else:
        gq = None  # Q == -G
    table = (None, (GX, GY), (qx, qy), gq)
    a = u1.to_bytes(32, "big")
    b = u2.to_bytes(32, "big")
    X, Y, Z = 1, 1, 0
    for i in range(32):
        ai = a[i]
        bi = b[i]
        m = 128
        while m:
            X, Y, Z = _dbl(X, Y, Z)
            t = table[(1 if ai & m else 0) | (2 if bi & m else 0)]
            if t:
                X, Y, Z = _add(X, Y, Z, t[0], t[1])
            m >>= 1
    return X, Y, Z


def verify_digest(pubkey, digest, signature):
    # True iff signature (64-byte r||s) is valid for the 32-byte digest under
    # pubkey (65-byte 0x04||X||Y). Bad input of any kind gives False.
    try:
        if len(pubkey) != 65 or pubkey[0] != 4 or len(digest) != 32 or len(signature) != 64:
            return False
        qx = int.from_bytes(pubkey[1:33], "big")
        qy = int.from_bytes(pubkey[33:], "big")
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        e = int.from_bytes(digest, "big")
    except (TypeError, ValueError, IndexError):
        return False
    if not (0 < r < N and 0 < s < N) or not _on_curve(qx, qy):
        return False
    w = pow(s, N - 2, N)
    X, Y, Z = _shamir(e * w % N, r * w % N, qx, qy)
    if not Z:
        return False
    z2 = Z * Z % P
    # x(R) = X/Z^2; x(R) mod n == r  <=>  x(R) in {r, r+n} (as r+n may be < p)
    return (r * z2 - X) % P == 0 or (r + N < P and ((r + N) * z2 - X) % P == 0)


def verify(pubkey, message, signature):
    # True iff signature is a valid ECDSA P-256 signature of sha256(message).
    try:
        d = hashlib.sha256(message).digest()
    except (TypeError, ValueError):
        return False
    return verify_digest(pubkey, d, signature)


def key_id(pubkey):
    # Lowercase hex of the first 8 bytes of sha256(pubkey): 16 chars.
    return binascii.hexlify(hashlib.sha256(pubkey).digest()[:8]).decode()

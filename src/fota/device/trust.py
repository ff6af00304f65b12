# The device's trust store: a pinned root key certifies the keys that sign releases and commands.
#
# A certificate is {"body": "<JSON text>", "sig": "<hex r||s by the root key>"} with body
#   {"kid": "<16 hex>", "pub": "<130 hex>", "usage": ["release", "command"],
#    "not_before": <unix s>, "not_after": <unix s>}
# The trust document is {"version": N, "certs": [cert...], "revoked": [kid...]}; it is replaced
# only by a root-signed "keys" command with a higher version, so an old one cannot be replayed.
# Time comes from signed commands (the device may have no clock): `now` is the latest time seen
# in a verified command, so a cert that expired before that moment is refused.
import json
from binascii import unhexlify

from fota.device import ecdsa
from fota.device import protocol as P


class TrustError(Exception):
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _cert_body(cert, root, verify):
    if not isinstance(cert, dict) or not isinstance(cert.get("body"), str) or not isinstance(cert.get("sig"), str):
        raise TrustError(P.E_BAD_KEYS, "certificate malformed")
    try:
        sig = unhexlify(cert["sig"])
    except ValueError:
        raise TrustError(P.E_BAD_KEYS, "certificate signature not hex")
    try:
        text = cert["body"].encode()
    except UnicodeError:  # CPython: a lone surrogate has no UTF-8 form
        raise TrustError(P.E_BAD_KEYS, "certificate body is not UTF-8")
    if not verify(root, text, sig):
        raise TrustError(P.E_BAD_KEYS, "certificate not signed by the root key")
    try:
        body = json.loads(cert["body"])
        pub = unhexlify(body["pub"])
        if ecdsa.key_id(pub) != body["kid"] or not isinstance(body["usage"], list):
            raise ValueError("kid does not match key")
        for k in ("not_before", "not_after"):
            # compared with integer times by key_for: "5", 1e999 or NaN must not get that far
            if not isinstance(body[k], int) or isinstance(body[k], bool):
                raise ValueError("%s is not an integer" % k)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:  # RuntimeError: nested too deep
        raise TrustError(P.E_BAD_KEYS, "certificate body invalid: %s" % e)
    body["pub"] = pub
    return body


def _is_kid(text):
    # A key id as ecdsa.key_id writes it (16 lowercase hex): how the device compares them.
    if not isinstance(text, str) or len(text) != 16:
        return False
    for ch in text:
        if ch not in "0123456789abcdef":
            return False
    return True


class TrustStore:
    # verify(pub, message, sig) -> bool: ecdsa.verify unless a host offers a faster one with the
    # same result (the fleet simulator on CPython).
    def __init__(self, root, doc, verify=None):
        self.verify = verify or ecdsa.verify
        self.root = root
        self.root_kid = ecdsa.key_id(root)
        self.version = doc.get("version", 0)
        self.revoked = list(doc.get("revoked", []))
        self.doc = doc
        self.keys = {}
        for cert in doc.get("certs", []):
            body = _cert_body(cert, root, self.verify)
            self.keys[body["kid"]] = body

    def key_for(self, kid, usage, now):
        """The public key `kid` may use for `usage` at time `now`; raises TrustError."""
        if kid in self.revoked:
            raise TrustError(P.E_KEY_REVOKED, "key %s is revoked" % kid)
        body = self.keys.get(kid)
        if body is None:
            raise TrustError(P.E_UNKNOWN_KEY, "key %s is not certified by the root key" % kid)
        if usage not in body["usage"]:
            raise TrustError(P.E_UNKNOWN_KEY, "key %s is not certified for %s" % (kid, usage))
        if not body["not_before"] <= now <= body["not_after"]:
            raise TrustError(P.E_KEY_EXPIRED, "key %s is valid %d..%d, now is %d" % (
                kid, body["not_before"], body["not_after"], now))
        return body["pub"]

    def updated(self, body):
        """A new TrustStore from the body of a root-signed keys command; raises TrustError."""
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise TrustError(P.E_BAD_KEYS, "keys version missing")
        if version <= self.version:
            raise TrustError(P.E_STALE_KEYS, "keys version %d is not newer than %d" % (version, self.version))
        certs = body.get("certs")
        revoked = body.get("revoked", [])
        if not isinstance(certs, list) or not isinstance(revoked, list):
            raise TrustError(P.E_BAD_KEYS, "certs and revoked must be lists")
        for kid in revoked:
            # "ABC..." would never equal the lower-case id it means: that revocation would fail open
            if not _is_kid(kid):
                raise TrustError(P.E_BAD_KEYS, "revoked key id %r is not 16 lowercase hex chars" % (kid,))
        return TrustStore(self.root, {"version": version, "certs": certs, "revoked": revoked}, self.verify)

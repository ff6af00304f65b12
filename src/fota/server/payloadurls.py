"""Signed payload URLs of transport `http` (docs/http-transport.md): made by the command sender,
checked by the blob route (fota.server.blobhttp) or, for object storage, by the storage itself.

``HttpPayloads`` is a center's setting: where devices reach the blob server (``base_url``), the
URL key, and how long a URL stays valid (``url_ttl``, counted from the command's signing; it
covers resumes after a device slept, so it is longer than the command's own expiry by default).
"""
from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

__all__ = ["PATH", "URL_TTL", "HttpPayloads", "StaticPayloads", "sign_url", "check_url"]

PATH = "/v1/blobs/"
URL_TTL = 7 * 86400  # seconds


def _mac(key: bytes, device: str, job: int, sha256: str, exp: int) -> str:
    return hmac.new(key, f"{device}\n{job}\n{sha256}\n{exp}".encode(), hashlib.sha256).hexdigest()


def sign_url(base: str, key: bytes, device: str, job: int, sha256: str, exp: int) -> str:
    """The URL of blob ``sha256`` for ``job`` on ``device``, valid until ``exp`` (Unix seconds)."""
    return (f"{base.rstrip('/')}{PATH}{sha256}?d={device}&j={job}&e={exp}"
            f"&s={_mac(key, device, job, sha256, exp)}")


def check_url(key: bytes, device: str, job: int, sha256: str, exp: int, sig: str, now: float) -> str | None:
    """Why the URL is refused, or None when its signature holds and it has not expired."""
    if len(sig) != 64 or not sig.isascii() or not hmac.compare_digest(_mac(key, device, job, sha256, exp), sig):
        return "bad signature"
    if exp < now:
        return "expired"
    return None


@dataclass(frozen=True)
class HttpPayloads:
    """A center's transport `http` setting."""
    base_url: str              # e.g. https://fota.example.com:8443 (the blob route's server)
    key: bytes                 # the URL key (fota.server.kek.Kek.url_key)
    url_ttl: int = URL_TTL
    hosts: tuple[str, ...] = ()  # other hosts a redirect may lead to (signed into the command)

    def command_field(self, device: str, job: int, sha256: str, now: float | None = None) -> dict:
        """The update command's signed ``http`` object (docs/protocol.md §5.2)."""
        exp = int(time.time() if now is None else now) + self.url_ttl
        field = {"url": sign_url(self.base_url, self.key, device, job, sha256, exp), "exp": exp}
        if self.hosts:
            field["hosts"] = list(self.hosts)
        return field


@dataclass(frozen=True)
class StaticPayloads:
    """Transport http from any static web server or CDN in front of a copy of the blob directory:
    ``<base_url>/<sha256>``. Nothing in the URL is secret or bound to a device: the server decides
    who may read (the images are signed, not secret; encrypted releases stay encrypted there)."""
    base_url: str
    url_ttl: int = URL_TTL     # only the command's informational `exp`
    hosts: tuple[str, ...] = ()

    def command_field(self, device: str, job: int, sha256: str, now: float | None = None) -> dict:
        field = {"url": f"{self.base_url.rstrip('/')}/{sha256}",
                 "exp": int(time.time() if now is None else now) + self.url_ttl}
        if self.hosts:
            field["hosts"] = list(self.hosts)
        return field

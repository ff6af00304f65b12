"""Transport http from S3-compatible object storage (docs/http-transport.md, "Object storage").

``S3Payloads`` is a center's ``http`` setting like ``payloadurls.HttpPayloads``: instead of a URL
to the center's own blob route it signs, per job, a presigned GET URL of the blob's object
(``<prefix><sha256>`` in ``bucket``), valid for ``url_ttl`` seconds (at most 7 days: SigV4's
limit). It is also the home's blob store (Home.object_store; the bucket is then the blobs' source
of truth): ``put_blob`` writes a release's image when the release is created and a patch when it
is made (objects are immutable and content-addressed, never overwritten), and ``get_blob`` reads
one back for a process whose blobs directory lacks it (fota.server.releases.blob_file: the chunk
server, the sender, the blob route, another worker's patch). A blob made before the storage was
configured is uploaded the first time a job needs it. ``delete_blob`` removes one when its release is
deleted (fota.server.release_delete) or when nothing names it any more (fota.server.blob_gc, which
finds them with ``list_blobs``).

Credentials come from boto3's usual chain (environment, ``~/.aws``, an instance role); the
device gets only the presigned URL, which grants a GET of that one object until it expires.
Works with AWS S3, MinIO and Cloudflare R2 (``endpoint_url``); tested against moto's server.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

from fota.server.payloadurls import URL_TTL

__all__ = ["MAX_PRESIGN", "S3Payloads"]

log = logging.getLogger(__name__)

MAX_PRESIGN = 7 * 86400  # SigV4 presigned URLs live at most a week


def _missing(exc) -> bool:
    """Whether a botocore ClientError says the object is not there."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class S3Payloads:
    def __init__(self, bucket: str, *, blobs_dir: str | Path, endpoint_url: str | None = None,
                 region: str | None = None, prefix: str = "", url_ttl: int = URL_TTL, hosts: tuple[str, ...] = (),
                 client=None):
        if client is None:
            import boto3
            from botocore.config import Config
            # Path-style addressing: an endpoint given as an address (MinIO, a local server) has no
            # bucket subdomains; AWS and R2 answer it too.
            client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                                  config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.blobs_dir = Path(blobs_dir)
        self.url_ttl = min(int(url_ttl), MAX_PRESIGN)
        self.hosts = tuple(hosts)
        self._stored: set[str] = set()  # objects known to exist (immutable: never re-checked)

    def key(self, sha256: str) -> str:
        return self.prefix + sha256

    def put_blob(self, sha256: str, data: bytes | None = None, *, fresh: bool = False) -> None:
        """Store blob ``sha256`` (``data``, else the file ``<blobs_dir>/<sha256>``) unless it is
        there (asked once per process).

        fresh: the blob of a release or a patch being made, its row not committed yet: an object
        already there is copied onto itself, which makes it recent (asked every time). A garbage
        collection (fota.server.blob_gc) leaves objects younger than its grace period, so it
        keeps this one until the row names it."""
        from botocore.exceptions import ClientError
        if not fresh and sha256 in self._stored:
            return
        try:
            if fresh:
                self._refresh(sha256)
            else:
                self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
            self._stored.add(sha256)
            return
        except ClientError as exc:
            if not _missing(exc):
                raise
        if data is None:
            data = (self.blobs_dir / sha256).read_bytes()
        self.client.put_object(Bucket=self.bucket, Key=self.key(sha256), Body=data,
                               ContentType="application/octet-stream")
        log.info("blob %s stored in s3://%s/%s", sha256[:16], self.bucket, self.key(sha256))
        self._stored.add(sha256)

    def _refresh(self, sha256: str) -> None:
        """Copy the object onto itself (S3 allows that when the metadata is replaced): a new
        LastModified, the same bytes. ClientError NoSuchKey when it is not there."""
        key = self.key(sha256)
        self.client.copy_object(Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                                MetadataDirective="REPLACE", ContentType="application/octet-stream")

    def list_blobs(self) -> Iterator[tuple[str, int, float]]:
        """(sha256, size, last modified as a Unix time) of each blob's object under the prefix,
        one page of the listing (1,000 keys) at a time; other keys (another name, a deeper
        "folder") are not blobs and are left out."""
        from fota.server.releases import is_blob_name
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix)
        for page in pages:
            for item in page.get("Contents", ()):
                name = item["Key"][len(self.prefix):]
                if is_blob_name(name):
                    yield name, int(item["Size"]), item["LastModified"].timestamp()

    def delete_blob(self, sha256: str) -> None:
        """Remove blob ``sha256``'s object (a deleted release's image or patch); no error if it is
        not there (S3 answers a DELETE of a missing key with success)."""
        self._stored.discard(sha256)
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        log.info("blob %s deleted from s3://%s/%s", sha256[:16], self.bucket, self.key(sha256))

    def get_blob(self, sha256: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"].read()

    def command_field(self, device: str, job: int, sha256: str, now: float | None = None) -> dict:
        """The update command's signed ``http`` object: a presigned GET of the blob's object. (The
        storage checks the signature and the expiry; ``device`` and ``job`` are not part of an
        S3 URL: it grants that one immutable object, to whoever holds it, until it expires.)"""
        self.put_blob(sha256)
        url = self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": self.key(sha256)},
                                                 ExpiresIn=self.url_ttl)
        field = {"url": url, "exp": int(time.time() if now is None else now) + self.url_ttl}
        if self.hosts:
            field["hosts"] = list(self.hosts)
        return field

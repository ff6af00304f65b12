"""Garbage collection of blobs: remove the blobs nothing names any more, as git gc or a
registry's garbage collection does.

A blob (a release's image, a cached patch: content-addressed, named by its sha256) is named by
a live release (Release.live) or by a patch row (Delta). Deleting a release commits the
database first and removes its blobs after (fota.server.release_delete): a removal that fails
then (storage unreachable, no permission) leaves a blob nothing names, and so does another
host's ``blobs/`` directory, a cache of the bucket that the delete never sees. This sweep finds
them: the files of a blobs directory and, when given, the objects under the bucket's prefix
(S3Payloads.list_blobs), whose name is a sha256 (nothing else in the directory or the bucket is
touched) and that no row names.

The grace period: a release or a patch is written before its row commits (create_release,
delta.get_delta), so a blob nothing names may be one being made. Only a blob older than
``grace`` seconds goes; a writer that finds its blob already there makes it recent
(releases.write_blob, S3Payloads.put_blob with fresh). The names are read from the database
before the listing, and a file's age is read again just before it is removed: a writer's row
committed after that read has a blob younger than the grace period, unless the writer touched it
in the instant between that check and the removal.
"""
from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from sqlalchemy import select

from fota.server import audit
from fota.server.releases import is_blob_name
from fota.server.store import Delta, Release, Store
from fota.tools.defaults import DEFAULT_BLOB_GRACE as DEFAULT_GRACE

__all__ = ["DEFAULT_GRACE", "collect_garbage", "named_blobs", "named_in", "summary"]

log = logging.getLogger(__name__)


def named_in(session, among: Collection[str] | None = None) -> set[str]:
    """The sha256 of every blob a live release or a patch row names, in ``session`` (of those
    ``among`` when given)."""
    releases, patches = select(Release.sha256).where(Release.live), select(Delta.sha256)
    if among is not None:
        releases = releases.where(Release.sha256.in_(list(among) or [""]))
        patches = patches.where(Delta.sha256.in_(list(among) or [""]))
    return set(session.scalars(releases)) | set(session.scalars(patches))


def named_blobs(store: Store, among: Collection[str] | None = None) -> set[str]:
    """named_in, in a session of its own."""
    with store.session() as s:
        return named_in(s, among)


def _file_age(path: Path, now: float) -> tuple[int, float] | None:
    """(size, age in seconds) of a regular file (not a link, not a directory); None otherwise or if gone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_size, now - st.st_mtime) if stat.S_ISREG(st.st_mode) else None


def _sweep_files(blobs_dir: Path, named: set[str], grace: float, now: float, dry_run: bool,
                 out: dict[str, Any]) -> None:
    try:
        names = sorted(entry.name for entry in os.scandir(blobs_dir))
    except FileNotFoundError:  # nothing was ever stored on this host
        return
    for name in names:
        if not is_blob_name(name) or name in named:
            continue
        found = _file_age(blobs_dir / name, now)
        if found is None:
            continue
        size, age = found
        if age < grace:
            out["young"] += 1
            continue
        if not dry_run:
            try:
                (blobs_dir / name).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                out["failures"].append(f"{blobs_dir / name}: {exc.strerror or exc}")
                continue
        out["files"].append({"sha256": name, "size": size})


def _sweep_objects(objects, named: set[str], grace: float, now: float, dry_run: bool, out: dict[str, Any]) -> None:
    try:
        for sha256, size, modified in objects.list_blobs():
            if sha256 in named:
                continue
            if now - modified < grace:
                out["young"] += 1
                continue
            if not dry_run:
                try:
                    objects.delete_blob(sha256)
                except Exception as exc:  # no permission for this one: the others may go
                    out["failures"].append(f"object {objects.key(sha256)}: {exc}")
                    continue
            out["objects"].append({"sha256": sha256, "size": size})
    except Exception as exc:  # the listing itself: storage unreachable, no credentials
        out["failures"].append(f"objects under {objects.bucket}/{objects.prefix}: not listed: {exc}")


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """A collection's answer in counts (its audit event's detail; a first run may list thousands)."""
    return {"grace": out["grace"], "files": len(out["files"]), "file_bytes": sum(f["size"] for f in out["files"]),
            "objects": len(out["objects"]), "object_bytes": sum(o["size"] for o in out["objects"]),
            "young": out["young"], "failures": out["failures"]}


def collect_garbage(store: Store, blobs_dir: str | os.PathLike, objects=None, *, grace: float = DEFAULT_GRACE,
                    dry_run: bool = False, actor: str | None = None, now: float | None = None) -> dict[str, Any]:
    """Remove (with ``dry_run``: only list) the blobs of ``blobs_dir`` and of ``objects`` (object
    storage, S3Payloads) when given that no live release and no patch names and that are at
    least ``grace`` seconds old (``now``: the time to age them against, default the clock).
    Recorded as ``release.gc`` by ``actor`` when given (not in a dry run; fota.server.release_prune
    records it in its own event).

    Returns {"dry_run", "grace", "files": [{"sha256", "size"}], "objects": [{"sha256", "size"}],
    "young": n (named by nothing, younger than grace: left for a later run), "object_storage":
    bool, "failures": [text]}; files and objects removed (dry run: that would be), by sha256."""
    if grace < 0:
        raise ValueError("grace must be at least 0 seconds")
    now = time.time() if now is None else now
    named = named_blobs(store)  # before the listing: see the module's docstring
    out: dict[str, Any] = {"dry_run": dry_run, "grace": grace, "files": [], "objects": [], "young": 0,
                           "object_storage": objects is not None, "failures": []}
    _sweep_files(Path(blobs_dir), named, grace, now, dry_run, out)
    if objects is not None:
        _sweep_objects(objects, named, grace, now, dry_run, out)
    for failure in out["failures"]:
        log.error("blob gc: not removed: %s", failure)
    log.info("blob gc%s: %d file(s), %d object(s) %s; %d younger than %ss kept", ", dry run" if dry_run else "",
             len(out["files"]), len(out["objects"]), "to remove" if dry_run else "removed", out["young"], grace)
    if actor is not None and not dry_run:
        audit.record(store, actor, "release.gc", "blobs", summary(out))
    return out

"""Deleting a release: its row is marked (releases.deleted_at), its image and the patches from
and to it leave the blob store (the home's blobs directory, and object storage when configured).

The row stays: deployments, jobs, campaigns and the audit log name it. A deleted release is
left out of listings, refused for new deployments and campaigns (releases.get_release,
lock_live), never a delta's base or target (fota.server.center.sender.delta_for) and never
offered by Home Assistant.

Order: the database first (one transaction: the mark, the patch rows, the audit event), the
files and objects after it committed. A file or object that cannot be removed then is left
behind and named in the result (garbage, never a release that lost its image); the next
garbage collection (fota.server.blob_gc: fota release gc, and after every prune) removes it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import delete, or_, select, update

from fota.server import audit
from fota.server.blob_gc import named_blobs, named_in
from fota.server.releases import ReleaseDeleted, ReleaseError, get_release
from fota.server.store import Campaign, Delta, Deployment, Job, Release, Store, utcnow

__all__ = ["ReleaseInUse", "delete_release", "release_users"]

log = logging.getLogger(__name__)


class ReleaseInUse(ReleaseError):
    """A deployment or campaign that has not finished still needs the release (``users``: what)."""

    def __init__(self, version: str, users: list[str]):
        super().__init__(f"release {version} is in use by {', '.join(users)}: it can be deleted once they "
                         "finish (or are cancelled: fota deployment cancel, fota campaign abort)")
        self.users = users


def _sharing_and_patches(s, release: Release) -> tuple[list[str], list]:
    """The other live releases with the same image (versions), and the cached patches a delete
    removes with it: those from or to its image, none while another release has that image."""
    shared = list(s.scalars(select(Release.version).where(Release.sha256 == release.sha256,
                                                          Release.id != release.id,
                                                          Release.live).order_by(Release.id)))
    patches = [] if shared else list(s.execute(
        select(Delta.id, Delta.sha256, Delta.blob_path).where(
            or_(Delta.base_sha256 == release.sha256, Delta.target_sha256 == release.sha256))
        .order_by(Delta.id)))
    return shared, patches


def _in_use(s, release: Release, patch_ids: list[int]) -> list[str]:
    """What still needs the release: unfinished campaigns of it, active deployments of it (not a
    campaign's, named by their campaign), and unfinished jobs sent as a patch from or to it."""
    from fota.server.campaigns.states import ABORTED, DONE
    from fota.server.deployments import ACTIVE, TERMINAL_STATES
    users = [f"campaign {name!r} ({state})" for name, state in s.execute(
        select(Campaign.name, Campaign.state).where(Campaign.release_id == release.id,
                                                    Campaign.state.not_in((ABORTED, DONE))).order_by(Campaign.id))]
    campaign_deployments = select(Campaign.deployment_id).where(Campaign.release_id == release.id)
    users += [f"deployment {dep_id} ({ACTIVE})" for dep_id in s.scalars(
        select(Deployment.id).where(Deployment.release_id == release.id, Deployment.state == ACTIVE,
                                    Deployment.id.not_in(campaign_deployments)).order_by(Deployment.id))]
    if patch_ids:  # a device downloading a patch from this image (to another release) needs it too
        rows = s.execute(select(Job.deployment_id, Release.version).distinct()
                         .join(Deployment, Deployment.id == Job.deployment_id)
                         .join(Release, Release.id == Deployment.release_id)
                         .where(Job.delta_id.in_(patch_ids), Job.state.not_in(TERMINAL_STATES))
                         .order_by(Job.deployment_id)).all()
        users += [f"deployment {dep_id} (devices downloading patches of it to release {version})"
                  for dep_id, version in rows]
    return users


def _unlink(path: Path) -> str | None:
    """None once ``path`` is gone (it may never have been here: another machine's blob)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    return None


def _remove_blobs(blobs_dir: Path, blobs: Iterable[tuple[str, str]], objects) -> list[str]:
    """Remove blobs (sha256, recorded path) from blobs_dir and object storage; what failed."""
    failures = []
    for sha256, recorded in blobs:
        paths = {blobs_dir / sha256}
        if recorded and Path(recorded).name == sha256:  # the content-addressed file the row names
            paths.add(Path(recorded))
        failures += [f for f in map(_unlink, sorted(paths)) if f]
        if objects is not None:
            try:
                objects.delete_blob(sha256)
            except Exception as exc:  # unreachable storage, no permission: left behind, said so
                failures.append(f"object {objects.key(sha256)}: {exc}")
    for failure in failures:
        log.error("deleted release: blob not removed: %s", failure)
    return failures


def release_users(store: Store, release: Release) -> list[str]:
    """What would make delete_release refuse ``release`` now (ReleaseInUse's ``users``); empty
    when nothing needs it. Read only: what a dry run (fota.server.release_prune) reports."""
    with store.session() as s:
        _, patches = _sharing_and_patches(s, release)
        return _in_use(s, release, [p.id for p in patches])


def delete_release(store: Store, blobs_dir: str | os.PathLike, version_or_id: str | int, objects=None, *,
                   actor: str) -> dict[str, Any]:
    """Delete a release: refused (ReleaseInUse, naming them) while a deployment or campaign that
    has not finished needs it; ReleaseNotFound (ReleaseDeleted) for an unknown or deleted one.

    Marks it deleted, removes the cached patches whose base or target is its image (rows and
    blobs) and its image blob, from ``blobs_dir`` and from ``objects`` (object storage,
    S3Payloads) when given, and records ``release.delete`` as ``actor``. A blob another
    release still uses (the same image under another version) stays.

    Returns {"id", "version", "deleted_at", "blobs_removed": [sha256], "patches_removed": n,
    "image_kept_for": [versions], "object_storage": bool, "failures": [text]}."""
    blobs_dir = Path(blobs_dir)
    release = get_release(store, version_or_id)
    now = utcnow()
    with audit.transaction(store) as tx, tx.session() as s:
        # The mark first: a deployment or campaign made meanwhile (lock_live) either committed
        # before it, and is seen below, or sees the release deleted.
        marked = s.execute(update(Release).where(Release.id == release.id, Release.live)
                           .values(deleted_at=now))
        if marked.rowcount != 1:
            raise ReleaseDeleted(release.version, s.scalar(select(Release.deleted_at)
                                                           .where(Release.id == release.id)) or now)
        shared, patches = _sharing_and_patches(s, release)
        users = _in_use(s, release, [p.id for p in patches])
        if users:
            raise ReleaseInUse(release.version, users)
        blobs: dict[str, str] = {}
        if patches:
            s.execute(delete(Delta).where(Delta.id.in_([p.id for p in patches])))
            blobs.update((p.sha256, p.blob_path) for p in patches)
        if not shared:
            blobs[release.sha256] = release.blob_path
        # A blob some other release or patch is (content-addressed: the same bytes) stays.
        still = named_in(s, blobs)
        blobs = {sha: path for sha, path in blobs.items() if sha not in still}
        tx.record(actor, "release.delete", f"release:{release.version}",
                  {"id": release.id, "sha256": release.sha256, "patches": len(patches),
                   "blobs": sorted(blobs), "image_kept_for": shared})
    # Read again after the commit: a release made meanwhile with the same image (its blob was
    # there already, so create_release only touched it) committed after the check above and
    # needs the blob. This narrows that race to the instant between this read and the removal.
    named_now = named_blobs(store, blobs)
    blobs = {sha: path for sha, path in blobs.items() if sha not in named_now}
    failures = _remove_blobs(blobs_dir, sorted(blobs.items()), objects)
    log.info("release %s deleted: %d blob(s) removed, %d patch(es)", release.version, len(blobs), len(patches))
    return {"id": release.id, "version": release.version, "deleted_at": now, "blobs_removed": sorted(blobs),
            "patches_removed": len(patches), "image_kept_for": shared, "object_storage": objects is not None,
            "failures": failures}

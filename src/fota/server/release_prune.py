"""Release retention: delete the releases a home no longer needs, through delete_release
(fota.server.release_delete), which removes each one's image and patches and audits it.

Kept, whatever their age:

* per hardware type and kind (image, bundle), the ``keep`` newest releases by version order
  (version_key, the order campaigns and Home Assistant compare versions by; the id breaks ties);
  a release for several hardware types is kept if any of its types keeps it;
* a release a registered device of one of its hardware types runs (devices.version): its delta
  base, and what it rolls back to;
* a release delete_release refuses (in use by a deployment, a campaign or a patch download).

Every release is listed, deleted or kept, with why it was kept. Then the blobs nothing names
any more go (fota.server.blob_gc): those an earlier delete failed to remove, and, run on another
host, that host's cached copies.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from typing import Any

from sqlalchemy import select

from fota.server import audit
from fota.server.blob_gc import DEFAULT_GRACE, collect_garbage, summary
from fota.server.campaigns.spec import version_key
from fota.server.release_delete import ReleaseInUse, delete_release, release_users
from fota.server.releases import ReleaseError, ReleaseNotFound, list_releases
from fota.server.store import Device, Release, Store
from fota.tools.defaults import DEFAULT_RELEASE_KEEP as DEFAULT_KEEP

__all__ = ["DEFAULT_KEEP", "prune_releases"]

log = logging.getLogger(__name__)


def _order(release: Release) -> tuple:
    return version_key(release.version), release.id


def _newest(releases: list[Release], keep: int) -> dict[int, list[str]]:
    """Why each release among the ``keep`` newest of one of its (hardware type, kind) is kept."""
    groups: dict[tuple[str, str], list[Release]] = defaultdict(list)
    for release in releases:
        for hardware in release.hardware:
            groups[(hardware, release.kind)].append(release)
    why: dict[int, list[str]] = defaultdict(list)
    for (hardware, kind), members in sorted(groups.items()):
        reason = (f"the newest {kind} for {hardware}" if keep == 1
                  else f"one of the {keep} newest {kind}s for {hardware}")
        for release in sorted(members, key=_order, reverse=True)[:keep]:
            why[release.id].append(reason)
    return why


def _running(store: Store, releases: list[Release]) -> Counter:
    """Release id -> the number of registered devices of one of its hardware types that run it."""
    by_version = {r.version: r for r in releases}
    running: Counter = Counter()
    with store.session() as s:
        rows = s.execute(select(Device.hardware, Device.version).where(Device.version.is_not(None)))
        for hardware, version in rows:
            release = by_version.get(version)
            if release is not None and hardware in release.hardware:
                running[release.id] += 1
    return running


def _entry(release: Release, **more) -> dict[str, Any]:
    return {"version": release.version, "hardware": list(release.hardware), "kind": release.kind, **more}


def prune_releases(store: Store, blobs_dir: str | os.PathLike, keep: int = DEFAULT_KEEP, objects=None, *,
                   actor: str, dry_run: bool = False, grace: float = DEFAULT_GRACE) -> dict[str, Any]:
    """Delete (with ``dry_run``: only list) the releases the policy above does not keep, oldest
    first, each with delete_release (``objects``: object storage, as there), audited as
    ``release.delete`` each and once as ``release.prune`` (not in a dry run); then collect the
    garbage (blob_gc.collect_garbage, ``grace`` and ``dry_run`` as there).

    Returns {"keep", "dry_run", "deleted": [{"version", "hardware", "kind"}], "kept": [{"version",
    "hardware", "kind", "why": [text]}], "blobs_removed": [sha256], "patches_removed": n,
    "object_storage": bool, "failures": [text], "gc": collect_garbage's answer}; both lists in
    version order; failures: the deletes' (the collection's are its own)."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ReleaseError("keep must be at least 1: the newest release of each hardware type stays")
    releases = sorted(list_releases(store), key=_order)
    why = _newest(releases, keep)
    for release_id, devices in _running(store, releases).items():
        why[release_id].append(f"running on {devices} device(s)")
    deleted, kept, in_use, blobs, patches, failures = [], [], [], [], 0, []
    for release in releases:
        if why.get(release.id):
            kept.append(_entry(release, why=why[release.id]))
            continue
        try:
            if dry_run:
                users = release_users(store, release)
                if users:
                    raise ReleaseInUse(release.version, users)
            else:
                out = delete_release(store, blobs_dir, release.version, objects, actor=actor)
                blobs += out["blobs_removed"]
                patches += out["patches_removed"]
                failures += out["failures"]
        except ReleaseInUse as exc:
            kept.append(_entry(release, why=[f"in use by {', '.join(exc.users)}"]))
            in_use.append(release.version)
            continue
        except ReleaseNotFound:  # deleted meanwhile (another prune, fota release delete): gone anyway
            log.info("release prune: %s was deleted meanwhile", release.version)
            continue
        deleted.append(_entry(release))
    log.info("release prune (keep %d%s): %d deleted, %d kept", keep, ", dry run" if dry_run else "",
             len(deleted), len(kept))
    gc = collect_garbage(store, blobs_dir, objects, grace=grace, dry_run=dry_run)
    if not dry_run:
        audit.record(store, actor, "release.prune", "releases",
                     {"keep": keep, "deleted": [d["version"] for d in deleted],
                      "in_use": in_use,
                      "failures": failures, "gc": summary(gc)})
    return {"keep": keep, "dry_run": dry_run, "deleted": deleted, "kept": kept, "blobs_removed": blobs,
            "patches_removed": patches, "object_storage": objects is not None, "failures": failures, "gc": gc}

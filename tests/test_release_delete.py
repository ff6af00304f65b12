"""Deleting a release (fota.server.release_delete): its image and the patches from and to it leave
the blobs directory; the row stays, marked, and nothing offers or sends the release any more; refused
while a deployment or campaign that has not finished needs it (SQLite and PostgreSQL)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import select, update

from fota.server import delta as server_delta
from fota.server.audit import list_events
from fota.server.campaigns import CampaignError, abort_campaign, create_campaign, preview_campaign
from fota.server.center.jobs import JobCache
from fota.server.center.keys import KeyPusher
from fota.server.center.sender import CommandSender
from fota.server.deployments import DeploymentError, cancel_deployment, create_deployment
from fota.server.fleet import provision_device
from fota.server.homeassistant import DEFAULT_TAG, HomeAssistantBridge, HomeAssistantSettings
from fota.server.release_delete import ReleaseInUse, delete_release
from fota.server.releases import (ReleaseDeleted, ReleaseError, ReleaseNotFound, create_release, get_release,
                                  list_releases, read_blob, resign_release)
from fota.server.store import Delta, Device, Job, Release, Store, utcnow
from fota.tools.keyring import Signer
from fota.tools.signing import generate_private_key

KEY = generate_private_key()
ACTOR = "cli:tester"


def _images(n: int = 3) -> list[bytes]:
    """n images, each a small change of the one before: patches between them are worth it."""
    first = os.urandom(40_000)
    return [first[:10_000 + 100 * i] + b"change %d" % i + first[10_000 + 100 * i:] for i in range(n)]


def _releases(store: Store, blobs: Path, versions=("1.0.0", "1.1.0", "1.2.0")) -> list[Release]:
    return [create_release(store, blobs, KEY, image, version, ["board"], kind="image")
            for image, version in zip(_images(len(versions)), versions)]


def _patch(store, blobs, base: Release, target: Release):
    patch = server_delta.get_delta(store, blobs, base, target, 12, read_blob)
    assert patch is not None and (blobs / patch.sha256).is_file()
    return patch


def _stored(blobs: Path) -> set[str]:
    return {p.name for p in blobs.iterdir()}


def test_delete_removes_its_image_and_patches_keeps_the_row_and_is_audited(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    to_r2, from_r2, around = (_patch(store, blobs, r1, r2), _patch(store, blobs, r2, r3),
                              _patch(store, blobs, r1, r3))
    provision_device(store, "dev-1", "board")
    done = create_deployment(store, r2, device_ids=["dev-1"])  # finished deployments do not hold it
    with store.session() as s:
        cancel_deployment(s, done.id, utcnow())

    out = delete_release(store, blobs, "1.1.0", actor=ACTOR)

    assert out["version"] == "1.1.0" and out["patches_removed"] == 2 and out["failures"] == []
    assert set(out["blobs_removed"]) == {r2.sha256, to_r2.sha256, from_r2.sha256}
    assert not out["object_storage"] and out["image_kept_for"] == []
    assert _stored(blobs) == {r1.sha256, r3.sha256, around.sha256}
    with store.session() as s:
        assert [d.id for d in s.scalars(select(Delta))] == [around.id]
        row = s.get(Release, r2.id)  # the row stays, marked: the deployment still names it
        assert row.deleted_at == out["deleted_at"] and row.deployments[0].id == done.id
    (event,) = list_events(store, action="release.delete")
    assert (event.actor, event.target) == (ACTOR, "release:1.1.0")
    assert event.detail["patches"] == 2 and set(event.detail["blobs"]) == set(out["blobs_removed"])

    # Listed only on request, marked; not found by default; a second delete is "no such release".
    assert [r.version for r in list_releases(store)] == ["1.0.0", "1.2.0"]
    listed = {r.version: r.deleted_at for r in list_releases(store, deleted=True)}
    assert listed["1.1.0"] is not None and listed["1.0.0"] is None
    assert get_release(store, "1.1.0", deleted=True).deleted_at is not None
    for ref in ("1.1.0", r2.id):
        with pytest.raises(ReleaseDeleted, match=r"no release '1\.1\.0': it was deleted at 20"):
            get_release(store, ref)
    with pytest.raises(ReleaseNotFound, match="no release '1.1.0': it was deleted"):
        delete_release(store, blobs, "1.1.0", actor=ACTOR)
    with pytest.raises(ReleaseNotFound, match="no release '9.9.9'"):
        delete_release(store, blobs, "9.9.9", actor=ACTOR)
    assert len(list_events(store, action="release.delete")) == 1

    # Refused for new deployments and campaigns (by version, and as a row read before the delete).
    with pytest.raises(ReleaseError, match="it was deleted"):
        create_deployment(store, "1.1.0", device_ids=["dev-1"])
    with pytest.raises(DeploymentError, match="no release '1.1.0': it was deleted"):
        create_deployment(store, r2, device_ids=["dev-1"])
    for make in (create_campaign, preview_campaign):
        with pytest.raises(CampaignError, match="no release '1.1.0': it was deleted"):
            make(store, "spring", "1.1.0", {"filter": {"hardware": ["board"]}})
    with pytest.raises(CampaignError, match="it was deleted"):
        create_campaign(store, "spring", r2, {"filter": {"hardware": ["board"]}})
    with pytest.raises(ReleaseError, match="it was deleted"):
        resign_release(store, "1.1.0", Signer(KEY))
    with store.session() as s:
        assert s.scalar(select(Job.id).where(Job.deployment_id != done.id)) is None


def test_refused_while_a_deployment_campaign_or_patch_download_needs_it(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    provision_device(store, "dev-1", "board", tags=["lab"])
    provision_device(store, "dev-2", "board", tags=["lab"])
    dep = create_deployment(store, r2, device_ids=["dev-1"])
    create_campaign(store, "spring", r2, {"filter": {"tags": ["lab"]}})
    before = _stored(blobs)

    def refused(version: str, *needles: str) -> None:
        with pytest.raises(ReleaseInUse) as info:
            delete_release(store, blobs, version, actor=ACTOR)
        for needle in needles:
            assert needle in str(info.value), str(info.value)
        assert get_release(store, version).deleted_at is None and _stored(blobs) == before
        assert list_events(store, action="release.delete") == []

    refused("1.1.0", f"release 1.1.0 is in use by campaign 'spring' (draft), deployment {dep.id} (active)",
            "fota deployment cancel, fota campaign abort")
    with store.session() as s:
        cancel_deployment(s, dep.id, utcnow())
    refused("1.1.0", "campaign 'spring' (draft)")
    abort_campaign(store, "spring")

    # A device downloading a patch from 1.1.0 to 1.2.0 needs the patch: 1.1.0 waits for that job.
    patch = _patch(store, blobs, r2, r3)
    before = _stored(blobs)
    sending = create_deployment(store, r3, device_ids=["dev-2"])
    with store.session() as s:
        s.execute(update(Job).where(Job.id == sending.jobs[0].id).values(state="downloading", delta_id=patch.id))
    refused("1.1.0", f"release 1.1.0 is in use by deployment {sending.id} (devices downloading patches of it to "
                     "release 1.2.0)")
    with store.session() as s:
        s.execute(update(Job).where(Job.id == sending.jobs[0].id).values(state="confirmed"))
    assert delete_release(store, blobs, "1.1.0", actor=ACTOR)["patches_removed"] == 1
    assert r2.sha256 not in _stored(blobs) and patch.sha256 not in _stored(blobs)


def test_an_image_another_release_has_stays(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2 = _releases(store, blobs, ("1.0.0", "1.1.0"))
    twin = create_release(store, blobs, KEY, read_blob(r2), "1.1.0-twin", ["board"], kind="image")
    patch = _patch(store, blobs, r1, r2)
    out = delete_release(store, blobs, "1.1.0", actor=ACTOR)
    assert out["image_kept_for"] == ["1.1.0-twin"] and out["blobs_removed"] == [] and out["patches_removed"] == 0
    assert _stored(blobs) == {r1.sha256, r2.sha256, patch.sha256}  # the twin's image, and its patch
    assert _patch(store, blobs, r1, twin).id == patch.id
    out = delete_release(store, blobs, "1.1.0-twin", actor=ACTOR)
    assert out["patches_removed"] == 1 and _stored(blobs) == {r1.sha256}



def test_a_release_made_with_the_same_image_while_one_is_deleted_keeps_it(store, tmp_path, monkeypatch):
    """A release created with the deleted one's image after the delete's transaction checked who
    else has it (its blob was there, so creating it only touched the file) keeps the blob: the
    delete reads the names again before it removes anything."""
    from fota.server import release_delete
    blobs = tmp_path / "blobs"
    (r1,) = _releases(store, blobs, ("1.0.0",))
    image = read_blob(r1)
    named = release_delete.named_blobs

    def twin_commits_first(store_, among=None):  # the concurrent create's commit lands right after the delete's
        create_release(store_, blobs, KEY, image, "1.0.0-twin", ["board"], kind="image")
        return named(store_, among)

    monkeypatch.setattr(release_delete, "named_blobs", twin_commits_first)
    out = delete_release(store, blobs, "1.0.0", actor=ACTOR)
    assert out["image_kept_for"] == [] and out["blobs_removed"] == []  # it looked alone; then it was not
    assert read_blob(get_release(store, "1.0.0-twin")) == image

def _sender(store: Store, blobs: Path) -> CommandSender:
    """The control center's command sender, driven by hand: claim_pending builds the commands."""
    keys = KeyPusher(store, None, lambda *a: True, Signer(KEY), None)
    return CommandSender(store, None, JobCache(store, blobs, None), None, keys, client_id="c-1", blobs_dir=blobs,
                         chunk=1024, window=4, poll_interval=1, require_online=False, delta_wbits=12,
                         command_ttl=3600, kek=None, fenced=lambda: False)


def _command(out) -> dict:
    return json.loads(json.loads(out.command)["body"])


def test_a_device_running_a_deleted_release_gets_the_full_image(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    for dev in ("on-10", "on-11"):
        provision_device(store, dev, "board")
    with store.session() as s:  # what their inventories report: the image they run, a delta window
        for dev, rel in (("on-10", r1), ("on-11", r2)):
            s.get(Device, dev).inventory = {"image": rel.sha256, "delta_wbits": 12}
    sender = _sender(store, blobs)
    dep = create_deployment(store, r3, device_ids=["on-11"])
    (first,) = sender.claim_pending()
    assert _command(first)["delta"]["base_sha256"] == r2.sha256 and first.delta_id is not None  # a patch, before
    with store.session() as s:
        s.execute(update(Job).where(Job.deployment_id == dep.id).values(state="confirmed"))

    delete_release(store, blobs, "1.1.0", actor=ACTOR)
    assert r2.sha256 not in _stored(blobs)
    dep = create_deployment(store, r3, device_ids=["on-11", "on-10"])
    outs = {out.device_id: out for out in sender.claim_pending()}
    full = outs["on-11"]
    assert "delta" not in _command(full) and full.delta_id is None  # no patch from an image that is gone
    assert full.info.blob == read_blob(r3)  # the chunk server serves the whole image
    assert _command(outs["on-10"])["delta"]["base_sha256"] == r1.sha256  # 1.0.0 is still a base
    with store.session() as s:
        assert s.scalar(select(Delta.id).where(Delta.base_sha256 == r2.sha256)) is None


def test_home_assistant_never_offers_a_deleted_release(store, tmp_path):
    blobs = tmp_path / "blobs"
    _releases(store, blobs, ("1.0.0", "1.1.0"))
    provision_device(store, "ha-1", "board", tags=[DEFAULT_TAG])
    bridge = HomeAssistantBridge(store, None, lambda *a: True, HomeAssistantSettings())
    assert bridge.read_views()["ha-1"].release[1] == "1.1.0"
    delete_release(store, blobs, "1.1.0", actor=ACTOR)
    assert bridge.read_views()["ha-1"].release[1] == "1.0.0"
    delete_release(store, blobs, "1.0.0", actor=ACTOR)
    assert bridge.read_views()["ha-1"].release is None


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_deployment_made_while_the_release_is_deleted_is_seen_or_refused(store, tmp_path):
    # PostgreSQL, READ COMMITTED: a deployment whose transaction took the release (lock_live) and
    # has not committed yet makes delete_release wait at its mark; once it commits, the delete
    # sees it and is refused, and the release keeps its image (never a deployment without one).
    import threading
    from sqlalchemy import text
    from fota.server.releases import lock_live
    from fota.server.store import Deployment
    from fota.tools.waiting import wait_until
    blobs = tmp_path / "blobs"
    (rel,) = _releases(store, blobs, ("1.0.0",))
    outcome: list[BaseException | dict] = []
    with store.session() as s:
        lock_live(s, rel)
        s.add(Deployment(release_id=rel.id, target={"devices": []}, state="active"))
        s.flush()

        def delete():
            try:
                outcome.append(delete_release(store, blobs, "1.0.0", actor=ACTOR))
            except BaseException as exc:
                outcome.append(exc)
        worker = threading.Thread(target=delete)
        worker.start()

        def waiting() -> bool:  # the delete's UPDATE waits for this transaction's row lock
            with store.engine.connect() as c:
                return bool(c.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND query LIKE 'UPDATE releases SET deleted_at%'")).scalar())
        wait_until(waiting, timeout=30, what="delete_release waiting for the deployment's transaction")
        assert not outcome
    worker.join(30)
    (result,) = outcome
    assert isinstance(result, ReleaseInUse) and "deployment" in str(result), result
    assert get_release(store, "1.0.0").deleted_at is None and rel.sha256 in _stored(blobs)

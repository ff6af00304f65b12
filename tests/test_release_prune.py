"""Release retention (fota.server.release_prune): per hardware type and kind the N newest releases by
version order stay, so do the releases a device runs and those delete_release refuses (in use); the
rest are deleted through delete_release; a dry run changes nothing (SQLite and PostgreSQL)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import update

from fota.server.audit import list_events
from fota.server.deployments import cancel_deployment, create_deployment
from fota.server.fleet import provision_device
from fota.server.release_prune import prune_releases
from fota.server.releases import ReleaseError, create_release, list_releases
from fota.server.store import Device, Store, utcnow
from fota.tools import bundle
from fota.tools.signing import generate_private_key

KEY = generate_private_key()
ACTOR = "cli:tester"


def _release(store: Store, blobs: Path, version: str, hardware: list[str], kind: str = "image"):
    data = os.urandom(2000) if kind == "image" else bundle.pack_files({"app.py": os.urandom(500)})
    return create_release(store, blobs, KEY, data, version, hardware, kind=kind)


def _live(store: Store) -> list[str]:
    return sorted(r.version for r in list_releases(store))


def _stored(blobs: Path) -> set[str]:
    return {p.name for p in blobs.iterdir()}


def _run(store: Store, devices: dict[str, tuple[str, str | None]]) -> None:
    """Register devices: id -> (hardware type, the version they report running)."""
    for device_id, (hardware, version) in devices.items():
        provision_device(store, device_id, hardware)
        with store.session() as s:
            s.execute(update(Device).where(Device.id == device_id).values(version=version))


def test_keeps_the_newest_per_hardware_type_and_kind_by_version_order(store, tmp_path):
    blobs = tmp_path / "blobs"
    made = {}
    # created out of version order: 1.10.0 is newer than 1.9.0 (not the text order, not the id order)
    for version, hardware, kind in (("1.10.0", ["board"], "image"), ("1.0.0", ["board"], "image"),
                                    ("1.9.0", ["board"], "image"), ("1.2.0", ["board"], "image"),
                                    # old for board, among the newest two for other: kept for other
                                    ("1.1.0", ["board", "other"], "image"),
                                    ("0.5.0", ["other"], "image"), ("0.4.0", ["other"], "image"),
                                    # bundles count apart from images: older versions, still the newest bundles
                                    ("0.1.0", ["board"], "bundle"), ("0.2.0", ["board"], "bundle"),
                                    ("0.3.0", ["board"], "bundle")):
        made[version] = _release(store, blobs, version, hardware, kind)

    out = prune_releases(store, blobs, 2, actor=ACTOR)

    assert [d["version"] for d in out["deleted"]] == ["0.1.0", "0.4.0", "1.0.0", "1.2.0"]
    assert out["deleted"][1] == {"version": "0.4.0", "hardware": ["other"], "kind": "image"}
    assert {k["version"]: k["why"] for k in out["kept"]} == {
        "0.2.0": ["one of the 2 newest bundles for board"], "0.3.0": ["one of the 2 newest bundles for board"],
        "0.5.0": ["one of the 2 newest images for other"], "1.1.0": ["one of the 2 newest images for other"],
        "1.9.0": ["one of the 2 newest images for board"], "1.10.0": ["one of the 2 newest images for board"]}
    assert (out["keep"], out["dry_run"], out["failures"], out["object_storage"]) == (2, False, [], False)
    assert _live(store) == ["0.2.0", "0.3.0", "0.5.0", "1.1.0", "1.10.0", "1.9.0"]
    gone = {made[v].sha256 for v in ("0.1.0", "0.4.0", "1.0.0", "1.2.0")}
    assert sorted(out["blobs_removed"]) == sorted(gone)
    assert not gone & _stored(blobs) and _stored(blobs) == {made[v].sha256 for v in _live(store)}
    # audited: each delete as delete_release does it, and the pass once
    assert sorted(e.target for e in list_events(store, action="release.delete")) == [
        "release:0.1.0", "release:0.4.0", "release:1.0.0", "release:1.2.0"]
    (event,) = list_events(store, action="release.prune")
    assert (event.actor, event.target) == (ACTOR, "releases")
    assert event.detail == {"keep": 2, "deleted": ["0.1.0", "0.4.0", "1.0.0", "1.2.0"], "in_use": [],
                            "failures": [], "gc": {"grace": 3600, "files": 0, "file_bytes": 0, "objects": 0,
                                                   "object_bytes": 0, "young": 0, "failures": []}}
    assert out["gc"] == {"dry_run": False, "grace": 3600, "files": [], "objects": [], "young": 0,
                         "object_storage": False, "failures": []}  # the deletes left nothing behind

    # a second pass finds nothing more; keep 1 then deletes the next oldest
    assert prune_releases(store, blobs, 2, actor=ACTOR)["deleted"] == []
    out = prune_releases(store, blobs, 1, actor=ACTOR)
    assert [d["version"] for d in out["deleted"]] == ["0.2.0", "0.5.0", "1.9.0"]
    assert _live(store) == ["0.3.0", "1.1.0", "1.10.0"]
    with pytest.raises(ReleaseError, match="keep must be at least 1"):
        prune_releases(store, blobs, 0, actor=ACTOR)


def test_releases_devices_run_and_in_use_ones_stay_and_a_dry_run_changes_nothing(store, tmp_path):
    blobs = tmp_path / "blobs"
    for version in ("1.0.0", "1.1.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0"):
        _release(store, blobs, version, ["board"])
    # 1.0.0 runs on two boards; a device of another hardware type reporting 1.1.0 does not hold it
    _run(store, {"b-1": ("board", "1.0.0"), "b-2": ("board", "1.0.0"), "o-1": ("other", "1.1.0"),
                 "b-3": ("board", None), "b-4": ("board", "1.5.0")})
    dep = create_deployment(store, "1.2.0", device_ids=["b-3"])  # active: delete_release refuses 1.2.0

    def state():
        return _live(store), _stored(blobs), [(e.action, e.target) for e in list_events(store)]
    before = state()
    dry = prune_releases(store, blobs, 2, actor=ACTOR, dry_run=True)
    assert state() == before  # nothing deleted, nothing audited

    assert dry["dry_run"] and [d["version"] for d in dry["deleted"]] == ["1.1.0", "1.3.0"]
    assert (dry["blobs_removed"], dry["patches_removed"], dry["failures"]) == ([], 0, [])
    kept = {k["version"]: k["why"] for k in dry["kept"]}
    assert kept == {"1.0.0": ["running on 2 device(s)"],
                    "1.2.0": [f"in use by deployment {dep.id} (active)"],
                    "1.4.0": ["one of the 2 newest images for board"],
                    "1.5.0": ["one of the 2 newest images for board", "running on 1 device(s)"]}

    # the real pass deletes what the dry run listed and keeps the same, for the same reasons
    out = prune_releases(store, blobs, 2, actor=ACTOR)
    assert (out["deleted"], out["kept"]) == (dry["deleted"], dry["kept"])
    assert _live(store) == ["1.0.0", "1.2.0", "1.4.0", "1.5.0"]
    assert list_events(store, action="release.prune")[0].detail["in_use"] == ["1.2.0"]

    # once the deployment is over and the boards moved on, the next pass deletes them
    with store.session() as s:
        cancel_deployment(s, dep.id, utcnow())
        s.execute(update(Device).where(Device.hardware == "board").values(version="1.5.0"))
    out = prune_releases(store, blobs, 2, actor=ACTOR)
    assert [d["version"] for d in out["deleted"]] == ["1.0.0", "1.2.0"]
    assert _live(store) == ["1.4.0", "1.5.0"]

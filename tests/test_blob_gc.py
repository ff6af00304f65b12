"""Garbage collection of blobs (fota.server.blob_gc): what a failed removal at delete time left
behind, and another host's cached copies, go at the next collection once older than the grace
period; blobs a live release or a patch names, younger ones and files that are not blobs stay;
a dry run removes nothing (SQLite and PostgreSQL; object storage on moto's server)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from fota.server import delta as server_delta
from fota.server.audit import list_events
from fota.server.blob_gc import collect_garbage
from fota.server.release_delete import delete_release
from fota.server.release_prune import prune_releases
from fota.server.releases import blob_file, create_release, read_blob, write_blob
from fota.server.store import Release, Store
from fota.tools.signing import generate_private_key

from test_http_transport import _object, s3, s3_endpoint  # noqa: F401 (fixtures: moto's S3 server)

KEY = generate_private_key()
ACTOR = "cli:tester"
HOURS_2 = 2 * 3600


def _images(n: int = 3) -> list[bytes]:
    """n images, each a small change of the one before: patches between them are worth it."""
    first = os.urandom(40_000)
    return [first[:10_000 + 100 * i] + b"change %d" % i + first[10_000 + 100 * i:] for i in range(n)]


def _releases(store: Store, blobs: Path, remote=None) -> list[Release]:
    return [create_release(store, blobs, KEY, image, version, ["board"], kind="image", remote=remote)
            for image, version in zip(_images(), ("1.0.0", "1.1.0", "1.2.0"))]


def _patches(store: Store, blobs: Path, r1, r2, r3, remote=None) -> list:
    """The patches 1.0.0 -> 1.1.0, 1.1.0 -> 1.2.0 (both go with 1.1.0) and 1.0.0 -> 1.2.0 (stays)."""
    return [server_delta.get_delta(store, blobs, base, target, 12, read_blob, remote=remote)
            for base, target in ((r1, r2), (r2, r3), (r1, r3))]


def _listing(directory: Path) -> dict[str, bytes | str]:
    """Every entry: a file's bytes, a link's target, 'dir' for a directory."""
    out = {}
    for p in directory.iterdir():
        out[p.name] = (f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes())
    return out


def _age(directory: Path, seconds: float) -> None:
    """Every entry made `seconds` older (links themselves, not their targets)."""
    for p in directory.iterdir():
        st = os.lstat(p)
        os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds), follow_symlinks=False)


@contextmanager
def _undeletable(directory: Path):
    """Nothing in `directory` can be removed meanwhile: read-only for a user, immutable for root
    (whom permissions do not stop)."""
    if os.geteuid() != 0:
        os.chmod(directory, 0o500)
        try:
            yield
        finally:
            os.chmod(directory, 0o700)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("root, and no chattr +i here: a removal cannot be made to fail")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def _not_blobs(blobs: Path, outside: Path) -> set[str]:
    """Entries of a blobs directory that are not blobs, each looking a bit like one."""
    sha = hashlib.sha256(b"not a blob").hexdigest()
    (blobs / "notes.txt").write_text("the operator's notes")
    (blobs / f".{sha}.1234.tmp").write_bytes(b"a write in progress")  # write_private's temporary file
    (blobs / sha.upper()).write_bytes(b"upper case")
    (blobs / sha[:63]).write_bytes(b"63 digits")
    (blobs / (sha + ".bak")).write_bytes(b"a copy")
    (blobs / hashlib.sha256(b"a directory").hexdigest()).mkdir()
    outside.write_bytes(b"a file elsewhere")
    (blobs / hashlib.sha256(b"a link").hexdigest()).symlink_to(outside)
    return {"notes.txt", f".{sha}.1234.tmp", sha.upper(), sha[:63], sha + ".bak",
            hashlib.sha256(b"a directory").hexdigest(), hashlib.sha256(b"a link").hexdigest()}


def test_what_a_failed_removal_left_behind_goes_at_the_next_gc_and_nothing_else(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    to_r2, from_r2, around = _patches(store, blobs, r1, r2, r3)
    others = _not_blobs(blobs, tmp_path / "outside")

    with _undeletable(blobs):
        out = delete_release(store, blobs, "1.1.0", actor=ACTOR)
    left = sorted([r2.sha256, to_r2.sha256, from_r2.sha256])
    assert sorted(out["blobs_removed"]) == left
    assert [f.split(":")[0] for f in out["failures"]] == [str(blobs / sha) for sha in left]
    before = _listing(blobs)
    assert set(left) <= set(before)  # left behind, and said so

    # Younger than the grace period (just written): they stay, counted.
    young = collect_garbage(store, blobs, actor=ACTOR)
    assert (young["files"], young["young"], young["failures"], young["dry_run"]) == ([], 3, [], False)
    assert _listing(blobs) == before

    _age(blobs, HOURS_2)
    dry = collect_garbage(store, blobs, dry_run=True, actor=ACTOR)
    expected = [{"sha256": sha, "size": len(before[sha])} for sha in left]
    assert (dry["files"], dry["objects"], dry["young"], dry["object_storage"]) == (expected, [], 0, False)
    assert _listing(blobs) == before

    swept = collect_garbage(store, blobs, actor=ACTOR)
    assert (swept["files"], swept["young"], swept["failures"]) == (expected, 0, [])
    assert set(_listing(blobs)) == others | {r1.sha256, r3.sha256, around.sha256}
    assert {name: data for name, data in _listing(blobs).items() if name in others} == \
        {name: data for name, data in before.items() if name in others}
    assert (tmp_path / "outside").read_bytes() == b"a file elsewhere"  # a link's target is not a blob here
    assert collect_garbage(store, blobs, grace=0)["files"] == []  # nothing more, even at once

    # audited (a dry run is not): counts, not lists
    events = [e.detail for e in list_events(store, action="release.gc")]
    size = sum(len(before[sha]) for sha in left)
    assert events == [{"grace": 3600, "files": 3, "file_bytes": size, "objects": 0, "object_bytes": 0, "young": 0,
                       "failures": []},
                      {"grace": 3600, "files": 0, "file_bytes": 0, "objects": 0, "object_bytes": 0, "young": 3,
                       "failures": []}]


def test_blobs_a_live_release_or_a_patch_names_stay(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    twin = create_release(store, blobs, KEY, read_blob(r2), "1.1.1", ["board"], kind="image")  # 1.1.0's image
    to_r2, from_r2, around = _patches(store, blobs, r1, r2, r3)
    out = delete_release(store, blobs, "1.1.0", actor=ACTOR)
    assert out["image_kept_for"] == ["1.1.1"] and out["blobs_removed"] == []
    # a deleted release's image another live release has, and the patches from and to it, stay
    _age(blobs, HOURS_2)
    before = _listing(blobs)
    assert collect_garbage(store, blobs, grace=0)["files"] == [] and _listing(blobs) == before
    assert {twin.sha256, to_r2.sha256, from_r2.sha256, around.sha256} <= set(before)

    # then the twin goes too: its image and the patches from and to it are garbage, and only them
    with _undeletable(blobs):
        assert len(delete_release(store, blobs, "1.1.1", actor=ACTOR)["failures"]) == 3
    swept = collect_garbage(store, blobs, grace=0)
    assert sorted(f["sha256"] for f in swept["files"]) == sorted([twin.sha256, to_r2.sha256, from_r2.sha256])
    assert set(_listing(blobs)) == {r1.sha256, r3.sha256, around.sha256}


def test_a_blob_younger_than_the_grace_period_stays_and_a_writer_makes_an_old_one_young(store, tmp_path):
    blobs = tmp_path / "blobs"
    (r1,) = [create_release(store, blobs, KEY, os.urandom(3000), "1.0.0", ["board"], kind="image")]
    # A release being added: its image written, its row not committed yet (create_release's order).
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    write_blob(blobs, data, sha)
    out = collect_garbage(store, blobs, now=time.time() + 3599)
    assert (out["files"], out["young"]) == ([], 1) and (blobs / sha).is_file()
    assert collect_garbage(store, blobs, grace=600, now=time.time() + 601, dry_run=True)["files"] == [
        {"sha256": sha, "size": 5000}]  # the grace period is the option's

    # The same bytes, unnamed and old (a deleted release's image left behind), written again by a
    # release being added: the file is there already, and is made young, not left old.
    _age(blobs, HOURS_2)
    assert [f["sha256"] for f in collect_garbage(store, blobs, dry_run=True)["files"]] == [sha]
    write_blob(blobs, data, sha)
    out = collect_garbage(store, blobs)
    assert (out["files"], out["young"]) == ([], 1) and (blobs / sha).read_bytes() == data
    assert (blobs / r1.sha256).is_file()


def test_prune_sweeps_after_deleting_and_its_dry_run_only_lists(store, tmp_path):
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs)
    with _undeletable(blobs):  # an earlier delete whose removal failed
        assert len(delete_release(store, blobs, "1.0.0", actor=ACTOR)["failures"]) == 1
    _age(blobs, HOURS_2)
    before = _listing(blobs)

    dry = prune_releases(store, blobs, 1, actor=ACTOR, dry_run=True)
    assert [d["version"] for d in dry["deleted"]] == ["1.1.0"]
    assert dry["gc"]["dry_run"] and dry["gc"]["files"] == [{"sha256": r1.sha256, "size": r1.size}]
    assert _listing(blobs) == before and list_events(store, action="release.prune") == []

    out = prune_releases(store, blobs, 1, actor=ACTOR)
    assert out["blobs_removed"] == [r2.sha256]
    assert out["gc"]["files"] == [{"sha256": r1.sha256, "size": r1.size}] and out["gc"]["failures"] == []
    assert set(_listing(blobs)) == {r3.sha256}
    (event,) = list_events(store, action="release.prune")
    assert event.detail["gc"] == {"grace": 3600, "files": 1, "file_bytes": r1.size, "objects": 0,
                                  "object_bytes": 0, "young": 0, "failures": []}


# ---- object storage, and another host's cache of it ------------------------------------------------

def _client(endpoint: str):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def test_objects_left_behind_and_another_hosts_cached_copies_go(s3, store, tmp_path):
    import boto3
    from botocore.config import Config
    from fota.server.objectstore import S3Payloads
    endpoint, bucket = s3
    objects = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, region="us-east-1",
                         prefix="fota/")
    blobs = tmp_path / "blobs"
    r1, r2, r3 = _releases(store, blobs, remote=objects)
    to_r2, from_r2, around = _patches(store, blobs, r1, r2, r3, remote=objects)
    # Another host (a worker with its own blobs/) cached what its jobs read from the bucket.
    cache = tmp_path / "other-host-blobs"
    for sha in (r1.sha256, r2.sha256, to_r2.sha256):
        assert blob_file(cache, sha, objects) is not None
    # Keys that are not blobs of this prefix: never touched.
    foreign = {"fota/notes.txt": b"notes", f"fota/sub/{r2.sha256}": b"deeper", f"elsewhere/{r2.sha256}": b"other",
               f"fota/{r2.sha256.upper()}": b"upper"}
    for key, body in foreign.items():
        _client(endpoint).put_object(Bucket=bucket, Key=key, Body=body)

    # The storage unreachable at delete time: the objects are left behind, and named.
    closed = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                        s3={"addressing_style": "path"}))
    out = delete_release(store, blobs, "1.1.0", S3Payloads(bucket, blobs_dir=blobs, prefix="fota/", client=closed),
                         actor=ACTOR)
    left = sorted([r2.sha256, to_r2.sha256, from_r2.sha256])
    assert [f.split(":")[0] for f in out["failures"]] == [f"object fota/{sha}" for sha in left]
    assert all(_object(endpoint, bucket, f"fota/{sha}") is not None for sha in left)

    # Unreachable for the collection too: said so, nothing else fails.
    out = collect_garbage(store, blobs, S3Payloads(bucket, blobs_dir=blobs, prefix="fota/", client=closed))
    assert out["objects"] == [] and len(out["failures"]) == 1 and "not listed" in out["failures"][0]

    # Just written: younger than the grace period.
    young = collect_garbage(store, blobs, objects)
    assert (young["objects"], young["young"], young["object_storage"]) == ([], 3, True)
    later = time.time() + HOURS_2
    dry = collect_garbage(store, blobs, objects, dry_run=True, now=later)
    expected = [{"sha256": sha, "size": len(_object(endpoint, bucket, f"fota/{sha}"))} for sha in left]
    assert (dry["objects"], dry["files"]) == (expected, [])
    assert all(_object(endpoint, bucket, f"fota/{sha}") is not None for sha in left)

    swept = collect_garbage(store, blobs, objects, now=later)
    assert (swept["objects"], swept["files"], swept["failures"]) == (expected, [], [])
    listed = {o["Key"] for o in _client(endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert listed == set(foreign) | {f"fota/{sha}" for sha in (r1.sha256, r3.sha256, around.sha256)}

    # The other host's collection, on its own directory: its copies of the deleted blobs go.
    other = collect_garbage(store, cache, now=later)
    assert sorted(f["sha256"] for f in other["files"]) == sorted([r2.sha256, to_r2.sha256])
    assert {p.name for p in cache.iterdir()} == {r1.sha256}


def test_a_writer_makes_an_object_already_there_young(s3, store, tmp_path):
    from fota.server.objectstore import S3Payloads
    endpoint, bucket = s3
    objects = S3Payloads(bucket, blobs_dir=tmp_path / "blobs", endpoint_url=endpoint, region="us-east-1")
    data = os.urandom(4000)
    sha = hashlib.sha256(data).hexdigest()
    objects.put_blob(sha, data, fresh=True)  # not there: stored

    def modified() -> float:
        return _client(endpoint).head_object(Bucket=bucket, Key=sha)["LastModified"].timestamp()
    first = modified()
    # An hour and a half second later this object, named by nothing, is garbage...
    at = first + 3600.5
    assert [o["sha256"] for o in collect_garbage(store, tmp_path / "none", objects, dry_run=True, now=at)
            ["objects"]] == [sha]
    # ...unless a release being added with the same bytes wrote it meanwhile (S3 times: whole seconds).
    while time.time() < first + 1.2:
        time.sleep(0.2)
    objects.put_blob(sha, data, fresh=True)
    assert modified() >= first + 1 and _object(endpoint, bucket, sha) == data
    out = collect_garbage(store, tmp_path / "none", objects, now=at)
    assert (out["objects"], out["young"]) == ([], 1)


def test_release_gc_sweeps_the_bucket_and_another_hosts_cache_from_its_home(s3, tmp_path, db_url, monkeypatch):
    """`fota release gc` on the home sweeps its blobs directory and the bucket; on another host
    (its own home: the same database, its own blobs/) it sweeps that host's cached copies."""
    import boto3
    from botocore.config import Config
    from typer.testing import CliRunner
    from fota.cli import app as cli
    from fota.server.home import Home
    from fota.server.objectstore import S3Payloads
    endpoint, bucket = s3
    monkeypatch.setenv("COLUMNS", "250")
    for name in ("FOTA_URL", "FOTA_TOKEN", "FOTA_HOME", "FOTA_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    runner = CliRunner()
    home, host = Home(tmp_path / "home"), Home(tmp_path / "worker-host")
    cfg = {**home.config(), "database_url": db_url, "s3_bucket": bucket, "s3_endpoint_url": endpoint,
           "s3_prefix": "cli/"}
    home.save_config(cfg)
    host.save_config(cfg)
    store = Store(db_url)
    try:
        objects = home.object_store()
        kept, gone = (create_release(store, home.blobs, KEY, os.urandom(size), version, ["unix"], kind="image",
                                     remote=objects) for version, size in (("1.0.0", 3000), ("1.1.0", 2000)))
        for rel in (kept, gone):  # the worker host served both: cached from the bucket
            assert blob_file(host.blobs, rel.sha256, host.object_store()) is not None
        closed = boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=2,
                                            s3={"addressing_style": "path"}))
        out = delete_release(store, home.blobs, "1.1.0", S3Payloads(bucket, blobs_dir=home.blobs, prefix="cli/",
                                                                    client=closed), actor=ACTOR)
        assert [f.split(":")[0] for f in out["failures"]] == [f"object cli/{gone.sha256}"]  # left behind
    finally:
        store.dispose()

    def gc(at: Home, *args: str) -> list[str]:
        r = runner.invoke(cli, ["release", "gc", "--grace", "0", *args, "--home", str(at.path)])
        assert r.exit_code == 0, r.output
        return r.output.splitlines()

    assert gc(home, "--dry-run") == [
        f"would remove blob {gone.sha256} (2000 bytes) from object storage",
        "garbage collection: would remove 0 blob(s) (0 bytes) from the blobs directory, 1 blob(s) (2000 bytes) "
        "from object storage; nothing changed"]
    assert _object(endpoint, bucket, f"cli/{gone.sha256}") is not None
    assert gc(home) == ["garbage collection: removed 0 blob(s) (0 bytes) from the blobs directory, 1 blob(s) "
                        "(2000 bytes) from object storage"]
    assert _object(endpoint, bucket, f"cli/{gone.sha256}") is None
    assert _object(endpoint, bucket, f"cli/{kept.sha256}") is not None
    assert {p.name for p in host.blobs.iterdir()} == {kept.sha256, gone.sha256}  # not the home's directory
    assert gc(host) == ["garbage collection: removed 1 blob(s) (2000 bytes) from the blobs directory, 0 blob(s) "
                        "(0 bytes) from object storage"]
    assert {p.name for p in host.blobs.iterdir()} == {kept.sha256}

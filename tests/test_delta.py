"""Delta updates (docs/delta.md): the patch format on real firmware, the streaming decoder under
CPython and the real MicroPython, and delta deployments through Mosquitto to MicroPython devices."""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path

import pytest

from fota.device import protocol as P
from fota.device.delta import HEADER_SIZE, DeltaError, Patcher, parse_header
from fota.examples import hello_files
from fota.server import delta as server_delta
from fota.server.delta import encode
from fota.server.deployments import create_deployment
from fota.server.releases import create_release
from fota.testkit.corpus import corpus_images
from fota.testkit.deltarun import apply_with_micropython
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from conftest import INTERPRETERS, both_interpreters, missing_corpus, sampled

FORMATS = (1, 2)


def corpus_pairs(corpus="esp8266"):
    """Consecutive images of a firmware corpus (fota.testkit.corpus: $FOTA_CORPUS, or
    shared/corpus beside the checkout): esp8266 (Xtensa) or thumb (Cortex-M)."""
    files = corpus_images(corpus, start=Path(__file__))
    return list(zip(files, files[1:]))


def apply(old: bytes, patch: bytes, piece: int = 2048, expect: dict | None = None, max_wbits: int = 15) -> bytes:
    out = bytearray()
    p = Patcher(lambda at, n: old[at:at + n], out.extend, len(patch), expect or parse_header(patch), max_wbits)
    for at in range(0, len(patch), piece):
        p.feed(patch[at:at + piece])
    p.finish()
    return bytes(out)


def expect_of(old: bytes, new: bytes) -> dict:
    return {"base_sha256": hashlib.sha256(old).hexdigest(), "base_size": len(old),
            "sha256": hashlib.sha256(new).hexdigest(), "size": len(new)}


# ---- the format on the real firmware corpus -----------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("pair", sampled(corpus_pairs()) + sampled(corpus_pairs("thumb")) or [None],
                         ids=lambda p: f"{p[0].stem}->{p[1].stem}" if p else "no-corpus")
def test_corpus_round_trip_cpython_and_micropython(pair, fmt, tmp_path):
    if pair is None:
        missing_corpus("esp8266/*.bin and thumb/*.bin, two images or more")
    old, new = pair[0].read_bytes(), pair[1].read_bytes()
    patch = encode(old, new, 12, fmt=fmt)
    assert len(patch) < len(new) // 3  # consecutive releases share most of their bytes
    assert parse_header(patch) == {"format": fmt, "wbits": 12, **expect_of(old, new)}
    assert apply(old, patch, expect=expect_of(old, new), max_wbits=12) == new
    (tmp_path / "patch").write_bytes(patch)
    for name in INTERPRETERS:  # the 64-bit unix port, and the 32-bit build with the decoder frozen in
        (tmp_path / "out").unlink(missing_ok=True)
        proc = apply_with_micropython(pair[0], tmp_path / "patch", tmp_path / "out", heap="64K", chunk=2048,
                                      max_wbits=12, interpreter=name)
        assert proc.returncode == 0 and "OK" in proc.stdout, name + ": " + proc.stdout + proc.stderr
        assert (tmp_path / "out").read_bytes() == new, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_streams_in_any_piece_size(fmt):
    rnd = os.urandom(40_000)
    old = rnd + bytes(range(256)) * 40
    new = rnd[:15_000] + b"inserted" * 100 + rnd[15_000:39_000] + bytes(range(256)) * 41
    patch = encode(old, new, 9, fmt=fmt)
    for piece in (1, 7, 100, 4096, len(patch)):
        assert apply(old, patch, piece) == new


@pytest.mark.parametrize("fmt", FORMATS)
def test_identical_and_unrelated_images(fmt):
    old = os.urandom(20_000)
    assert len(encode(old, old, fmt=fmt)) < 200
    assert apply(old, encode(old, old, fmt=fmt)) == old
    new = os.urandom(5_000)
    assert apply(old, encode(old, new, fmt=fmt)) == new


def _synthetic_firmware(n: int, seed: int) -> tuple[bytes, bytes]:
    """A base of "instructions" with 32-bit addresses and a new version with code inserted,
    addresses moved, a block repeated from earlier in the new image and one from far in the
    base: every kind of format-2 item (copies, diffs, literals, base and window matches)."""
    import random
    rnd = random.Random(seed)
    words = [rnd.choice((0x4000_0000, 0x3FFE_8000)) + rnd.randrange(0, 1 << 16, 4) for _ in range(n // 8)]
    old = b"".join(w.to_bytes(4, "little") + bytes([rnd.randrange(256), 0x20, 0x41, 0x12]) for w in words)
    moved = b"".join((w + 64).to_bytes(4, "little") + old[8 * i + 4:8 * i + 8] for i, w in enumerate(words))
    fresh = bytes(rnd.randrange(256) for _ in range(700))
    new = moved[:n // 3] + fresh + moved[n // 3:2 * n // 3] + fresh[100:400] + old[100:900] + moved[2 * n // 3:]
    return old, new


@pytest.mark.parametrize("seed", [1, 2])
def test_format_2_round_trip_on_synthetic_firmware_under_both_micropythons(seed, tmp_path):
    old, new = _synthetic_firmware(60_000, seed)
    patch = encode(old, new, 9, fmt=2)
    assert len(patch) < len(encode(old, new, 9, fmt=1))
    assert apply(old, patch, 333) == new
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "patch").write_bytes(patch)
    for name in INTERPRETERS:
        (tmp_path / "out").unlink(missing_ok=True)
        proc = apply_with_micropython(tmp_path / "old", tmp_path / "patch", tmp_path / "out", heap="64K",
                                      chunk=512, max_wbits=9, interpreter=name)
        assert proc.returncode == 0 and "OK" in proc.stdout, name + ": " + proc.stdout + proc.stderr
        assert (tmp_path / "out").read_bytes() == new, name


# ---- bad patches: a precise error, never a wrong image --------------------------------------------

def _patch(fmt=1):
    old = os.urandom(30_000)
    new = old[:10_000] + os.urandom(3_000) + old[10_000:]
    return old, new, encode(old, new, 10, fmt=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt_compressed_stream_never_yields_a_wrong_image(fmt):
    # Any flipped byte either is caught (DeltaError) or did not change the output (e.g. the
    # padding bits after the last block): the decoder never hands over a wrong image.
    old, new, patch = _patch(fmt)
    refused = 0
    positions = range(HEADER_SIZE, len(patch), max(1, (len(patch) - HEADER_SIZE) // 25))
    for at in positions:
        bad = bytearray(patch)
        bad[at] ^= 0x55
        try:
            out = apply(old, bytes(bad), expect=expect_of(old, new))
        except DeltaError:
            refused += 1
        else:
            assert out == new
    assert refused >= len(positions) - 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_patch_for_another_base_or_result_is_refused(fmt):
    old, new, patch = _patch(fmt)
    other = expect_of(old[:-1], new)
    with pytest.raises(DeltaError, match="base"):
        apply(old, patch, expect=other)
    with pytest.raises(DeltaError, match="produces"):
        apply(old, patch, expect=expect_of(old, new + b"x"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_trailing_or_oversized_window_patch_is_refused(fmt):
    old, new, patch = _patch(fmt)
    with pytest.raises(DeltaError):
        apply(old, patch[:-10])
    with pytest.raises(DeltaError):
        apply(old, patch + b"\0" * 10)
    with pytest.raises(DeltaError, match="window"):
        apply(old, patch, max_wbits=9)
    with pytest.raises(DeltaError, match="magic"):
        apply(old, b"XXXX" + patch[4:])
    with pytest.raises(DeltaError, match="format 3"):
        apply(old, patch[:4] + b"\x03" + patch[5:])
    with pytest.raises(DeltaError, match="the command says"):  # the signed command names the format
        apply(old, patch, expect=dict(expect_of(old, new), format=3 - fmt))
    # ... and the window: a format-2 decoder takes its window when the job begins, from the command
    with pytest.raises(DeltaError, match="window 2\\*\\*%d, the command says 2\\*\\*9" % patch[5]):
        apply(old, patch, expect=dict(expect_of(old, new), format=fmt, wbits=9))


def _rc_body(fields, extra_items=()):
    """A format-2 body of one record with these (copy, diff, extra, seek) and extra items."""
    from fota.device import delta_rc as M
    from fota.server.delta_rc import RangeEncoder, _number, _table
    rc, nums, lits = RangeEncoder(), [_table(M._NUMBER_SIZE) for _ in range(M._NUMBERS)], _table(M._LITS_SIZE)
    for i, v in enumerate(fields):
        _number(rc, nums[i], v)
    for kind, length, where in extra_items:  # ("base" | "window", length, source / distance)
        rc.bit(lits, M._LIT_MATCH, 1)
        rc.bit(lits, M._LIT_REP, 0)
        rc.bit(lits, M._LIT_WIN, kind == "window")
        _number(rc, nums[M._MATCH_LEN], length - M._MIN_MATCH)
        if kind == "window":
            _number(rc, nums[M._WIN_DIST], where - 1)
        else:
            _number(rc, nums[M._MATCH_DIST], where << 1)
    return rc.finish()


@pytest.mark.parametrize("fields,items,error", [
    ((10_000, 0, 0, 0), (), "outside the base"),                 # copy 10000 bytes of a 1000-byte base
    ((0, 0, 0, 0), (), "empty record"),
    ((0, 0, 30_000, 0), (), "past the new image"),
    ((0, 0, 100, 0), [("base", 50, 990)], "outside the base"),   # a match past the base's end
    ((0, 0, 100, 0), [("window", 50, 10)], "outside the window"),  # nothing written yet
    ((0, 0, 100, 0), [("base", 150, 0)], "longer than the extra"),
])
def test_format_2_record_or_match_out_of_bounds_is_refused(fields, items, error):
    old, new = os.urandom(1000), os.urandom(20_000)
    patch = server_delta.header(old, new, 9, 2) + _rc_body(fields, items)
    with pytest.raises(DeltaError, match=error):
        apply(old, patch)


def test_record_reading_outside_the_base_is_refused():
    old = os.urandom(1000)
    new = os.urandom(20_000)
    z = zlib.compressobj(9, zlib.DEFLATED, -9)
    body = z.compress(bytes([0x90, 0x4E, 0, 0, 0])) + z.flush()  # copy 10000 bytes of a 1000-byte base
    patch = server_delta.header(old, new, 9) + body
    with pytest.raises(DeltaError, match="outside the base"):
        apply(old, patch)


# ---- the control center's cache ----------------------------------------------------------------------

def test_patch_computed_once_per_base_target_and_window_and_only_if_smaller(db_url, tmp_path, monkeypatch):
    from fota.server.releases import read_blob
    from fota.server.store import Delta, Store
    from fota.tools.signing import generate_private_key
    store = Store(db_url)
    try:
        key, blobs = generate_private_key(), tmp_path / "blobs"
        old = os.urandom(50_000)
        new = old[:20_000] + b"change" + old[20_000:]
        v1 = create_release(store, blobs, key, old, "1.0.0", ["board"], kind="image")
        v2 = create_release(store, blobs, key, new, "1.1.0", ["board"], kind="image")
        calls = []
        real = server_delta.encode
        monkeypatch.setattr(server_delta, "encode", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
        first = server_delta.get_delta(store, blobs, v1, v2, 12, read_blob)
        again = server_delta.get_delta(store, blobs, v1, v2, 12, read_blob)
        other_window = server_delta.get_delta(store, blobs, v1, v2, 10, read_blob)
        assert calls == [12, 10]
        assert first.data == again.data and apply(old, first.data) == new and first.size < 1000
        assert Path(blobs / first.sha256).read_bytes() == first.data
        assert other_window.id != first.id and apply(old, other_window.data) == new
        # Unrelated images: the patch is not smaller than the image, so no delta (cached as such).
        v3 = create_release(store, blobs, key, os.urandom(5_000), "2.0.0", ["board"], kind="image")
        assert server_delta.get_delta(store, blobs, v2, v3, 12, read_blob) is None
        assert server_delta.get_delta(store, blobs, v2, v3, 12, read_blob) is None
        assert calls == [12, 10, 12]
        with store.session() as s:
            assert s.query(Delta).count() == 3
        # Format 2 for a device that decodes it: a row of its own, named in the descriptor.
        rc = server_delta.get_delta(store, blobs, v1, v2, 12, read_blob, 2)
        assert server_delta.get_delta(store, blobs, v1, v2, 12, read_blob, 2).id == rc.id
        assert calls == [12, 10, 12, 12] and rc.id not in (first.id, other_window.id)
        assert parse_header(rc.data)["format"] == 2 and apply(old, rc.data) == new
        assert rc.descriptor()["format"] == 2 and rc.descriptor()["wbits"] == 12
        assert "format" not in first.descriptor()  # what agents before format 2 expect
    finally:
        store.dispose()


def test_the_smallest_format_the_device_decodes_and_no_format_2_where_format_1_loses(db_url, tmp_path, monkeypatch):
    from fota.server.releases import read_blob
    from fota.server.store import Delta, Store
    from fota.tools.signing import generate_private_key
    store = Store(db_url)
    try:
        key, blobs = generate_private_key(), tmp_path / "blobs"
        old = os.urandom(50_000)
        new = old[:20_000] + bytes(range(256)) * 8 + old[20_000:]
        v1 = create_release(store, blobs, key, old, "1.0.0", ["board"], kind="image")
        v2 = create_release(store, blobs, key, new, "1.1.0", ["board"], kind="image")
        calls = []
        real = server_delta.encode
        monkeypatch.setattr(server_delta, "encode", lambda *a, **k: calls.append(k.get("fmt")) or real(*a, **k))
        both = server_delta.best_delta(store, blobs, v1, v2, 12, read_blob, {1, 2})
        f1 = server_delta.get_delta(store, blobs, v1, v2, 12, read_blob, 1)
        f2 = server_delta.get_delta(store, blobs, v1, v2, 12, read_blob, 2)
        assert calls == [1, 2]  # each made once, then cached
        assert both.id == min((f1, f2), key=lambda p: p.size).id and apply(old, both.data) == new
        assert server_delta.best_delta(store, blobs, v1, v2, 12, read_blob, {1}).id == f1.id
        assert server_delta.best_delta(store, blobs, v1, v2, 12, read_blob, {2}).id == f2.id
        assert server_delta.best_delta(store, blobs, v1, v2, 12, read_blob, set()) is None
        # An image unlike its base: format 1 is not smaller than the image, so format 2 (seconds of
        # Python per 100 KiB it cannot match) is never computed, and the image goes whole.
        v3 = create_release(store, blobs, key, os.urandom(50_000), "2.0.0", ["board"], kind="image")
        assert server_delta.best_delta(store, blobs, v2, v3, 12, read_blob, {1, 2}) is None
        assert server_delta.best_delta(store, blobs, v2, v3, 12, read_blob, {2}) is None
        assert calls == [1, 2, 1]
        with store.session() as s:
            assert s.query(Delta).filter(Delta.target_sha256 == v3.sha256).count() == 1
    finally:
        store.dispose()


# ---- end to end through Mosquitto to MicroPython devices ------------------------------------------

def _deploy(fleet, rel, dev):
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    return fleet.wait_job(dep.jobs[0].id, timeout=120)


def _firmware(n: int) -> tuple[bytes, bytes]:
    """Two consecutive real firmware images cut to n bytes (or synthetic ones without the corpus)."""
    pairs = corpus_pairs()
    if pairs:
        return pairs[-1][0].read_bytes()[:n], pairs[-1][1].read_bytes()[:n]
    old = os.urandom(n)
    return old, old[:n // 2] + b"new code" * 50 + old[n // 2 + 400:]


@both_interpreters
def test_image_delta_through_mosquitto_and_corrupt_patch_rejected(fleet):
    dev = "delta-sim"
    slot = 256 * 1024
    fleet.add_device(dev, hardware="sim-board", backend="sim", capacity=slot)
    fleet.wait_online(dev)
    v1, v2 = _firmware(200_000)
    rel1 = create_release(fleet.store, fleet.blobs, fleet.key, v1, "20.0.0", ["sim-board"], kind="image")
    rel2 = create_release(fleet.store, fleet.blobs, fleet.key, v2, "20.1.0", ["sim-board"], kind="image")
    j = _deploy(fleet, rel1, dev)   # a fresh device runs no known image: the full image
    assert (j.state, j.delta_id) == ("confirmed", None), (j.state, j.code, j.reason)
    fleet.wait_online(dev, version="20.0.0")
    wait_until(lambda: fleet.device_row(dev).inventory.get("image") == rel1.sha256, what="inventory image")

    # A corrupted patch (its description signed for the corrupt bytes, so only the decoder and
    # the manifest's hash can catch it): E_DELTA, nothing bootable, the device keeps 20.0.0.
    center = fleet.center.center
    real = center.sender.delta_for

    def corrupt(release, inventory):
        info = real(release, inventory)
        bad = bytearray(info.data)
        bad[len(bad) // 2] ^= 0xFF
        info.data = bytes(bad)
        info.sha256 = hashlib.sha256(info.data).hexdigest()
        return info
    center.sender.delta_for = corrupt
    try:
        j = _deploy(fleet, rel2, dev)
    finally:
        del center.sender.delta_for  # the method again
    assert (j.state, j.code) == ("failed", P.E_DELTA), (j.state, j.code, j.reason)
    assert j.delta_id is not None
    rec = fleet.boot_record(dev)
    assert rec["active"] == "b" and rec["trial"] is None and fleet.running_version(dev) == "20.0.0"

    # The real patch: a fraction of the image on the wire, the slot holds exactly v2.
    j = _deploy(fleet, rel2, dev)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    assert j.delta_id is not None and j.bytes_served < len(v2) // 3, j.bytes_served
    # The agent declares formats 1 and 2: it was sent the range-coded format.
    assert fleet.device_row(dev).inventory["delta_formats"] == [1, 2]
    assert parse_header(server_delta.load_delta(fleet.store, j.delta_id))["format"] == 2
    fleet.wait_online(dev, version="20.1.0")
    flash = (fleet.root(dev) / "flash.bin").read_bytes()
    assert flash[:len(v2)] == v2
    assert fleet.boot_record(dev)["images"]["a"] == {"sha256": rel2.sha256, "size": len(v2)}


def test_device_that_decodes_format_1_only_gets_format_1(fleet):
    # An agent from before format 2 declares no delta_formats; this one declares [1]: the center
    # sends it the deflate format, without `format` in the command, and the update completes.
    dev = "delta-f1"
    fleet.add_device(dev, hardware="sim-board", backend="sim", capacity=256 * 1024, delta_formats=[1])
    fleet.wait_online(dev)
    v1, v2 = _firmware(100_000)
    rel1 = create_release(fleet.store, fleet.blobs, fleet.key, v1, "30.0.0", ["sim-board"], kind="image")
    rel2 = create_release(fleet.store, fleet.blobs, fleet.key, v2, "30.1.0", ["sim-board"], kind="image")
    assert _deploy(fleet, rel1, dev).state == "confirmed"
    fleet.wait_online(dev, version="30.0.0")
    wait_until(lambda: fleet.device_row(dev).inventory.get("image") == rel1.sha256, what="inventory image")
    assert fleet.device_row(dev).inventory["delta_formats"] == [1]
    j = _deploy(fleet, rel2, dev)
    assert j.state == "confirmed" and j.delta_id is not None, (j.state, j.code, j.reason)
    assert parse_header(server_delta.load_delta(fleet.store, j.delta_id))["format"] == 1
    assert (fleet.root(dev) / "flash.bin").read_bytes()[:len(v2)] == v2


def test_bundle_delta_sends_only_what_changed_and_unknown_base_gets_full_image(fleet):
    dev, stranger = "delta-files", "delta-stranger"
    fleet.add_device(dev)
    fleet.add_device(stranger)
    fleet.wait_online(dev, stranger)
    files = hello_files("30.0.0")
    for i in range(8):
        files[f"lib/mod{i}.py"] = os.urandom(6000).hex().encode()[:6000]  # 48 KB that stay the same
    rel1 = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), "30.0.0", ["unix"])
    files2 = dict(hello_files("30.1.0"), **{k: v for k, v in files.items() if k.startswith("lib/")})
    files2["lib/mod3.py"] = files["lib/mod3.py"][:3000] + b"# changed\n" + files["lib/mod3.py"][3000:]
    rel2 = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files2), "30.1.0", ["unix"])
    assert _deploy(fleet, rel1, dev).state == "confirmed"
    fleet.wait_online(dev, version="30.0.0")
    wait_until(lambda: fleet.device_row(dev).inventory.get("image") == rel1.sha256, what="inventory image")

    j = _deploy(fleet, rel2, dev)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    assert j.delta_id is not None
    assert j.bytes_served < 1500, j.bytes_served  # the changed lines, not the 49 KB bundle
    fleet.wait_online(dev, version="30.1.0")
    app = fleet.root(dev) / "slots" / fleet.boot_record(dev)["active"] / "app"
    assert (app / "lib" / "mod3.py").read_bytes() == files2["lib/mod3.py"]
    assert (app / "app.py").read_bytes() == files2["app.py"]

    # A device running an image no release has (the factory app) gets the full bundle.
    j = _deploy(fleet, rel2, stranger)
    assert (j.state, j.delta_id) == ("confirmed", None), (j.state, j.code, j.reason)
    assert j.bytes_served >= rel2.size


def test_patch_for_another_base_is_refused_before_writing(fleet):
    # The inventory claims a base the device does not run (e.g. reflashed by hand): the device
    # refuses the patch with E_BASE_MISMATCH and keeps its firmware and its inactive slot.
    dev = "delta-liar"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    rel1 = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(hello_files("40.0.0")), "40.0.0", ["unix"])
    rel2 = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(hello_files("40.1.0")), "40.1.0", ["unix"])
    center = fleet.center.center
    real = center.sender.delta_for
    center.sender.delta_for = lambda release, inventory: real(release, dict(inventory, image=rel1.sha256))
    try:
        j = _deploy(fleet, rel2, dev)
    finally:
        del center.sender.delta_for  # the method again
    assert (j.state, j.code) == ("failed", P.E_BASE_MISMATCH), (j.state, j.code, j.reason)
    assert j.delta_id is not None
    assert fleet.running_version(dev) == "1.0.0"
    assert not (fleet.root(dev) / "slots" / "b" / "image.bin").exists()


# ---- the sans-IO core: what a delta job does and refuses ------------------------------------------

from test_core import SIGNING_KEY, Harness, cmd, make_update  # noqa: E402
from fota.device import core as C  # noqa: E402


def _delta_job(old: bytes, new: bytes, job=1, fmt=1, **changes):
    patch = encode(old, new, 10, fmt=fmt)
    body = make_update(SIGNING_KEY, new, job=job, chunk=64)
    body["delta"] = dict({"base_sha256": hashlib.sha256(old).hexdigest(), "base_size": len(old),
                          "size": len(patch), "sha256": hashlib.sha256(patch).hexdigest(), "wbits": 10},
                         **changes)
    return patch, body


def _harness(old: bytes, wbits=12):
    h = Harness(SIGNING_KEY)
    h.core.image = {"sha256": hashlib.sha256(old).hexdigest(), "size": len(old)}
    h.core.delta_wbits = wbits
    return h


def _images():
    old = bytes(range(256)) * 40
    return old, old[:3000] + b"patched!" + old[3000:]


@pytest.mark.parametrize("fmt", FORMATS)
def test_core_delta_job_transfers_the_patch_then_installs(fmt):
    old, new = _images()
    patch, body = _delta_job(old, new, fmt=fmt, **({"format": 2} if fmt == 2 else {}))
    h = _harness(old)
    assert json.loads(h.core.inventory()[2])["delta_formats"] == [1, 2]
    actions = h.core.command(cmd(body))
    begin = [a for a in actions if a[0] == C.A_BEGIN]
    assert begin == [(C.A_BEGIN, len(new), {"base_sha256": hashlib.sha256(old).hexdigest(), "base_size": len(old),
                                            "patch_size": len(patch), "wbits": 10, "format": fmt,
                                            "sha256": hashlib.sha256(new).hexdigest(), "size": len(new)})]
    h.run(actions)
    h.serve(patch, 64)
    assert bytes(h.slot) == patch  # the runner feeds these to the decoder
    statuses = h.statuses()
    assert [s["state"] for s in statuses][-3:] == ["verifying", "installing", "rebooting"]
    assert statuses[-1]["total"] == len(patch)
    assert h.trial == {"job": 1, "version": "1.1.0"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_core_corrupt_patch_fails_with_e_delta(fmt):
    old, new = _images()
    patch, body = _delta_job(old, new, fmt=fmt, **({"format": 2} if fmt == 2 else {}))
    h = _harness(old)
    h.run(h.core.command(cmd(body)))
    h.serve(patch, 64, corrupt=1)
    last = h.statuses()[-1]
    assert (last["state"], last["code"]) == ("failed", P.E_DELTA) and h.trial is None


@pytest.mark.parametrize("image,changes,code", [
    ("other", {}, P.E_BASE_MISMATCH),             # the device runs another image
    (None, {}, P.E_BASE_MISMATCH),                # the device does not know what it runs
    ("same", {"base_size": 1}, P.E_BASE_MISMATCH),
    ("same", {"wbits": 13}, P.E_DELTA),           # a window larger than the device's 2**12
    ("same", {"format": 9}, P.E_DELTA),           # a format the device does not decode
])
def test_core_refuses_a_patch_it_cannot_apply_before_writing(image, changes, code):
    old, new = _images()
    _, body = _delta_job(old, new, **changes)
    h = _harness(old)
    if image == "other":
        h.core.image = {"sha256": "ab" * 32, "size": len(old)}
    elif image is None:
        h.core.image = None
    h.run(h.core.command(cmd(body)))
    last = h.statuses()[-1]
    assert (last["state"], last["code"]) == ("failed", code), last
    assert h.began == 0 and not h.slot


def test_core_rejects_a_malformed_delta_field():
    old, new = _images()
    _, body = _delta_job(old, new, sha256="xyz")
    h = _harness(old)
    h.run(h.core.command(cmd(body)))
    last = h.statuses()[-1]
    assert (last["state"], last["code"]) == ("rejected", P.E_BAD_COMMAND)


def test_core_restarts_an_interrupted_patch_from_the_start():
    old, new = _images()
    patch, body = _delta_job(old, new)
    h = _harness(old)
    h.run(h.core.command(cmd(body)))
    journal = {"cmd": json.loads(json.loads(cmd(body))["body"]) | {"chunk": 64, "window": 4}, "pos": 1}
    core = Harness(SIGNING_KEY).core
    core.image, core.delta_wbits = h.core.image, 12
    core.last_job = 1
    actions = core.booted({"trial": None}, journal, hashlib.sha256(patch[:64]))
    assert [a[0] for a in actions if a[0] in (C.A_BEGIN, C.A_JOURNAL)] == [C.A_BEGIN, C.A_JOURNAL]
    assert [a[1] for a in actions if a[0] == C.A_JOURNAL] == [{"cmd": journal["cmd"], "pos": 0}]
    assert core.state == P.DOWNLOADING and core.next == 0
    # Also when the cut came before the first checkpoint (journal at 0): the decoder is set up again.
    core = Harness(SIGNING_KEY).core
    core.image, core.delta_wbits, core.last_job = h.core.image, 12, 1
    actions = core.booted({"trial": None}, dict(journal, pos=0), hashlib.sha256())
    assert [a[0] for a in actions if a[0] == C.A_BEGIN] == [C.A_BEGIN]


def test_power_cut_during_a_delta_download_restarts_the_patch(tmp_path, broker, sqlite_url):
    # Small chunks make the patch transfer long enough to cut it; after the restart the device
    # asks for the patch from chunk 0 (the decoder's state is not checkpointed) and completes.
    import time
    fleet = Fleet(tmp_path, broker, sqlite_url, chunk=512, window=4)
    try:
        dev = "delta-cut"
        fleet.add_device(dev, hardware="sim-board", backend="sim", capacity=320 * 1024)
        fleet.wait_online(dev)
        pairs = corpus_pairs()
        if pairs:
            v1, v2 = pairs[1][0].read_bytes()[:300_000], pairs[1][1].read_bytes()[:300_000]
        else:
            v1 = os.urandom(300_000)
            v2 = bytes(b ^ 1 if i % 7 == 0 else b for i, b in enumerate(v1))
        rel1 = create_release(fleet.store, fleet.blobs, fleet.key, v1, "50.0.0", ["sim-board"], kind="image")
        rel2 = create_release(fleet.store, fleet.blobs, fleet.key, v2, "50.1.0", ["sim-board"], kind="image")
        assert _deploy(fleet, rel1, dev).state == "confirmed"
        fleet.wait_online(dev, version="50.0.0")
        wait_until(lambda: fleet.device_row(dev).inventory.get("image") == rel1.sha256, what="inventory image")
        dep = create_deployment(fleet.store, rel2, device_ids=[dev])
        job = dep.jobs[0].id

        def progressed():
            ds = [s for s in fleet.spy.of(dev, job) if s["state"] == "downloading"]
            return ds and ds[-1]["bytes"] >= ds[-1]["total"] * 0.3 and ds[-1]
        at_kill = wait_until(progressed, timeout=60, interval=0.01, what="30% of the patch downloaded")
        assert at_kill["total"] < len(v2) // 2  # a patch, not the image
        assert fleet.devices[dev].kill()
        killed_at = time.monotonic()
        j = fleet.wait_job(job, timeout=120)
        assert j.state == "confirmed", (j.state, j.code, j.reason)
        after = [r for t, d, r in fleet.spy.requests if d == dev and t > killed_at + 0.05 and r["job"] == job]
        assert after and after[0]["first"] == 0
        fleet.wait_online(dev, version="50.1.0")
        assert (fleet.root(dev) / "flash.bin").read_bytes()[:len(v2)] == v2
    finally:
        fleet.close()

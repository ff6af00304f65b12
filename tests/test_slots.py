"""Slot backends: the simulated NOR flash (SimFlash/SimBackend) and the files backend with its
bundle extraction (docs/protocol.md §7), on CPython and under the real MicroPython."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_micropython
from fota.device import bundle as device_bundle
from fota.device.bundle import BundleError, extract
from fota.device.slots import open_backend
from fota.device.slots.files import FilesBackend
from fota.device.slots.sim import FlashError, SimBackend, SimFlash
from fota.tools.bundle import pack_files

SECTOR = 4096
SLOT = 16 * SECTOR          # 64 KiB per slot
PIECES = (1, 3, 1000, 4097, 2, 7, 4096, 5)


def image(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-repeating-looking bytes; the MicroPython scripts build the same."""
    return bytes((i * 131 + seed + (i >> 8)) & 0xFF for i in range(n))


def pieces(data: bytes, sizes=PIECES):
    """Split data into consecutive (offset, piece) with sizes cycling through `sizes`."""
    out, at, k = [], 0, 0
    while at < len(data):
        n = sizes[k % len(sizes)]
        out.append((at, data[at:at + n]))
        at += n
        k += 1
    return out


class EraseLog:
    """Wraps flash.erase to record the erased sector indexes."""

    def __init__(self, flash: SimFlash):
        self.sectors: list[int] = []
        real = flash.erase

        def erase(index):
            self.sectors.append(index)
            real(index)
        flash.erase = erase


# ---- SimFlash: the NOR rules ---------------------------------------------------------------------

@pytest.mark.parametrize("offset,length", [(1, 4), (2, 8), (3, 4), (0, 1), (0, 3), (4, 6), (6, 2)])
def test_flash_write_must_be_aligned(offset, length):
    f = SimFlash(2 * SECTOR)
    with pytest.raises(FlashError):
        f.write(offset, b"\x00" * length)
    assert f.read(0, 16) == b"\xff" * 16  # nothing stored
    assert f.ops == 0


def test_flash_aligned_writes_are_stored():
    f = SimFlash(2 * SECTOR, align=8)
    f.write(8, b"12345678")
    f.write(SECTOR, b"abcdefgh" * 2)
    assert f.read(0, 24) == b"\xff" * 8 + b"12345678" + b"\xff" * 8
    assert f.read(SECTOR, 16) == b"abcdefgh" * 2
    with pytest.raises(FlashError):
        f.write(4, b"1234")  # 4-aligned is not 8-aligned


def test_flash_write_outside_refused():
    f = SimFlash(SECTOR)
    with pytest.raises(FlashError):
        f.write(SECTOR - 4, b"\x00" * 8)
    with pytest.raises(FlashError):
        f.write(SECTOR, b"\x00" * 4)
    with pytest.raises(FlashError):
        f.erase(1)
    with pytest.raises(FlashError):
        f.erase(-1)


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_flash_cannot_program_non_erased_bytes(erased):
    f = SimFlash(2 * SECTOR, erased=erased)
    f.write(16, b"\x5a\x5a\x5a\x5a")
    # Rewriting, even with the same value or bits NOR could clear, needs an erase first.
    for data in (b"\x5a\x5a\x5a\x5a", b"\x00\x00\x00\x00", bytes([erased]) * 4):
        with pytest.raises(FlashError):
            f.write(16, data)
    # An overlapping write touching one programmed byte is refused and stores nothing.
    with pytest.raises(FlashError):
        f.write(12, b"\x11" * 8)
    assert f.read(12, 8) == bytes([erased]) * 4 + b"\x5a" * 4
    # Writing the erased value over erased bytes is fine (it programs nothing).
    f.write(20, bytes([erased]) * 4)
    f.write(20, b"\x77" * 4)
    assert f.read(16, 8) == b"\x5a" * 4 + b"\x77" * 4


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_flash_erase_sets_one_whole_sector(erased):
    f = SimFlash(3 * SECTOR, erased=erased)
    assert f.read(0, 3 * SECTOR) == bytes([erased]) * 3 * SECTOR
    for s in range(3):
        f.write(s * SECTOR, bytes([0x10 + s]) * SECTOR)
    f.erase(1)
    assert f.read(0, SECTOR) == b"\x10" * SECTOR
    assert f.read(SECTOR, SECTOR) == bytes([erased]) * SECTOR
    assert f.read(2 * SECTOR, SECTOR) == b"\x12" * SECTOR
    f.write(SECTOR + 100 * 4, b"new!")  # programmable again
    assert f.read(SECTOR + 400, 4) == b"new!"


@pytest.mark.parametrize("sector", [128, 384, 4096])
@pytest.mark.parametrize("path", [False, True])
def test_flash_erase_never_touches_the_next_sector(tmp_path, sector, path):
    f = SimFlash(3 * sector, sector=sector, path=str(tmp_path / "f.bin") if path else None)
    f.write(0, b"\x01" * (3 * sector))
    f.erase(1)
    assert f.read(0, 3 * sector) == b"\x01" * sector + b"\xff" * sector + b"\x01" * sector
    f.close()


def test_flash_ops_counts_erases_and_writes():
    f = SimFlash(2 * SECTOR)
    assert f.ops == 0
    f.erase(0)
    f.write(0, b"abcd")
    f.write(4, b"efgh" * 100)
    f.erase(1)
    assert f.ops == 4
    for bad in (lambda: f.write(0, b"zzzz"), lambda: f.write(1, b"zzzz"), lambda: f.erase(9)):
        with pytest.raises(FlashError):
            bad()
    assert f.ops == 4  # refused operations do not count
    f.read(0, 100)
    assert f.ops == 4  # reads do not count


@pytest.mark.parametrize("erased", [0xFF, 0x00])
@pytest.mark.parametrize("sector", [128, 4096])
def test_flash_file_survives_reopen(tmp_path, erased, sector):
    path = str(tmp_path / "flash.bin")
    size = 3 * sector
    f = SimFlash(size, sector=sector, erased=erased, path=path)
    assert os.path.getsize(path) == size
    assert f.read(0, size) == bytes([erased]) * size
    f.write(sector - 8, b"ABCDEFGHIJKLMNOP")
    f.write(2 * sector, b"tail")
    f.erase(0)
    f.close()
    g = SimFlash(size, sector=sector, erased=erased, path=path)
    expected = bytearray([erased]) * size
    expected[sector:sector + 8] = b"IJKLMNOP"
    expected[2 * sector:2 * sector + 4] = b"tail"
    assert g.read(0, size) == bytes(expected)
    with pytest.raises(FlashError):  # the file keeps the NOR state: no rewrite without erase
        g.write(sector, b"1234")
    g.close()
    assert Path(path).read_bytes() == bytes(expected)


def test_flash_file_of_wrong_size_refused(tmp_path):
    path = tmp_path / "flash.bin"
    SimFlash(2 * SECTOR, path=str(path)).close()
    with pytest.raises(FlashError):
        SimFlash(4 * SECTOR, path=str(path))
    path.write_bytes(b"\xff" * (2 * SECTOR - 1))
    with pytest.raises(FlashError):
        SimFlash(2 * SECTOR, path=str(path))
    assert path.read_bytes() == b"\xff" * (2 * SECTOR - 1)  # refused, not "repaired"


def test_flash_size_must_be_whole_sectors():
    with pytest.raises(ValueError):
        SimFlash(SECTOR + 4)
    with pytest.raises(ValueError):
        SimBackend(SimFlash(4 * SECTOR), SECTOR + 4)


# ---- SimBackend: streaming into a slot ----------------------------------------------------------

def _fill_slot_a(flash: SimFlash, data: bytes):
    for s in range(SLOT // SECTOR):
        flash.erase(s)
    flash.write(0, data)


@pytest.mark.parametrize("erased", [0xFF, 0x00])
@pytest.mark.parametrize("size", [1, 3, 4, SECTOR, SECTOR + 1, 20001, SLOT])
def test_sim_streams_an_image_in_odd_pieces(erased, size):
    flash = SimFlash(2 * SLOT, erased=erased)
    old = image(SLOT, seed=99)
    _fill_slot_a(flash, old)
    be = SimBackend(flash, SLOT)
    log = EraseLog(flash)
    img = image(size, seed=size)
    be.begin("b", size)
    assert log.sectors == []  # erasing is lazy: nothing before the first byte arrives
    for offset, piece in pieces(img):
        be.write("b", offset, piece)
    be.finalize("b", size)
    assert be.read("b", 0, size) == img
    assert flash.read(SLOT, size) == img
    assert flash.read(0, SLOT) == old  # slot a untouched
    used = -(-size // SECTOR)
    assert log.sectors == [SLOT // SECTOR + i for i in range(used)]  # each once, in order
    # Past the image, the rest of slot b was left alone (here: still erased).
    assert flash.read(SLOT + size, SLOT - size) == bytes([erased]) * (SLOT - size)


def test_sim_streams_into_slot_a_leaving_b(tmp_path):
    flash = SimFlash(2 * SLOT)
    flash.write(SLOT, b"bbbb" * 100)
    be = SimBackend(flash, SLOT)
    img = image(9999, 5)
    be.begin("a", len(img))
    for offset, piece in pieces(img, (333, 1)):
        be.write("a", offset, piece)
    be.finalize("a", len(img))
    assert be.read("a", 0, len(img)) == img
    assert flash.read(SLOT, 400) == b"bbbb" * 100


def test_sim_erases_stale_data_of_a_previous_image():
    flash = SimFlash(2 * SLOT)
    be = SimBackend(flash, SLOT)
    first = image(3 * SECTOR + 10, 1)
    be.begin("b", len(first))
    be.write("b", 0, first)
    be.finalize("b", len(first))
    second = image(2 * SECTOR + 7, 2)
    be.begin("b", len(second))
    for offset, piece in pieces(second):
        be.write("b", offset, piece)
    be.finalize("b", len(second))
    assert be.read("b", 0, len(second)) == second


def test_sim_image_larger_than_slot_refused():
    flash = SimFlash(2 * SLOT)
    be = SimBackend(flash, SLOT)
    assert be.capacity == SLOT
    with pytest.raises(FlashError):
        be.begin("b", SLOT + 1)
    with pytest.raises(FlashError):
        be.begin("a", SLOT + 1)
    assert flash.ops == 0
    be.begin("b", SLOT)  # exactly the slot is fine


def test_sim_non_sequential_writes_refused():
    flash = SimFlash(2 * SLOT)
    be = SimBackend(flash, SLOT)
    img = image(100)
    be.begin("b", 100)
    with pytest.raises(FlashError):
        be.write("b", 4, img[4:8])  # must start at 0
    be.write("b", 0, img[:10])
    for offset in (0, 8, 9, 11, 12, 50):  # overlap, gap
        with pytest.raises(FlashError):
            be.write("b", offset, img[offset:offset + 4])
    be.write("b", 10, img[10:13])
    be.flush("b")
    for offset in (10, 12, 14):  # after a flush, still only where the stream stopped
        with pytest.raises(FlashError):
            be.write("b", offset, img[offset:offset + 4])
    be.write("b", 13, img[13:])
    be.finalize("b", 100)
    assert be.read("b", 0, 100) == img


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_sim_flush_mid_stream_then_continue(erased):
    flash = SimFlash(2 * SLOT, erased=erased)
    be = SimBackend(flash, SLOT)
    img = image(3 * SECTOR + 123, 7)
    be.begin("b", len(img))
    # Flush points: a partial alignment unit (5, 4097 - unaligned), an aligned one (8), a sector
    # end (4096) and repeatedly at the same place.
    flush_at = {5, 6, 8, 4096, 4097, 4097 + 3, 2 * SECTOR + 1}
    at = 0
    for offset, piece in pieces(img, (1, 1, 1, 1, 1, 1, 2, 4088, 1, 3, 1, 4092, 1, 10000)):
        assert offset == at
        be.write("b", offset, piece)
        at += len(piece)
        if at in flush_at:
            be.flush("b")
            be.flush("b")  # a second flush with nothing new is harmless
            # durable: every whole alignment unit written so far is on the flash; a partial
            # unit waits in RAM (programming it padded would force an erase to continue it)
            whole = at - at % 4
            assert flash.read(SLOT, whole) == img[:whole]
            assert flash.read(SLOT + whole, 4) == bytes([erased]) * 4
    be.finalize("b", len(img))
    assert be.read("b", 0, len(img)) == img


def _cut_and_resume(tmp_path, offset, extra, garbage, erased=0xFF, piece_sizes=PIECES):
    """Stream img[:offset] (flushed: the journal point), then `extra` more bytes that are not
    flushed, cut power, restart on the same flash file and resume at `offset`."""
    path = str(tmp_path / "flash.bin")
    size = 5 * SECTOR + 321
    img = image(size, 3)
    flash = SimFlash(2 * SLOT, erased=erased, path=path)
    be = SimBackend(flash, SLOT)
    be.begin("b", size)
    for at, piece in pieces(img[:offset], piece_sizes):
        be.write("b", at, piece)
    be.flush("b")
    after = (image(extra, 77) if garbage else img[offset:offset + extra])
    if extra:
        be.write("b", offset, after)
    flash.close()  # power cut: the backend object (its tail, its erase state) is lost

    flash = SimFlash(2 * SLOT, erased=erased, path=path)
    before_cut = flash.read(SLOT, size)
    whole = offset - offset % 4
    assert before_cut[:whole] == img[:whole]
    be = SimBackend(flash, SLOT)
    log = EraseLog(flash)
    start = be.resume("b", offset)
    # Only whole sectors below the offset are trusted: writing continues at its sector's start,
    # and the bytes re-sent from a chunk boundary below that are compared, not written.
    assert start == offset - offset % SECTOR
    replay = max(0, start - 1001)
    for at, piece in pieces(img[replay:], piece_sizes):
        be.write("b", replay + at, piece)
    be.finalize("b", size)
    assert be.read("b", 0, size) == img
    flash.close()
    assert SimFlash(2 * SLOT, erased=erased, path=path).read(SLOT, size) == img
    # Only the sectors from the one holding `offset` on were erased, each once.
    first = (SLOT + offset) // SECTOR
    last = (SLOT + size - 1) // SECTOR
    assert log.sectors == list(range(first, last + 1))
    return before_cut, img


@pytest.mark.parametrize("offset", [0, 4, 6, 1000, 1003, SECTOR, SECTOR + 2, 3 * SECTOR - 1, 5 * SECTOR + 300])
@pytest.mark.parametrize("garbage", [False, True])
def test_sim_resume_after_restart(tmp_path, offset, garbage):
    before_cut, img = _cut_and_resume(tmp_path, offset, extra=21, garbage=garbage)
    # The sector holding `offset` really had data past `offset` from before the cut.
    assert before_cut[offset:offset + 16] != b"\xff" * 16


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_sim_resume_long_tail_spanning_sectors(tmp_path, erased):
    # The unflushed writes reached two sectors past the journal point before the cut.
    before_cut, img = _cut_and_resume(tmp_path, SECTOR + 10, extra=2 * SECTOR + 50, garbage=True,
                                      erased=erased, piece_sizes=(4097, 1, 3))
    assert before_cut[3 * SECTOR:3 * SECTOR + 50] != bytes([erased]) * 50


def test_sim_resume_without_data_past_offset(tmp_path):
    _cut_and_resume(tmp_path, 2 * SECTOR + 1, extra=0, garbage=False)


def test_open_backend_sim_is_file_backed(tmp_path):
    be = open_backend("sim", str(tmp_path), {"capacity": 2 * SECTOR})
    assert be.capacity == 2 * SECTOR and be.KINDS == ("image",) and be.app_dir("b") is None
    img = image(5000, 1)
    be.begin("b", len(img))
    be.write("b", 0, img)
    be.finalize("b", len(img))
    be.flash.close()
    again = open_backend("sim", str(tmp_path), {"capacity": 2 * SECTOR})
    assert again.read("b", 0, len(img)) == img
    again.flash.close()
    with pytest.raises(FlashError):  # a different capacity does not silently reuse the file
        open_backend("sim", str(tmp_path), {"capacity": 4 * SECTOR})


# ---- FilesBackend + bundles ------------------------------------------------------------------------

def raw_bundle(entries, *, magic=b"FOTB", version=1, count=None) -> bytes:
    """A bundle with no checks at all: entries are (name, data) with name str or bytes."""
    out = [magic, struct.pack(">BH", version, len(entries) if count is None else count)]
    for name, data in entries:
        encoded = name.encode() if isinstance(name, str) else name
        out += [struct.pack(">H", len(encoded)), encoded, struct.pack(">I", len(data)), data]
    return b"".join(out)


FILES = {
    "app.py": b"VERSION = '2.0.0'\ndef start():\n    return 'started'\n",
    "lib/util.py": b"X = 1\n",
    "lib/deep/data.bin": bytes(range(256)) * 5,
    "empty.txt": b"",
}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def install(backend: FilesBackend, slot: str, data: bytes, sizes=(1, 3, 1000, 4097, 7)):
    backend.begin(slot, len(data))
    for offset, piece in pieces(data, sizes):
        backend.write(slot, offset, piece)
    backend.flush(slot)
    backend.finalize(slot, len(data))


def test_files_backend_installs_a_bundle(tmp_path):
    be = FilesBackend(str(tmp_path / "slots"), 1 << 20)
    assert be.KINDS == ("bundle",)
    data = pack_files(FILES)
    install(be, "b", data)
    app = Path(be.app_dir("b"))
    assert app == tmp_path / "slots" / "b" / "app"
    assert tree(app) == FILES
    # The streamed image stays beside the app: it is the base of the next delta update.
    assert tree(tmp_path / "slots") == {"b/image.bin": data} | {"b/app/" + k: v for k, v in FILES.items()}
    assert be.has_image("b") and not be.has_image("a")


def test_files_backend_read_back_and_resume(tmp_path):
    be = FilesBackend(str(tmp_path / "slots"), 1 << 20)
    data = pack_files(FILES)
    be.begin("b", len(data))
    be.write("b", 0, data[:700])
    be.flush("b")
    assert be.read("b", 0, 700) == data[:700]
    be.close()  # restart
    be = FilesBackend(str(tmp_path / "slots"), 1 << 20)
    be.resume("b", 700)
    assert be.read("b", 0, 700) == data[:700]
    be.write("b", 700, data[700:])
    be.finalize("b", len(data))
    assert tree(Path(be.app_dir("b"))) == FILES
    # The finalised image is kept whole: the base a later delta reads.
    assert FilesBackend(str(tmp_path / "slots"), 1 << 20).read("b", 0, len(data) + 10) == data


def test_files_backend_begin_clears_previous_slot_contents(tmp_path):
    be = FilesBackend(str(tmp_path / "slots"), 1 << 20)
    install(be, "a", pack_files({"app.py": b"A = 1\n"}))
    install(be, "b", pack_files({"app.py": b"old\n", "stale.py": b"x", "pkg/old.py": b"y"}))
    (tmp_path / "slots" / "b" / "leftover.bin").write_bytes(b"junk")
    new = {"app.py": b"new\n", "pkg/new.py": b"z"}
    data = pack_files(new)
    be.begin("b", len(data))
    assert tree(tmp_path / "slots" / "b") == {"image.bin": b""}  # empty right after begin
    for offset, piece in pieces(data):
        be.write("b", offset, piece)
    be.finalize("b", len(data))
    assert tree(Path(be.app_dir("b"))) == new
    assert tree(Path(be.app_dir("a"))) == {"app.py": b"A = 1\n"}  # the other slot untouched


GOOD = ("app.py", b"VERSION = '1'\n")
BAD_BUNDLES = {
    "bad magic": raw_bundle([GOOD], magic=b"FOTC"),
    "bad version": raw_bundle([GOOD], version=2),
    "empty": b"",
    "header only": b"FOTB\x01",
    "truncated file": pack_files(FILES)[:-1],
    "truncated name": raw_bundle([GOOD])[:9],
    "count beyond files": raw_bundle([GOOD], count=2),
    "trailing bytes": pack_files(FILES) + b"\x00",
    "missing app.py": raw_bundle([("main.py", b"x")]),
    "no files": raw_bundle([]),
    "parent traversal": raw_bundle([GOOD, ("../evil.py", b"EVIL")]),
    "deep traversal": raw_bundle([GOOD, ("../../../../evil.py", b"EVIL")]),
    "inner traversal": raw_bundle([GOOD, ("lib/../../evil.py", b"EVIL")]),
    "dot segment": raw_bundle([GOOD, ("./evil.py", b"EVIL")]),
    "empty segment": raw_bundle([GOOD, ("lib//evil.py", b"EVIL")]),
    "empty name": raw_bundle([GOOD, ("", b"EVIL")]),
    "backslash": raw_bundle([GOOD, ("..\\evil.py", b"EVIL")]),
    "not utf-8": raw_bundle([GOOD, (b"\xff\xfe.py", b"EVIL")]),
    "name too long": raw_bundle([GOOD, ("a" * 256, b"EVIL")]),
    "duplicate name": raw_bundle([GOOD, ("app.py", b"EVIL")]),
    "file and dir of one name": raw_bundle([GOOD, ("lib", b"x"), ("lib/evil.py", b"EVIL")]),
    "dir and file of one name": raw_bundle([GOOD, ("lib/evil.py", b"x"), ("lib", b"EVIL")]),
}
ABSOLUTE = "absolute name"


@pytest.mark.parametrize("case", sorted(BAD_BUNDLES) + [ABSOLUTE])
def test_files_backend_refuses_bad_bundles(tmp_path, case):
    sandbox = tmp_path / "device"
    sandbox.mkdir()
    if case == ABSOLUTE:
        data = raw_bundle([GOOD, (str(sandbox / "evil.py"), b"EVIL")])
    else:
        data = BAD_BUNDLES[case]
    be = FilesBackend(str(sandbox / "slots"), 1 << 20)
    install(be, "a", pack_files({"app.py": b"A\n"}))
    (sandbox / "config.json").write_text("{}")
    before = tree(sandbox)
    with pytest.raises(BundleError):
        install(be, "b", data)
    after = tree(sandbox)
    # Whatever was written went below slots/b/app; nothing else changed.
    outside = {k: v for k, v in after.items() if not k.startswith("slots/b/")}
    assert outside == {k: v for k, v in before.items() if not k.startswith("slots/b/")}
    assert set(after) - set(before) <= {k for k in after if k.startswith("slots/b/app/")} | {"slots/b/image.bin"}
    assert not any(p.name == "evil.py" and "slots/b/app" not in p.as_posix() for p in tmp_path.rglob("*"))
    assert not (tmp_path / "evil.py").exists() and not Path("/evil.py").exists()


def test_bundle_extract_accepts_what_the_writer_packs(tmp_path):
    files = {"app.mpy": b"\x4d\x06", "a/b/c/d.txt": b"deep", "A-Z_0.9": b"n" * 1000}
    data = pack_files(files)
    with open(tmp_path / "img", "wb") as f:
        f.write(data + b"ignored beyond size")
    dest = tmp_path / "out"
    dest.mkdir()
    with open(tmp_path / "img", "rb") as f:
        names = extract(f, len(data), str(dest), buf_size=7)
    assert sorted(names) == sorted(files)
    assert tree(dest) == files


def test_device_and_tool_agree_on_names():
    from fota.tools.bundle import check_name as tool_check
    for name in ["app.py", "a/b", "../x", "/x", "a//b", "./a", "a/.", "", "a" * 255, "a" * 256,
                 "é.py", "a b", "a\\b", "...", "a..b", ".hidden", "x/"]:
        assert device_bundle.check_name(name) == tool_check(name), name


NAMES = st.sampled_from(["app.py", "a", "a/b", "a/b/c", "b", "../x", "/x", "a/../x", ".", "app.mpy", "x/"])


@st.composite
def bundle_bytes(draw):
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=300))
    entries = draw(st.lists(st.tuples(NAMES, st.binary(max_size=20)), max_size=5))
    data = raw_bundle(entries, count=draw(st.one_of(st.none(), st.integers(0, 7))))
    if kind == 2 and data:  # mutate a structured bundle
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([draw(st.integers(0, 255))]) + data[pos + 1:]
        data = data[:draw(st.integers(0, len(data)))]
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=bundle_bytes(), declared=st.integers(-3, 3))
def test_bundle_extract_fuzz(data, declared):
    """Arbitrary bytes: BundleError or success, never another exception, nothing outside dest."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dest = root / "a" / "b" / "dest"
        dest.mkdir(parents=True)
        (root / "img").write_bytes(data)
        size = max(0, len(data) + declared)  # also a size that disagrees with the file
        with open(root / "img", "rb") as f:
            try:
                names = extract(f, size, str(dest))
            except BundleError:
                names = None
        if names is not None:
            assert "app.py" in names or "app.mpy" in names
            assert set(tree(dest)) == set(names)
        everything = {p.relative_to(root).as_posix() for p in root.rglob("*")}
        assert everything - {"img", "a", "a/b", "a/b/dest"} <= {e for e in everything if e.startswith("a/b/dest/")}


def test_open_backend_files(tmp_path):
    be = open_backend("files", str(tmp_path), {"capacity": 1234})
    assert isinstance(be, FilesBackend) and be.capacity == 1234
    assert be.app_dir("a") == str(tmp_path) + "/slots/a/app"
    with pytest.raises(ValueError):
        open_backend("nope", str(tmp_path), {})


# ---- the same under the real MicroPython -------------------------------------------------------------

MP_PRELUDE = r"""
import hashlib, binascii, json
from fota.device import fsutil

def image(n, seed):
    b = bytearray(n)
    for i in range(n):
        b[i] = (i * 131 + seed + (i >> 8)) & 0xFF
    return bytes(b)

def h(data):
    return binascii.hexlify(hashlib.sha256(data).digest()).decode()

def err(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return type(e).__name__
    return "ok"

def stream(be, slot, data, start, sizes):
    at, k = 0, 0
    while at < len(data):
        n = sizes[k % len(sizes)]
        be.write(slot, start + at, data[at:at + n])
        at += n
        k += 1
"""

MP_SIM = MP_PRELUDE + r"""
from fota.device.slots.sim import SimFlash, SimBackend, FlashError
S = 4096
SLOT = 16 * S
out = {}
for erased in (0xFF, 0x00):
    E = bytes([erased])
    f = SimFlash(3 * S, erased=erased)
    r = {}
    r["unaligned_offset"] = err(f.write, 2, b"abcd")
    r["unaligned_length"] = err(f.write, 0, b"abc")
    r["blank"] = f.read(0, 3 * S) == E * (3 * S)
    f.write(0, b"abcd")
    f.write(S, b"\x01" * S)
    r["rewrite"] = err(f.write, 0, b"abcd")
    f.erase(1)
    r["erase_sector"] = f.read(S, S) == E * S and f.read(0, 4) == b"abcd" and f.read(2 * S, S) == E * S
    r["ops"] = f.ops
    r["erase_outside"] = err(f.erase, 3)

    # file-backed flash, stream into b with a flush in a partial unit, then a power cut
    path = "flash%d.bin" % erased
    flash = SimFlash(2 * SLOT, erased=erased, path=path)
    be = SimBackend(flash, SLOT)
    r["too_large"] = err(be.begin, "b", SLOT + 1)
    size = 5 * S + 321
    img = image(size, 3)
    be.begin("b", size)
    stream(be, "b", img[:1003], 0, (1, 3, 1000))
    be.flush("b")
    be.write("b", 1003, img[1003:2000])       # reopens the padded unit
    r["gap"] = err(be.write, "b", 2001, b"x")
    be.flush("b")
    off = 2 * S + 6
    stream(be, "b", img[2000:off], 2000, (4097, 1, 3))
    be.flush("b")
    be.write("b", off, image(3000, 77))        # unflushed garbage past the journal point
    flash.close()
    flash = SimFlash(2 * SLOT, erased=erased, path=path)
    r["stale_past_offset"] = flash.read(SLOT + off, 16) != E * 16
    be = SimBackend(flash, SLOT)
    erases = []
    real = flash.erase
    def logged(i, real=real):
        erases.append(i)
        real(i)
    flash.erase = logged
    start = be.resume("b", off)
    r["resume_at"] = start
    stream(be, "b", img[start - 10:], start - 10, (1, 3, 1000, 4097))
    be.finalize("b", size)
    r["image"] = h(be.read("b", 0, size))
    r["slot_a_blank"] = all(flash.read(i, S) == E * S for i in range(0, SLOT, S))
    r["erases"] = erases
    flash.close()
    r["reopened"] = h(SimFlash(2 * SLOT, erased=erased, path=path).read(SLOT, size))
    r["wrong_size"] = err(SimFlash, 4 * SLOT, S, 4, erased, path)
    out["%d" % erased] = r
print("RESULT " + json.dumps(out))
"""


def test_sim_under_micropython(tmp_path):
    proc = run_micropython(MP_SIM, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout
    out = json.loads(line[0][7:])
    size = 5 * SECTOR + 321
    want_image = hashlib.sha256(image(size, 3)).hexdigest()
    off = 2 * SECTOR + 6
    for erased in ("255", "0"):
        r = out[erased]
        assert r == {
            "unaligned_offset": "FlashError", "unaligned_length": "FlashError", "blank": True,
            "rewrite": "FlashError", "erase_sector": True, "ops": 3, "erase_outside": "FlashError",
            "too_large": "FlashError", "gap": "FlashError", "stale_past_offset": True,
            "image": want_image, "slot_a_blank": True,
            "erases": list(range((SLOT + off) // SECTOR, (SLOT + size - 1) // SECTOR + 1)),
            "resume_at": off - off % SECTOR,
            "reopened": want_image, "wrong_size": "FlashError",
        }, erased
        assert os.path.getsize(tmp_path / f"flash{erased}.bin") == 2 * SLOT


MP_FILES = MP_PRELUDE + r"""
from fota.device.slots.files import FilesBackend
from fota.device.bundle import BundleError
import os

def walk(d, prefix=""):
    found = {}
    for name in os.listdir(d):
        p = d + "/" + name
        if fsutil.is_dir(p):
            found.update(walk(p, prefix + name + "/"))
        else:
            with open(p, "rb") as f:
                found[prefix + name] = h(f.read())
    return found

def install(be, slot, path):
    with open(path, "rb") as f:
        data = f.read()
    be.begin(slot, len(data))
    stream(be, slot, data, 0, (1, 3, 1000, 7))
    be.flush(slot)
    be.finalize(slot, len(data))

be = FilesBackend(ROOT + "/slots", 1 << 20)
out = {}
install(be, "b", "old.bin")
install(be, "b", "good.bin")
out["good"] = walk(be.app_dir("b"))
out["slot_b"] = sorted(os.listdir(ROOT + "/slots/b"))
for name in BAD:
    try:
        install(be, "b", name + ".bin")
        out[name] = "ok"
    except BundleError as e:
        out[name] = "BundleError"
    except Exception as e:
        out[name] = "other %s %s" % (type(e).__name__, e)
out["root"] = sorted(os.listdir(ROOT))
out["slots"] = sorted(os.listdir(ROOT + "/slots"))
print("RESULT " + json.dumps(out))
"""

MP_BAD = ["bad magic", "truncated file", "trailing bytes", "missing app.py", "parent traversal",
          "deep traversal", "duplicate name", "file and dir of one name"]


def test_files_backend_under_micropython(tmp_path):
    (tmp_path / "old.bin").write_bytes(pack_files({"app.py": b"old", "stale/x.py": b"x"}))
    (tmp_path / "good.bin").write_bytes(pack_files(FILES))
    bad = {name.replace(" ", "_").replace(".", "_"): BAD_BUNDLES[name] for name in MP_BAD}
    bad["absolute"] = raw_bundle([GOOD, (str(tmp_path / "evil.py"), b"EVIL")])
    for name, data in bad.items():
        (tmp_path / f"{name}.bin").write_bytes(data)
    script = f"ROOT = {str(tmp_path)!r}\nBAD = {sorted(bad)!r}\n" + MP_FILES
    proc = run_micropython(script, cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout
    out = json.loads(line[0][7:])
    assert out["good"] == {k: hashlib.sha256(v).hexdigest() for k, v in FILES.items()}
    assert out["slot_b"] == ["app", "image.bin"]
    for name in bad:
        assert out[name] == "BundleError", (name, out[name])
    assert out["root"] == sorted(["slots"] + [f"{n}.bin" for n in bad] + ["old.bin", "good.bin"])
    assert out["slots"] == ["b"]
    assert not (tmp_path / "evil.py").exists()

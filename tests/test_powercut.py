"""Power cuts (docs/reliability.md): the sampled version of `./run bench powercut`.

A real signed update (fota.powercut.scenario) runs through the real runner and core, driven
without a network by fota.powercut.harness, with power cut before or in the middle of persistent
operations; after every cut the device boots from what is on its flash and in its files. Three
slot backends: `sim` (a NOR flash), `esp32` (the OTA partitions of the emulated esp32 module of
fota.testkit.boards, whose bootloader runs at every power-on) and `files` (app bundles in slot
directories on a LittleFS model, fota.powercut.littlefs). Every case must boot a verified image at
every boot, keep its boot record consistent (with the bootloader's choice on esp32) and finish the
job (confirmed, or reverted for an unhealthy image). The same harness runs a sample under the real
MicroPython.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest

from conftest import run_micropython
from fota.device import fsutil
from fota.device.slots.sim import Power, PowerCut, SimFlash
from fota.powercut import harness as H
from fota.powercut.littlefs import LittleFS
from fota.powercut.scenario import build, esp_app_image

ROOT = Path(__file__).resolve().parent.parent
BOARDS = ROOT / "src" / "fota" / "testkit" / "boards"  # the emulated `esp32` (tests/boards re-exports it)

# Small and awkward on purpose: 7 sectors of 1 KiB, chunks of 301 bytes (not a multiple of the
# 4-byte alignment nor a divisor of the sector), a checkpoint every 2 chunks.
GEOMETRY = dict(image_size=6 * 1024 + 77, sector=1024, chunk=301, window=2, seed=3)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("powercut")
    return {name: H.Scenario(str(d)) for name, d in build(out / "ff", **GEOMETRY).items()
            if name != "delta"}


@pytest.fixture(scope="module")
def clean(scenarios, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("clean") / "dev")
    return {name: H.clean_run(s, work) for name, s in scenarios.items()}


def _fails(results):
    return [(case, out["bricked"], out["problems"]) for case, out in results if not out["ok"]]


def test_clean_updates_count_their_operations(clean, scenarios):
    for name, (out, log) in clean.items():
        assert out["ok"], (name, out)
        assert out["cuts"] == 0 and out["lost"] == 0 and out["resent"] == 0
        assert out["ops"] == len(log)
        kinds = {k.split()[0] for k, _ in log}
        assert kinds == {"erase", "write", "replace", "remove"}, kinds
        assert [p for _, p in log if p == "install"], "no operation counted in the install phase"
        assert log[-1][1] == "trial"
        print(f"{name}: N = {out['ops']} persistent operations, {out['boots']} boots")
    assert clean["update"][0]["final"] == "2.0.0" and clean["revert"][0]["final"] == "1.0.0"
    assert clean["second"][0]["final"] == "3.0.0"
    assert clean["revert"][0]["boots"] == 2 + scenarios["revert"].max_trial_boots  # every trial counted


def _sample(log):
    # Every operation outside the download, every third one inside it (the bench runs all).
    return [i for i, (_, phase) in enumerate(log, 1) if phase != "download" or i % 3 == 1]


@pytest.mark.parametrize("name", ["update", "revert", "second"])
@pytest.mark.parametrize("mid", [False, True], ids=["before", "torn"])
def test_single_cut_at_sampled_operations(scenarios, clean, tmp_path, name, mid):
    out, log = clean[name]
    points = _sample(log)
    results = [((i, log[i - 1]), H.run_case(scenarios[name], str(tmp_path / "dev"), (i,), mid)) for i in points]
    print(f"{name}: N = {out['ops']}, {len(results)} cases {'torn' if mid else 'cut before'}")
    assert _fails(results) == []
    assert all(r["cuts"] == 1 for _, r in results)
    # A cut costs at most a checkpoint window, the sector under it, and what was in flight.
    s = scenarios[name]
    assert max(r["resent"] for _, r in results) <= 2 * 2 * s.chunk + 1024 + s.chunk


@pytest.mark.parametrize("name", ["update", "revert", "second"])
def test_chained_cuts_during_recovery(scenarios, clean, tmp_path, name):
    work = str(tmp_path / "dev")
    points = list(range(1, clean[name][0]["ops"] + 1))
    cases = H.chained_cases(scenarios[name], work, seed=11, count=8, depth=2, points=points)
    cases += H.chained_cases(scenarios[name], work, seed=12, count=2, depth=3, points=points)
    print(f"{name}: {len(cases)} chained cases")
    assert _fails([((c, t), r) for c, t, r in cases]) == []
    assert all(r["cuts"] == len(c) for c, _, r in cases)  # the later cuts really landed


def test_a_command_acknowledged_before_it_is_persisted_is_lost(scenarios, clean, tmp_path):
    # What the runner did before manual_ack: the PUBACK left when the command arrived. A cut
    # before the journal was written then lost the job for good (the broker would not send it
    # again). The harness must see that, and the runner must not do it.
    s = scenarios["update"]
    _, log = clean["update"]
    first_journal = [i for i, (k, _) in enumerate(log, 1) if k == "replace journal.json"][0]
    eager = H.run_case(s, str(tmp_path / "dev"), (first_journal,), eager_ack=True)
    assert not eager["ok"] and eager["terminal"] == [] and eager["lost"] == 1 and eager["final"] == "1.0.0"
    assert any("never ended" in p for p in eager["problems"]), eager
    assert H.run_case(s, str(tmp_path / "dev"), (first_journal,))["ok"]


def test_cut_between_marking_the_trial_and_deleting_the_journal_keeps_the_fallback(scenarios, clean, tmp_path):
    # The journal of the finished download must not be resumed into the other slot, which is the
    # fallback while the new image is on trial: a revert would then boot a wiped slot.
    _, log = clean["revert"]
    i = [n for n, (k, _) in enumerate(log, 1) if k == "remove journal.json"][0]
    assert log[i - 2][0] == "replace boot.json"  # just after the trial was marked
    run = H.Run(scenarios["revert"], str(tmp_path / "dev"), (i,)).run()
    out = run.outcome()
    assert out["ok"] and out["final"] == "1.0.0" and out["terminal"] == ["reverted"], out
    assert run.booted[-1] == ("a", "1.0.0", False)


def test_the_record_stops_naming_a_slot_before_it_is_written_over(scenarios, clean, tmp_path):
    _, log = clean["second"]
    first_write = [n for n, (k, _) in enumerate(log, 1) if k == "write"][0]
    run = H.Run(scenarios["second"], str(tmp_path / "dev"), (first_write,)).run()
    assert run.outcome()["ok"]
    # The boot after the cut: slot a (1.0.0) was being overwritten with 3.0.0.
    assert run.booted[1] == ("b", "2.0.0", False)
    rec = json.loads((tmp_path / "dev" / "boot.json").read_text())
    assert rec["versions"] == {"a": "3.0.0", "b": "2.0.0"} and rec["active"] == "a" and rec["counter"] == 2


def test_erased_value_zero(tmp_path):
    dirs = build(tmp_path / "00", erased=0x00, **dict(GEOMETRY, image_size=3 * 1024 + 5))
    s = H.Scenario(str(dirs["update"]))
    out, log = H.clean_run(s, str(tmp_path / "dev"))
    assert out["ok"]
    results = [(i, H.run_case(s, str(tmp_path / "dev"), (i,), mid)) for i in range(1, out["ops"] + 1, 3)
               for mid in (False, True)]
    assert _fails(results) == []


# ---- the esp32 and files backends, and delta jobs ----------------------------------------------

# The esp32 board's flash works in 4 KiB blocks: a slightly larger image, still 3 blocks.
BOARD_GEOMETRY = dict(image_size=9 * 1024 + 77, chunk=301, window=2, seed=3)
BOARD_BACKENDS = ("esp32", "files")
KINDS = {
    "esp32": {"writeblocks", "set_boot", "mark_app_valid", "open", "write", "close", "rename", "remove"},
    "files": {"open", "write", "sync", "close", "rename", "remove", "mkdir"},
}


@pytest.fixture(scope="module")
def emulated_boards():
    """The emulated `esp32` module (fota.testkit.boards) importable, as the bench makes it."""
    sys.path.insert(0, str(BOARDS))
    # The device collects its heap before a delta (a board's heap is small); on CPython, in a
    # process as big as pytest's, each collection took 40 ms: the old objects are frozen.
    gc.freeze()
    yield
    gc.unfreeze()
    sys.path.remove(str(BOARDS))
    for name in ("esp32", "fota.device.slots.esp32"):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def boards(emulated_boards, tmp_path_factory):
    """{backend: {scenario: (Scenario, clean outcome, clean log)}}; the sim backend's delta too."""
    out = tmp_path_factory.mktemp("boards")
    work = str(out / "clean")
    found = {}
    for backend in BOARD_BACKENDS + ("sim",):
        geometry = GEOMETRY if backend == "sim" else BOARD_GEOMETRY
        names = ("delta",) if backend == "sim" else ("update", "revert", "second", "delta")
        # not named after the backend: a directory `esp32` in the cwd would shadow the module
        dirs = build(out / ("backend-" + backend), backend=backend, scenarios=names, **geometry)
        found[backend] = {}
        for name, d in dirs.items():
            s = H.Scenario(str(d))
            found[backend][name] = (s,) + H.clean_run(s, work)
    return found


def test_board_clean_updates(boards):
    for backend, scenarios in boards.items():
        for name, (s, out, log) in scenarios.items():
            assert out["ok"], (backend, name, out)
            assert out["cuts"] == 0 and out["resent"] == 0 and out["ops"] == len(log)
            kinds = {k.split()[0] for k, _ in log}
            if backend in KINDS:
                # a failed trial is never marked valid; a delta job keeps no resumable position
                skip = {"revert": {"mark_app_valid"}, "delta": {"sync"}}.get(name, set())
                assert kinds >= KINDS[backend] - skip, (backend, name, kinds)
            assert out["final"] == {"revert": "1.0.0", "second": "3.0.0"}.get(name, "2.0.0")
            print(f"{backend} {name}: N = {out['ops']}, {out['boots']} boots")
    # The bootloader gives a new image one boot: a failed trial is reverted at the next reset.
    assert boards["esp32"]["revert"][1]["boots"] == 3
    assert boards["files"]["revert"][1]["boots"] == 2 + boards["files"]["revert"][0].max_trial_boots
    # A delta job streams the patch, not the image.
    for backend in boards:
        s = boards[backend]["delta"][0]
        assert s.delta and s.size < s.images["2.0.0"][0] // 2, (backend, s.size)


def _board_sample(log, step):
    return [i for i, (_, phase) in enumerate(log, 1) if (phase != "download" and i % 2) or i % step == 1]


@pytest.mark.parametrize("backend,name", [(b, n) for b in BOARD_BACKENDS for n in ("update", "revert", "second", "delta")]
                         + [("sim", "delta")])
def test_board_single_cuts(boards, tmp_path, backend, name):
    s, out, log = boards[backend][name]
    step = 9 if name == "delta" else 5
    points = _board_sample(log, step)
    results = [((i, mid, log[i - 1][0]), H.run_case(s, str(tmp_path / "dev"), (i,), mid))
               for i in points for mid in (False, True)]
    print(f"{backend} {name}: N = {out['ops']}, {len(results)} cases")
    assert _fails(results) == []
    assert all(r["cuts"] == 1 for _, r in results)


@pytest.mark.parametrize("backend", BOARD_BACKENDS)
def test_board_chained_cuts(boards, tmp_path, backend):
    cases = []
    for name in ("update", "revert", "second"):
        s, out, log = boards[backend][name]
        cases += H.chained_cases(s, str(tmp_path / "dev"), seed=11, count=4, depth=2,
                                 points=list(range(1, out["ops"] + 1)))
    assert _fails([((c, t), r) for c, t, r in cases]) == []
    assert all(r["cuts"] == len(c) for c, _, r in cases)


def _first(log, kind, phase=None):
    return [i for i, (k, p) in enumerate(log, 1) if k.startswith(kind) and (phase is None or p == phase)][0]


def test_esp32_cut_during_the_trial_boot_is_the_bootloaders_rollback(boards, tmp_path):
    # The new image is reset before it is marked valid: the bootloader boots the old one again,
    # and the boot record must follow it (the job reverts), not go on "trying" slot b while
    # slot a runs, and report a confirmation of an image that does not run.
    import esp32
    s, out, log = boards["esp32"]["update"]
    i = _first(log, "mark_app_valid")  # the health check passed, the image is not yet valid
    run = H.Run(s, str(tmp_path / "dev"), (i,)).run()
    result = run.outcome()
    assert result["ok"] and result["exhausted"], result
    assert result["final"] == "1.0.0" and result["terminal"] == ["reverted"]
    assert run.booted == [("a", "1.0.0", False), ("b", "2.0.0", True), ("a", "1.0.0", False)]
    assert esp32.state("ota_1") == "ABORTED" and esp32.Partition(esp32.Partition.BOOT).info()[4] == "ota_0"
    record = json.loads((tmp_path / "dev" / "boot.json").read_text())
    assert record["versions"] == {"a": "1.0.0", "b": None} and record["active"] == "a"
    reverted = [st for st in run.center.statuses if st.get("state") == "reverted"]
    assert "the bootloader rolled back" in json.dumps(reverted), reverted
    # Torn instead: the image was marked valid, power failed before the record said so. The
    # bootloader keeps it; the record follows and the job is confirmed.
    run = H.Run(s, str(tmp_path / "dev"), (i,), mid=True).run()
    result = run.outcome()
    assert result["ok"] and not result["exhausted"] and result["terminal"] == ["confirmed"], result
    # its second boot is no trial: the bootloader boots a pending image once, so it was valid
    assert run.booted == [("a", "1.0.0", False), ("b", "2.0.0", True), ("b", "2.0.0", False)]
    assert esp32.state("ota_1") == "VALID"


def test_esp32_cut_between_set_boot_and_the_trial_mark(boards, tmp_path):
    # set_boot made the new image boot next, the trial was never recorded: the agent must not
    # run (and mark valid) an image its record does not name; it resets, the bootloader
    # abandons it, and the install is done again from the journal.
    s, out, log = boards["esp32"]["update"]
    i = _first(log, "set_boot") + 1
    assert log[i - 1][1] == "install"
    run = H.Run(s, str(tmp_path / "dev"), (i,)).run()
    result = run.outcome()
    assert result["ok"] and result["final"] == "2.0.0" and result["terminal"] == ["confirmed"], result
    # the journal's image was complete: hashed again from the flash, but for its last, partial
    # block, which the backend writes again (it trusts whole blocks only)
    assert 0 < result["resent"] < 4096
    # boot 2 (ota_1, unrecorded) resets at once; boot 3, back on slot a, installs again; boot 4 confirms
    assert run.boots == 4 and run.booted == [("a", "1.0.0", False), ("a", "1.0.0", False), ("b", "2.0.0", True)]


def test_board_checks_see_a_slot_that_does_not_hold_its_release(boards, tmp_path):
    # The checks can fail: a byte of the running app changed on the files backend, the running
    # partition blanked on the esp32 board (the bootloader then finds no app).
    import shutil
    s = boards["files"]["update"][0]
    shutil.copytree(s.path, tmp_path / "files")
    data = tmp_path / "files" / "template" / "slots" / "a" / "app" / "data.bin"
    data.write_bytes(b"\x00" + data.read_bytes()[1:])
    out = H.Run(H.Scenario(str(tmp_path / "files")), str(tmp_path / "dev")).run().outcome()
    assert not out["ok"] and "slot a (record: 1.0.0) holds no verified image" in out["bricked"], out
    s = boards["esp32"]["update"][0]
    shutil.copytree(s.path, tmp_path / "esp")
    flash = tmp_path / "esp" / "template" / "flash.bin"
    flash.write_bytes(b"\xff" * 4096 + flash.read_bytes()[4096:])
    out = H.Run(H.Scenario(str(tmp_path / "esp")), str(tmp_path / "dev")).run().outcome()
    assert not out["ok"] and "the bootloader found no app" in out["bricked"], out


def test_files_cut_before_a_sync_loses_the_unsynced_tail(boards, tmp_path):
    s, out, log = boards["files"]["update"]
    syncs = [n for n, (k, _) in enumerate(log, 1) if k == "sync image.bin"]
    run = H.Run(s, str(tmp_path / "dev"), (syncs[1],)).run()
    result = run.outcome()
    assert result["ok"] and result["final"] == "2.0.0", result
    # What the second sync would have kept is sent again: at least the window since the first.
    assert result["resent"] >= s.chunk * 2


# ---- the power model -------------------------------------------------------------------------

@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_torn_write_and_erase(erased):
    e = bytes([erased])
    f = SimFlash(2048, sector=1024, erased=erased)
    f.write(1024, bytes(range(16)) * 64)
    f.power = Power(cuts=(1, 2), mid=(1,))
    data = bytes([0x5A]) * 12
    with pytest.raises(PowerCut):
        f.write(0, data)                         # op 1, torn
    # half programmed (whole units), one unit half programmed, the rest erased
    weak = bytes([(0x5A & 0x0F) | (erased & 0xF0)]) * 4
    assert f.read(0, 12) == data[:4] + weak + e * 4
    assert weak != data[:4] and weak != e * 4
    with pytest.raises(PowerCut):
        f.erase(1)                               # op 2, cut before: nothing changes
    assert f.read(1024, 1024) == bytes(range(16)) * 64
    f.power = Power(cuts=(1,), mid=True)
    with pytest.raises(PowerCut):
        f.erase(1)                               # torn: first half erased, one unit half erased
    old = bytes(range(16)) * 64
    assert f.read(1024, 512) == e * 512
    assert f.read(1536, 4) == bytes([(erased & 0x0F) | (b & 0xF0) for b in old[512:516]])
    assert f.read(1540, 508) == old[516:]
    assert f.power.ops == 1 and f.ops == 4       # counted even when cut


def test_torn_file_replacement_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "boot.json")
    fsutil.write_json(path, {"v": 1})
    try:
        fsutil.power = Power(cuts=(1, 3), mid=(1,))
        with pytest.raises(PowerCut):
            fsutil.write_json(path, {"v": 2, "pad": "x" * 100})
        assert fsutil.read_json(path) == {"v": 1}            # the rename never happened
        assert 0 < len(Path(path + ".tmp").read_text()) < 100  # a torn temporary file
        with pytest.raises(PowerCut):
            fsutil.write_json(path, {"v": 3})                 # the power stays off: not counted
        assert fsutil.read_json(path) == {"v": 1} and fsutil.power.ops == 1
        fsutil.power.down = False                             # powered on again
        fsutil.write_json(path, {"v": 3})                     # op 2: a later write is whole
        assert fsutil.read_json(path) == {"v": 3}
        fsutil.remove(str(tmp_path / "missing.json"))         # nothing to remove: not counted
        with pytest.raises(PowerCut):
            fsutil.remove(path)                               # op 3, cut before
        assert fsutil.read_json(path) == {"v": 3} and fsutil.power.ops == 3
    finally:
        fsutil.power = None


def test_littlefs_model_keeps_what_was_synced(tmp_path):
    """fota.powercut.littlefs: at a cut, a file open for writing reverts to its last sync or
    close (the unsynced tail is lost, although it reached the host file), a file created by
    open() stays (empty until synced), and a file opened with "w" keeps its old contents until
    its first sync."""
    image, state, new = (str(tmp_path / n) for n in ("image.bin", "state.json", "new.bin"))
    Path(state).write_text("old contents")
    fs = LittleFS(Power(cuts=(7,)))
    f = fs.open(image, "wb")              # op 1 (the creation is committed)
    f.write(b"A" * 100)                   # op 2
    f.flush()                             # op 3: synced
    f.write(b"B" * 50)                    # op 4
    g = fs.open(state, "w")               # op 5: truncated for the agent...
    g.write("x")                          # op 6
    assert Path(state).read_text() == "x" and Path(image).read_bytes() == b"A" * 100 + b"B" * 50
    with pytest.raises(PowerCut):
        fs.open(new, "wb")                # op 7: cut before it
    assert Path(image).read_bytes() == b"A" * 100            # the unsynced tail is lost
    assert Path(state).read_text() == "old contents"         # ...but not on the flash
    assert not Path(new).exists()
    with pytest.raises(PowerCut):
        f.write(b"C")                     # the power stays off: nothing is done or counted
    assert fs.power.ops == 7


def test_littlefs_model_torn_operations(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    Path(b).write_bytes(b"old")
    # a torn write: half of it written, then lost with the rest of the unsynced data
    fs = LittleFS(Power(cuts=(3,), mid=True))
    f = fs.open(a, "r+b" if Path(a).exists() else "wb")   # op 1
    f.write(b"12345678")                                  # op 2
    with pytest.raises(PowerCut):
        f.write(b"abcdefgh")                              # op 3, torn
    assert Path(a).read_bytes() == b""                    # created, never synced
    # a torn close (a sync) completes; a torn rename completes; power fails right after
    fs = LittleFS(Power(cuts=(3, 6), mid=True))
    with pytest.raises(PowerCut):
        with fs.open(a, "r+b") as f:                      # op 1
            f.write(b"12345678")                          # op 2; close is op 3, torn
    assert Path(a).read_bytes() == b"12345678"
    fs.power.down = False
    f = fs.open(a, "r+b")                                 # op 4
    f.close()                                             # op 5: a close of a writable file
    assert fs.power.ops == 5
    with pytest.raises(PowerCut):
        fs.rename(a, b)                                   # op 6, torn: done
    assert Path(b).read_bytes() == b"12345678" and not Path(a).exists()
    # a cut before a remove, rmdir or mkdir: not done
    Path(a).write_bytes(b"x")
    fs = LittleFS(Power(cuts=(1,)))
    with pytest.raises(PowerCut):
        fs.remove(a)
    assert Path(a).exists()
    # with the model installed, fsutil's writes go through it: a cut before the rename of the
    # replacement keeps the old file
    fsutil.fs = LittleFS(Power(cuts=(4,)))
    try:
        fsutil.write_json(b, {"v": 1})                    # open, write, close: ops 1-3
        raise AssertionError("not cut")
    except PowerCut:
        pass
    finally:
        fsutil.fs = None
    assert Path(b).read_bytes() == b"12345678" and json.loads(Path(b + ".tmp").read_text()) == {"v": 1}


def test_esp32_emulation_torn_operations(emulated_boards, tmp_path):
    import esp32
    esp32.setup(str(tmp_path / "flash.bin"), app_size=4 * 4096)
    p = esp32.Partition("ota_1")
    p.writeblocks(0, b"\x11" * 8192)
    try:
        esp32.power = Power(cuts=(1, 2, 3, 5), mid=True)
        with pytest.raises(PowerCut):
            p.writeblocks(0, b"\x22" * 4096)              # erased, then half programmed
        buf = bytearray(4096)
        p.readblocks(0, buf)
        assert bytes(buf) == b"\x22" * 2048 + b"\xff" * 2048
        esp32.power.down = False
        with pytest.raises(PowerCut):
            p.writeblocks(1, b"\x00" * 16, 8)             # no erase: half of it programmed
        p.readblocks(1, buf)
        assert bytes(buf[:32]) == b"\x11" * 8 + b"\x00" * 8 + b"\x11" * 16
        esp32.power.down = False
        with pytest.raises(PowerCut):
            p.ioctl(6, 1)                                 # half of the block erased
        p.readblocks(1, buf)
        assert bytes(buf) == b"\xff" * 2048 + b"\x11" * 2048
        esp32.power.down = False
        image = esp_app_image(bytes(range(256)) * 8)
        p.writeblocks(0, image + b"\xff" * (-len(image) % 4096))  # op 4
        with pytest.raises(PowerCut):
            p.set_boot()                                  # op 5, torn: the OTA data write is atomic
        assert esp32.state("ota_1") == "NEW" and esp32.Partition(esp32.BOOT).info()[4] == "ota_1"
    finally:
        esp32.power = None


def test_a_power_cut_is_not_an_error_the_device_code_can_catch():
    with pytest.raises(PowerCut):
        try:
            raise PowerCut("cut")
        except Exception:  # the runner's install step catches Exception: a cut must get through
            pytest.fail("PowerCut caught as an Exception")


# ---- the same harness under MicroPython --------------------------------------------------------

MP_SCRIPT = r"""
import json
from fota.powercut import harness as H
out = {}
for name in ("update", "revert", "second"):
    s = H.Scenario(DIRS[name])
    first, log = H.clean_run(s, WORK)
    res = {"n": first["ops"], "ok": first["ok"], "log": [k for k, p in log], "cases": []}
    for i in POINTS[name]:
        for mid in (False, True):
            o = H.run_case(s, WORK, (i,), mid)
            res["cases"].append([i, mid, o["ok"], o["ops"], o["boots"], o["resent"], o["problems"]])
    for cuts, torn, o in H.chained_cases(s, WORK, 5, 1, 2, None, list(range(1, first["ops"] + 1))):
        res["cases"].append([list(cuts), list(torn), o["ok"], o["ops"], o["boots"], o["resent"], o["problems"]])
    out[name] = res
print("RESULT " + json.dumps(out))
"""


def test_same_harness_under_micropython(scenarios, clean, tmp_path):
    dirs = {name: s.path for name, s in scenarios.items()}
    points = {}
    for name, (out, log) in clean.items():
        n = out["ops"]
        points[name] = [4, n // 2, n - len([p for _, p in log if p == "trial"]) - 1]
    script = f"DIRS = {dirs!r}\nPOINTS = {points!r}\nWORK = {str(tmp_path / 'mp')!r}\n" + MP_SCRIPT
    # The harness keeps more alive than a device would (the center's queue, every boot's
    # objects until the next collection), so it gets more heap than the agent needs.
    proc = run_micropython(script, heap="512K", timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    got = json.loads(line[0][7:])
    for name, res in got.items():
        out, log = clean[name]
        # The same operations, in the same order, as on CPython; every case passes and ends the same.
        assert res["n"] == out["ops"] and res["ok"], (name, res["n"], out["ops"])
        assert res["log"] == [k for k, _ in log]
        for i, mid, ok, ops, boots, resent, problems in res["cases"]:
            assert ok, (name, i, mid, problems)
            if isinstance(i, int):
                py = H.run_case(scenarios[name], str(tmp_path / "py"), (i,), mid)
            else:
                py = H.run_case(scenarios[name], str(tmp_path / "py"), tuple(i), tuple(mid) or False)
            assert (ops, boots, resent) == (py["ops"], py["boots"], py["resent"]), (name, i, mid)


MP_BOARDS_SCRIPT = r"""
import json
from fota.powercut import harness as H
for key in DIRS:
    s = H.Scenario(DIRS[key])
    first, log = H.clean_run(s, WORK)
    res = {"n": first["ok"] and first["ops"], "log": [k for k, p in log], "cases": []}
    for i in POINTS[key]:
        for mid in (False, True):
            o = H.run_case(s, WORK, (i,), mid)
            res["cases"].append([i, mid, o["ok"], o["ops"], o["boots"], o["resent"], o["problems"], o["bricked"]])
    print("RESULT " + json.dumps([key, res]))  # one line per scenario: a small heap
    res = None
"""


def test_board_harness_under_micropython(boards, tmp_path):
    # The esp32 emulation and the LittleFS model run under the real MicroPython as well, with
    # the same operations in the same order as on CPython.
    dirs, points = {}, {}
    for backend in BOARD_BACKENDS:
        for name, (s, out, log) in boards[backend].items():
            key = f"{backend}/{name}"
            dirs[key] = s.path
            trial = [i for i, (_, p) in enumerate(log, 1) if p == "trial"]
            points[key] = [3, out["ops"] // 2, trial[0] + 1]
    script = f"DIRS = {dirs!r}\nPOINTS = {points!r}\nWORK = {str(tmp_path / 'mp')!r}\n" + MP_BOARDS_SCRIPT
    proc = run_micropython(script, heap="512K", timeout=240, cwd=str(tmp_path),
                           env={"MICROPYPATH": f"{ROOT / 'src'}:{BOARDS}"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    got = dict(json.loads(x[7:]) for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    assert sorted(got) == sorted(dirs), proc.stdout[-2000:]
    for key, res in got.items():
        s, out, log = boards[key.split("/")[0]][key.split("/")[1]]
        assert res["n"] == out["ops"] and res["log"] == [k for k, _ in log], key
        for i, mid, ok, ops, boots, resent, problems, bricked in res["cases"]:
            assert ok, (key, i, mid, problems, bricked)
            py = H.run_case(s, str(tmp_path / "py"), (i,), mid)
            assert (ops, boots, resent) == (py["ops"], py["boots"], py["resent"]), (key, i, mid)

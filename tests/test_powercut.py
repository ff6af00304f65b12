"""Power cuts (docs/reliability.md): the sampled version of `./run bench powercut`.

A real signed update (fota.powercut.scenario) runs through the real runner and core on the `sim`
NOR flash, driven without a network by fota.powercut.harness, with power cut before or in the
middle of persistent operations; after every cut the device boots from what is on the flash and in its
files. Every case must boot a verified image at every boot, keep its boot record consistent and
finish the job (confirmed, or reverted for an unhealthy image). The same harness runs a sample
under the real MicroPython.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_micropython
from fota.device import fsutil
from fota.device.slots.sim import Power, PowerCut, SimFlash
from fota.powercut import harness as H
from fota.powercut.scenario import build

# Small and awkward on purpose: 7 sectors of 1 KiB, chunks of 301 bytes (not a multiple of the
# 4-byte alignment nor a divisor of the sector), a checkpoint every 2 chunks.
GEOMETRY = dict(image_size=6 * 1024 + 77, sector=1024, chunk=301, window=2, seed=3)


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    out = tmp_path_factory.mktemp("powercut")
    return {name: H.Scenario(str(d)) for name, d in build(out / "ff", **GEOMETRY).items()}


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
        fsutil.write_json(path, {"v": 3})                     # op 2: a later write is whole
        assert fsutil.read_json(path) == {"v": 3}
        fsutil.remove(str(tmp_path / "missing.json"))         # nothing to remove: not counted
        with pytest.raises(PowerCut):
            fsutil.remove(path)                               # op 3, cut before
        assert fsutil.read_json(path) == {"v": 3} and fsutil.power.ops == 3
    finally:
        fsutil.power = None


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

"""The boot record and boot selector (fota.device.boot): trial boots, tries, revert, confirm;
persisted with fsutil.write_json/read_json; the same sequence under the real MicroPython."""
from __future__ import annotations

import copy
import json
import os
import re

import pytest

from conftest import run_micropython
from fota.device import boot, fsutil
from fota.device import protocol as P


def test_select_without_trial_returns_active():
    record = boot.new_record("1.0.0")
    before = copy.deepcopy(record)
    for _ in range(5):
        assert boot.select(record, 3) == ("a", False)
    assert record == before  # nothing to count, nothing changed
    record["active"] = "b"
    assert boot.select(record, 3) == ("b", False)


def test_new_record():
    record = boot.new_record("1.0.0")
    assert record["active"] == "a"
    assert record["versions"] == {"a": "1.0.0", "b": None}
    assert record["trial"] is None and record["report"] is None
    assert boot.other("a") == "b" and boot.other("b") == "a"


def test_set_trial_targets_the_other_slot_and_counts_tries():
    record = boot.new_record("1.0.0")
    record["report"] = {"job": 3, "state": P.CONFIRMED, "code": None, "reason": None}
    boot.set_trial(record, 17, "2.0.0")
    assert record["active"] == "a"  # not active before it proved itself
    assert record["versions"] == {"a": "1.0.0", "b": "2.0.0"}
    assert record["report"] is None  # an older terminal report is superseded
    assert record["trial"]["slot"] == "b" and record["trial"]["job"] == 17
    assert record["trial"]["version"] == "2.0.0" and record["trial"]["tries"] == 0
    for n in (1, 2, 3):
        assert boot.select(record, 3) == ("b", True)
        assert record["trial"]["tries"] == n
        assert record["active"] == "a"


@pytest.mark.parametrize("max_tries", [1, 2, 3, 5])
def test_failed_trial_reverts_after_max_tries(max_tries):
    record = boot.new_record("1.0.0")
    boot.set_trial(record, 17, "2.0.0")
    for n in range(max_tries):
        assert boot.select(record, max_tries) == ("b", True)
        boot.trial_failed(record, "health check %d timed out" % n)
    slot, on_trial = boot.select(record, max_tries)
    assert (slot, on_trial) == ("a", False)
    assert record["active"] == "a"
    assert record["trial"] is None
    assert record["versions"] == {"a": "1.0.0", "b": None}  # the failed slot is not bootable
    report = record["report"]
    assert report["job"] == 17 and report["state"] == "reverted" == P.REVERTED
    assert report["code"] == "E_HEALTH" == P.E_HEALTH
    assert re.search(r"\b%d\b" % max_tries, report["reason"])  # says how many tries failed
    assert "health check %d timed out" % (max_tries - 1) in report["reason"]  # the last error
    assert report.get("version") == "2.0.0"
    # Later boots stay on the old slot and keep the report until it is acknowledged.
    for _ in range(3):
        assert boot.select(record, max_tries) == ("a", False)
    assert record["report"] == report


def test_revert_reason_without_recorded_error():
    record = boot.new_record("1.0.0")
    boot.set_trial(record, 5, "2.0.0")
    boot.select(record, 1)
    assert boot.select(record, 1) == ("a", False)
    reason = record["report"]["reason"]
    assert re.search(r"\b1\b", reason) and "fail" in reason
    assert not reason.rstrip().endswith(":")


def test_trial_failed_without_trial_is_harmless():
    record = boot.new_record("1.0.0")
    before = copy.deepcopy(record)
    boot.trial_failed(record, "late error")
    assert record == before


def test_revert_from_slot_b_clears_slot_a():
    record = {"active": "b", "versions": {"a": "1.0.0", "b": "2.0.0"}, "trial": None, "report": None}
    boot.set_trial(record, 30, "3.0.0")
    assert record["trial"]["slot"] == "a" and record["versions"]["a"] == "3.0.0"
    assert boot.select(record, 2) == ("a", True)
    assert boot.select(record, 2) == ("a", True)
    assert boot.select(record, 2) == ("b", False)
    assert record["versions"] == {"a": None, "b": "2.0.0"}
    assert record["report"]["job"] == 30 and record["report"]["code"] == P.E_HEALTH


def test_confirm_makes_the_trial_slot_active():
    record = boot.new_record("1.0.0")
    boot.set_trial(record, 17, "2.0.0")
    assert boot.select(record, 3) == ("b", True)
    boot.trial_failed(record, "one bad boot")  # a failed try before a good one
    assert boot.select(record, 3) == ("b", True)
    report = {"job": 17, "state": P.CONFIRMED, "code": None, "reason": None}
    boot.confirm(record, report)
    assert record["active"] == "b"
    assert record["trial"] is None
    assert record["report"] == report
    assert record["versions"] == {"a": "1.0.0", "b": "2.0.0"}
    for _ in range(5):  # confirmed: no more tries counted, never reverted
        assert boot.select(record, 3) == ("b", False)
    # The next update goes to the other slot, away from the running one.
    boot.set_trial(record, 18, "3.0.0")
    assert record["trial"]["slot"] == "a"
    assert record["versions"] == {"a": "3.0.0", "b": "2.0.0"}
    assert boot.select(record, 3) == ("a", True)


def test_records_round_trip_through_json_files(tmp_path):
    path = str(tmp_path / "boot.json")
    assert fsutil.read_json(path) is None
    assert fsutil.read_json(path, {"x": 1}) == {"x": 1}
    record = boot.new_record("1.0.0")
    fsutil.write_json(path, record)
    assert fsutil.read_json(path) == record
    boot.set_trial(record, 17, "2.0.0")
    fsutil.write_json(path, record)
    assert fsutil.read_json(path) == record
    # A reboot loop: each boot reads the record, selects, persists before running the app.
    seen = []
    for _ in range(4):
        rec = fsutil.read_json(path)
        seen.append(boot.select(rec, 3))
        boot.trial_failed(rec, "crashed")
        fsutil.write_json(path, rec)
    assert seen == [("b", True)] * 3 + [("a", False)]
    final = fsutil.read_json(path)
    assert final["trial"] is None and final["versions"]["b"] is None
    assert final["report"]["state"] == P.REVERTED and "crashed" in final["report"]["reason"]
    assert sorted(os.listdir(tmp_path)) == ["boot.json"]  # no temp file left behind
    # A damaged file reads as the default, not as an exception.
    (tmp_path / "boot.json").write_text('{"active": "a", "vers')
    assert fsutil.read_json(path, "default") == "default"


def test_write_json_replaces_atomically(tmp_path):
    path = str(tmp_path / "boot.json")
    fsutil.write_json(path, {"n": 1})
    (tmp_path / "boot.json.tmp").write_text("half a fil")  # debris of a cut write
    fsutil.write_json(path, {"n": 2})
    assert fsutil.read_json(path) == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["boot.json"]


# ---- one sequence, both interpreters -------------------------------------------------------------

SEQUENCE = r"""
import json
from fota.device import boot, fsutil
out = []
def step(label, value):
    out.append([label, json.loads(json.dumps(value))])  # a snapshot, not a live reference
path = "boot.json"
rec = boot.new_record("1.0.0")
fsutil.write_json(path, rec)
rec = fsutil.read_json(path)
step("plain", list(boot.select(rec, 2)))
boot.set_trial(rec, 17, "2.0.0")
fsutil.write_json(path, rec)
for i in range(3):
    rec = fsutil.read_json(path)
    sel = boot.select(rec, 2)
    boot.trial_failed(rec, "boot %d failed" % i)
    fsutil.write_json(path, rec)
    step("boot%d" % i, [list(sel), rec["trial"] and rec["trial"]["tries"]])
rec = fsutil.read_json(path)
step("reverted", rec)
boot.set_trial(rec, 18, "2.0.1")
step("trial", [list(boot.select(rec, 2)), rec["trial"]["slot"], rec["report"]])
boot.confirm(rec, {"job": 18, "state": "confirmed", "code": None, "reason": None})
fsutil.write_json(path, rec)
rec = fsutil.read_json(path)
step("confirmed", [list(boot.select(rec, 2)), rec])
print("RESULT " + json.dumps(out))
"""


def _result(stdout: str):
    lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    assert lines, stdout
    return json.loads(lines[0][len("RESULT "):])


def _cpython(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        import contextlib
        import io
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(SEQUENCE, {})
        return _result(buf.getvalue())
    finally:
        os.chdir(cwd)


def test_sequence_under_micropython(tmp_path):
    (tmp_path / "cp").mkdir()
    (tmp_path / "mp").mkdir()
    expected = _cpython(tmp_path / "cp")
    steps = dict(expected)
    # The expectations hold on CPython ...
    assert steps["plain"] == ["a", False]
    assert steps["boot0"] == [["b", True], 1]
    assert steps["boot1"] == [["b", True], 2]
    assert steps["boot2"] == [["a", False], None]
    rev = steps["reverted"]
    assert rev["active"] == "a" and rev["trial"] is None and rev["versions"] == {"a": "1.0.0", "b": None}
    assert rev["report"]["state"] == "reverted" and rev["report"]["code"] == "E_HEALTH"
    assert rev["report"]["job"] == 17 and "2" in rev["report"]["reason"]
    assert "boot 1 failed" in rev["report"]["reason"]
    assert steps["trial"] == [["b", True], "b", None]
    sel, conf = steps["confirmed"]
    assert sel == ["b", False] and conf["active"] == "b" and conf["trial"] is None
    assert conf["versions"] == {"a": "1.0.0", "b": "2.0.1"}
    assert conf["report"] == {"job": 18, "state": "confirmed", "code": None, "reason": None}
    # ... and MicroPython produces exactly the same records.
    proc = run_micropython(SEQUENCE, cwd=str(tmp_path / "mp"))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert _result(proc.stdout) == expected
    assert sorted(os.listdir(tmp_path / "mp")) == ["boot.json"]
    with open(tmp_path / "mp" / "boot.json") as f:
        assert json.load(f) == conf

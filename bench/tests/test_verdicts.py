"""The benches' verdicts: a bench whose run fails exits non-zero (a missed target does not), and the
fault benches count a lost status or a bricked device as a failed case (fota.testkit.faults)."""
import json
from pathlib import Path

import pytest

from bench import delta, e2e, fleet as fleet_bench, netfaults, powercut, restarts


def test_powercut_counts_a_seq_gap_as_a_lost_status_and_a_failed_case():
    row = powercut.Row("sim", "update", "download", 10)
    out = {"ok": True, "bricked": None, "lost": 0, "resent": 0, "problems": [], "statuses": [[7, 1, 1], [7, 1, 2]]}
    row.add({"cut_at": [1], "torn_at": []}, out, 0.01)
    row.add({"cut_at": [2], "torn_at": []}, dict(out, statuses=[[7, 1, 1], [7, 1, 3], [7, 2, 1]]), 0.01)
    # a device that started over (a new epoch) numbers boot 1 again: no gap in either epoch
    row.add({"cut_at": [3], "torn_at": []}, dict(out, statuses=[[7, 1, 1], [7, 1, 2], [7, 1, 3], [9, 1, 1]]), 0.01)
    assert (row.cases, row.passed, row.lost) == (3, 2, 1)
    assert row.failures[0]["gaps"] == [[7, 1, 2]]


def test_powercut_bench_runs_the_board_backends_and_names_them(tmp_path, capsys):
    out = tmp_path / "pc.json"
    assert powercut.main(["--backends", "esp32,files", "--scenarios", "delta", "--image-kib", "2",
                          "--chained", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {r["backend"] for r in doc["rows"]} == {"esp32", "files"}
    assert sorted(doc["clean"]) == ["esp32/delta", "files/delta"]
    assert doc["totals"]["cases"] == doc["totals"]["passed"] > 0 and doc["totals"]["bricked"] == 0
    assert "set_boot" in doc["clean"]["esp32/delta"]["kinds"] and "rename" in doc["clean"]["files/delta"]["kinds"]
    with pytest.raises(SystemExit):
        powercut.parse_args(["--backends", "esp8266"])


def test_restarts_bench_exits_1_when_a_case_fails_and_0_when_all_pass(tmp_path):
    ok = tmp_path / "ok.json"
    assert restarts.main(["--faults", "none", "--devices", "1", "--out", str(ok)]) == 0
    [case] = json.loads(ok.read_text())["cases"]
    assert case["confirmed"] == case["updated"] == 1 and case["bricked"] == case["lost_statuses"] == 0
    # Too short to finish the update: the case fails, and so does the run (it used to exit 0).
    failed = tmp_path / "failed.json"
    assert restarts.main(["--faults", "none", "--devices", "1", "--timeout", "0.3", "--out", str(failed)]) == 1
    [case] = json.loads(failed.read_text())["cases"]
    assert not case["finished"] and case["bricked"] == 0


def _corpus(directory: Path) -> Path:
    directory.mkdir()
    old = bytes(range(256)) * 64
    (directory / "a.bin").write_bytes(old)
    (directory / "b.bin").write_bytes(old[:8000] + b"new code" * 20 + old[8160:])
    return directory


def test_delta_bench_fails_when_a_requested_reference_tool_is_missing(tmp_path, monkeypatch):
    corpus = _corpus(tmp_path / "corpus")
    common = ["--corpus", str(corpus), "--windows", "10", "--target-wbits", "10", "--skip-heap", "--skip-agent"]
    out = tmp_path / "delta.json"
    assert delta.main(common + ["--refs", "bsdiff4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["failures"] == []
    monkeypatch.setenv("PATH", str(tmp_path))  # no xdelta3 on it
    assert delta.main(common + ["--refs", "bsdiff4,xdelta3", "--out", str(out)]) == 1
    [failure] = json.loads(out.read_text())["failures"]
    assert "xdelta3" in failure and "not installed" in failure


def test_e2e_and_fleet_failures_are_failed_runs_not_missed_targets():
    run = {"fota": {"devices": 5, "confirmed": 5}, "floor": {"complete": True}, "ratio": 9.0}  # target missed
    assert e2e.failures({"runs": [run], "heap": {"smallest_ok_kib": 200}}) == []
    assert e2e.failures({"runs": [dict(run, fota={"devices": 5, "confirmed": 4})]}) == ["N=5: 4/5 jobs confirmed"]
    assert e2e.failures({"runs": [], "heap": {"smallest_ok_kib": None}}) == ["heap search: no heap passed a full update"]
    deploy = {"devices": 1000, "fota": {"confirmed": 1000, "wall_s": 30.0}, "floors": {"paho": {"wall_s": 1.0}}}
    assert fleet_bench.failures({"deploy": [deploy], "ingest": [{"db": "sqlite", "ratio": 0.1}], "workers": []}) == []
    broken = {"deploy": [dict(deploy, fota={"confirmed": 990, "wall_s": None, "error": "not all confirmed"})],
              "ingest": [{"db": "postgres", "error": "TimedOut: 20000 statuses stored"}],
              "workers": [{"workers": 2, "devices": 1000, "confirmed": 999}]}
    assert fleet_bench.failures(broken) == ["deploy N=1000, fota: not all confirmed",
                                            "ingest postgres: TimedOut: 20000 statuses stored",
                                            "2 worker(s): 999/1000 confirmed"]


def test_netfaults_run_passes_only_with_every_device_confirmed_verified_and_nothing_lost():
    case = {"devices": 2, "confirmed": 2, "verified": 2, "bricked": 0, "lost_statuses": 0, "superseded_health": 3}
    assert netfaults.passed([case])  # health reports dropped unsent are not lost statuses
    assert not netfaults.passed([])  # no case ran
    assert not netfaults.passed([case, dict(case, lost_statuses=1)])
    assert not netfaults.passed([dict(case, bricked=1)])
    assert not netfaults.passed([dict(case, verified=1)])

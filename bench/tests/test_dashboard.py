"""Sampled run of bench/dashboard.py (the full run is `./run bench dashboard`)."""
import json

from bench import dashboard


def test_dashboard_bench_times_every_page_on_a_small_fleet(tmp_path):
    out = tmp_path / "dashboard.json"
    assert dashboard.main(["--devices", "120", "--history", "3", "--db", "sqlite", "--requests", "5",
                           "--warmup", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failures"] == []
    assert [r["page"] for r in report["results"]] == ["devices", "devices deep", "devices filter", "device", "campaign"]
    assert all(r["requests"] == 5 and 0 < r["median_ms"] <= r["p95_ms"] <= r["max_ms"] for r in report["results"])


def test_dashboard_bench_exits_non_zero_when_a_run_fails(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("GET /ui/devices answered 500")
    monkeypatch.setattr(dashboard, "run_db", broken)
    out = tmp_path / "dashboard.json"
    assert dashboard.main(["--devices", "10", "--db", "sqlite", "--out", str(out)]) == 1
    assert json.loads(out.read_text())["failures"] == ["sqlite: RuntimeError: GET /ui/devices answered 500"]

"""Sampled run of bench/scale.py (the full size is `./run bench scale`)."""
import json

import pytest

from bench import scale

pytest.importorskip("nats")
pytestmark = pytest.mark.postgres


def test_scale_benchmark_sampled(tmp_path):
    """bench/scale.py end to end at 2 processes x 100 devices: every device connected with its
    session, the updating share confirmed, every unit cost measured and set against the model."""
    out = tmp_path / "scale.json"
    assert scale.main(["--broker", "nats", "--awake-pct", "100", "--wakers", "0", "--connect-rate", "50",
                       "--devices", "200", "--processes", "2", "--updating-pct", "5", "--statuses", "300",
                       "--idle-s", "1", "--image-kib", "16", "--timeout", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    run, u = result["run"], result["units"]
    assert run["update"]["devices"] == 10 and run["update"]["confirmed"] == 10, run["update"]
    assert run["sim"]["confirmed"] == 10 and not run["sim"]["errors"], run["sim"]
    assert u["chunks_per_update"] == 8, u  # 16 KiB in 2 KiB chunks, none re-sent
    assert u["statuses_per_update"] >= 3 and u["db_rows_per_update"] >= 1 and u["db_bytes_per_update_postgres"] > 0, u
    assert u["broker_rss_kib_per_session_with_account"] > 0 and u["center_cpu_ms_per_status"] > 0, u
    assert run["ingest"]["statuses"] == 300
    # who was busy: the publisher's timeline, the center's batches; the drain run's center alone
    ing, drain = run["ingest"], run["drain"]
    assert 0 < ing["publisher"]["handed_s"] <= ing["publisher"]["acked_s"] and ing["publisher"]["cpu_s"] > 0, ing
    assert ing["split"]["batches"] >= 1 and ing["split"]["batch_write_s"] > 0, ing["split"]
    assert ing["split"]["center_threads"]["db"]["cpu_s"] > 0 and ing["split"]["machine_busy_s"] > 0, ing["split"]
    assert drain["statuses"] == 300 and drain["split"]["batches"] >= 1 and drain["duplicates"] == 0, drain
    assert u["statuses_per_second_drain"] > 0 and u["statuses_per_second_offered"] > 0, u
    ratios = {c["key"]: c["ratio"] for c in result["comparison"]}
    assert ratios["chunks_per_update"] is not None and ratios["center_cpu_ms_per_update"] is not None


def test_scale_sleepers_and_wakers_sampled(tmp_path):
    """Sleepers nap for good and wakers wake after the deployment started, each nap announced
    (the retained `online 0` first, as a board): every device's first connection is counted in
    the store although the sleepers show offline, and the wakers' updates, held by the center
    while they slept, are confirmed once they are back."""
    out = tmp_path / "scale.json"
    assert scale.main(["--broker", "mosquitto", "--devices", "60", "--awake-pct", "50", "--wakers", "5",
                       "--wake-s", "5", "--processes", "3", "--updating-pct", "5", "--statuses", "0",
                       "--idle-s", "1", "--image-kib", "16", "--connect-rate", "50", "--timeout", "120",
                       "--out", str(out)]) == 0
    run = json.loads(out.read_text())["run"]
    assert run["groups"] == {"sleepers": 25, "wakers": 5, "awake": 30}, run["groups"]
    assert run["never_online"] == {"sleepers": 0, "awake": 0, "wakers": 0}, run["never_online"]
    up = run["update"]
    assert up["devices"] == 8 and up["confirmed"] == 8 and up["wakers_confirmed"] == 5, up


def test_scale_refuses_a_fleet_the_open_files_limit_cannot_hold(tmp_path):
    """More devices per node than the open-files limit allows: the run stops before starting
    anything and says why (exit 1)."""
    out = tmp_path / "scale.json"
    assert scale.main(["--devices", "10000000", "--processes", "1000", "--out", str(out)]) == 1
    result = json.loads(out.read_text())
    assert "run" not in result
    assert any("open-files limit" in f for f in result["failures"]), result["failures"]

"""Sampled run of bench/fleet.py (the full sizes are `./run bench fleet`)."""
import json

import pytest

from bench import fleet as bench_fleet


def test_fleet_benchmark_sampled(tmp_path):
    """bench/fleet.py end to end at a sample size: both parts produce their numbers and JSON."""
    out = tmp_path / "fleet.json"
    assert bench_fleet.main(["--devices", "30", "--image-kib", "8", "--statuses", "600", "--ingest-devices", "50",
                             "--db", "sqlite", "--timeout", "120", "--workers-devices", "30",
                             "--skip-transports", "--brokers", "", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (deploy,) = result["deploy"]
    assert deploy["fota"]["confirmed"] == 30 and deploy["fota"]["wall_s"] > 0, deploy
    assert deploy["fota"]["sim"]["versions"] == {"2.0.0": 30}
    for kind in ("paho", "raw"):  # the target's floor (bare paho clients) and the stricter one
        assert deploy["floors"][kind]["wall_s"] > 0 and deploy["ratios"][kind] > 0, deploy["floors"]
    (ingest,) = result["ingest"]
    assert ingest["statuses"] == 600 and ingest["fota_rate"] > 0 and ingest["floor_rate"] > 0, ingest
    assert ingest["job_states"] == {"downloading": 50}
    assert ingest["publisher"]["offered_rate"] > 0 and ingest["split"]["batches"] >= 1, ingest
    assert ingest["drain"]["statuses"] == 600 and ingest["drain"]["duplicates"] == 0, ingest["drain"]
    assert [(w["workers"], w["confirmed"], w.get("error")) for w in result["workers"]] == [(1, 30, None), (2, 30, None)]


def test_fleet_benchmark_transports_sampled(tmp_path):
    """Part 4 alone at a sample size: the same fleet updated over mqtt, then http; the broker
    carries the image (both ways) over mqtt and not over http, which the blob server serves."""
    out = tmp_path / "fleet.json"
    image = 32 * 1024
    assert bench_fleet.main(["--skip-deploy", "--skip-ingest", "--workers", "", "--transport-devices", "40",
                             "--transport-image-kib", "32", "--transport-sim-devices", "25", "--transports", "mqtt,http,static",
                             "--brokers", "", "--timeout", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    mqtt, http, static = result["transports"]
    assert (mqtt["transport"], http["transport"], http["sim_processes"]) == ("mqtt", "http", 2)
    assert mqtt["confirmed"] == http["confirmed"] == 40 and mqtt["wall_s"] > 0 and http["wall_s"] > 0
    # mqtt: every chunk in from the center and out to its device, at least
    assert mqtt["broker_bytes_per_update"] > 2 * image and mqtt["center"]["chunks"] >= 40 * 16, mqtt
    assert mqtt["sim"]["http_requests"] == 0 and mqtt["resent_pct"] is not None
    # http: no chunk through the broker; one ranged GET per device; a small fraction of the image
    assert http["center"]["chunks"] == 0 and http["sim"]["chunks"] == 0, http
    assert http["sim"]["http_requests"] == 40 and http["sim"]["http_chunks"] == 40 * 16, http["sim"]
    assert http["broker_bytes_per_update"] < mqtt["broker_bytes_per_update"] / 4, (http, mqtt)
    assert http["blob_server_cpu_s"] > 0 and http["blob_requests_per_s"] > 0
    # static: the same over a static server's plain URLs
    assert static["confirmed"] == 40 and static["center"]["chunks"] == 0 and static["sim"]["http_requests"] >= 40


def test_fleet_brokers_sampled(tmp_path):
    """Part 5 (--brokers) at a sample size: the same deployment on one Mosquitto and on a 3-node
    NATS cluster, every device confirmed on both, no chunk sent twice, each broker's CPU counted
    (NATS: the sum of its 3 processes), and statuses stored on both."""
    pytest.importorskip("nats")
    out = tmp_path / "fleet.json"
    assert bench_fleet.main(["--skip-deploy", "--skip-ingest", "--workers", "", "--brokers", "mosquitto,nats", "--skip-transports",
                             "--brokers-devices", "30", "--brokers-statuses", "300", "--image-kib", "8",
                             "--timeout", "120", "--out", str(out)]) == 0
    part = json.loads(out.read_text())["brokers"]
    deploy = {r["broker"]: r for r in part["deploy"]}
    assert set(deploy) == {"mosquitto", "nats"}
    for kind, r in deploy.items():
        assert r["confirmed"] == 30 and r["sim"]["versions"] == {"2.0.0": 30}, (kind, r)
        assert r["chunks_needed"] == 30 * 4 and r["chunks"] >= r["chunks_needed"], (kind, r)
        # CPU is read in 10 ms ticks: Mosquitto may serve 30 small updates within one
        assert r["statuses"] >= 30 * 3 and r["broker_cpu_s"] >= 0 and r["wall_s"] > 0, (kind, r)
    assert deploy["nats"]["broker_cpu_s"] > 0, deploy["nats"]
    # NATS's memory is that of 3 processes, each with JetStream: more than one Mosquitto's
    assert deploy["nats"]["broker_rss_connected_mib"] > deploy["mosquitto"]["broker_rss_connected_mib"]
    ingest = {r["broker"]: r for r in part["ingest"]}
    assert {k: (r["statuses"], r["duplicates"]) for k, r in ingest.items()} == {"mosquitto": (300, 0), "nats": (300, 0)}
    assert all(r["rate"] > 0 and r["center_cpu_s"] > 0 for r in ingest.values()), ingest

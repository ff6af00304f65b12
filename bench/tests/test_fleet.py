"""Sampled run of bench/fleet.py (the full sizes are `./run bench fleet`)."""
import json

from bench import fleet as bench_fleet


def test_fleet_benchmark_sampled(tmp_path):
    """bench/fleet.py end to end at a sample size: both parts produce their numbers and JSON."""
    out = tmp_path / "fleet.json"
    assert bench_fleet.main(["--devices", "30", "--image-kib", "8", "--statuses", "600", "--ingest-devices", "50",
                             "--db", "sqlite", "--timeout", "120", "--workers-devices", "30",
                             "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (deploy,) = result["deploy"]
    assert deploy["fota"]["confirmed"] == 30 and deploy["fota"]["wall_s"] > 0, deploy
    assert deploy["fota"]["sim"]["versions"] == {"2.0.0": 30}
    for kind in ("paho", "raw"):  # the target's floor (bare paho clients) and the stricter one
        assert deploy["floors"][kind]["wall_s"] > 0 and deploy["ratios"][kind] > 0, deploy["floors"]
    (ingest,) = result["ingest"]
    assert ingest["statuses"] == 600 and ingest["fota_rate"] > 0 and ingest["floor_rate"] > 0, ingest
    assert ingest["job_states"] == {"downloading": 50}
    assert [(w["workers"], w["confirmed"], w.get("error")) for w in result["workers"]] == [(1, 30, None), (2, 30, None)]

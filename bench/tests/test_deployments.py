"""Sampled run of bench/deployments.py (the full sweep is `./run bench deployments`)."""
import json

from bench import deployments


def test_deployments_bench_runs_a_small_fleet(tmp_path):
    out = tmp_path / "deployments.json"
    assert deployments.main(["--devices", "1500", "--backends", "sqlite", "--sqlite-max-variables", "1200",
                             "--out", str(out)]) == 0
    [result] = json.loads(out.read_text())["results"]
    assert result["ok"] and result["jobs"] == 3000
    assert all(isinstance(result[step], float) for step in ("create_ids", "create_tag", "mark_sent", "refresh",
                                                            "expire"))

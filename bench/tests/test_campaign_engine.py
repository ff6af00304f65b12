"""Sampled run of bench/campaign_engine.py (the full sweep is `./run bench campaign_engine`)."""
import json

from bench import campaign_engine


def test_campaign_engine_bench_runs_a_small_fleet_to_done(tmp_path):
    out = tmp_path / "campaign_engine.json"
    assert campaign_engine.main(["--devices", "120", "--backends", "sqlite", "--out", str(out)]) == 0
    [result] = json.loads(out.read_text())["results"]
    assert result["state"] == "done" and result["succeeded"] == 120
    # waves 1/10/50/100 %: one step per wave plus the one that finds the last wave settled
    assert result["ticks"] == 5 and result["floor_s"] > 0

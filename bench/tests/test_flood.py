"""Sampled run of bench/flood.py (the full size is `./run bench flood`): a hostile device floods
60 KB statuses and small valid ones while a few simulated devices update."""
import json

from bench import flood
from fota.server.statuses import StatusLimiter


def test_flood_bench_bounds_what_a_hostile_device_stores(tmp_path):
    out = tmp_path / "flood.json"
    assert flood.main(["--devices", "20", "--hostile-statuses", "1500", "--small-every", "3",
                       "--image-kib", "8", "--max-packet", "131072", "--repeat", "1", "--timeout", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    base, attacked = result["runs"]
    assert base["confirmed"] == attacked["confirmed"] == 20
    hostile = attacked["hostile"]
    assert hostile["acked"] == hostile["sent"] == 1500          # every status acknowledged
    # the 60 KB ones: over the center's MQTT 5 Maximum Packet Size, the broker never sends them
    assert hostile["discarded"] == 1000 and hostile["refused"] == 0
    # the 500 small ones: at most the burst and the refill over the run
    limiter = StatusLimiter()
    assert hostile["stored"] <= limiter.burst + limiter.rate * (max(attacked["wall_s"], hostile["wall_s"]) + 5)
    assert hostile["stored"] + hostile["rate_limited"] == 500 and hostile["rate_limited"] > 0
    assert result["summary"][1]["verdict"]["hostile_growth_mb"] < flood.TARGET_GROWTH_MB

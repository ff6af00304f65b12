"""Sampled run of bench/capacity.py (the full sizes are `./run bench capacity`)."""
import json

from bench import capacity


def test_capacity_benchmark_sampled(tmp_path):
    """bench/capacity.py end to end at a sample size: every unit cost measured, each within sane bounds."""
    out = tmp_path / "capacity.json"
    assert capacity.main(["--devices", "30", "--image-kib", "16", "--statuses", "300", "--ingest-devices", "30",
                          "--idle-s", "0.5", "--ranges", "50", "--timeout", "120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    u = result["units"]
    assert [d["confirmed"] for d in result["sessions"]["deploy"]] == [30, 30]
    assert u["chunks_per_update"] == 8 and u["bytes_published_per_update"] >= 16 * 1024, u  # 16 KiB in 2 KiB chunks
    assert 0 < u["center_cpu_ms_per_status"] < 50, u
    assert u["statuses_per_update"] >= 3 and u["db_rows_per_update"] >= 1, u  # a job and its statuses at least
    assert u["db_bytes_per_update"] > 0, u
    assert 0 < u["broker_rss_kib_per_session"] < 1024, u
    assert 0 < u["http_cpu_ms_per_range"] < 1000 and result["http"]["bytes"] == 50 * 16 * 1024, result["http"]
    assert u["center_cpu_s_per_update"] > 0 and u["broker_cpu_s_per_update"] > 0, u

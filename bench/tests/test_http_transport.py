"""Sampled run of bench/http_transport.py (the full size is `./run bench http_transport`)."""
import json

from bench import http_transport


def test_http_transport_bench_moves_the_payload_off_the_broker(tmp_path):
    out = tmp_path / "http_transport.json"
    assert http_transport.main(["--devices", "1", "--image-kib", "128", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["confirmed"] for r in result["runs"]] == [1, 1]
    mqtt, http = result["summary"]["mqtt"], result["summary"]["http"]
    assert mqtt["broker_percent_of_image"] > 100 and mqtt["blob_requests_per_update"] == 0
    # Over http the broker carries the command, statuses and the reconnect after the reboot: a
    # few KB whatever the image size (the 2 % target is for the bench's 256 KiB default).
    assert http["broker_bytes_per_update"] < 8192 and http["broker_bytes_per_update"] * 10 < mqtt["broker_bytes_per_update"]
    assert http["blob_requests_per_update"] == 2  # 128 KiB in 64 KiB ranges

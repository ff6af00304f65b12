"""Sampled run of bench/agent_blocking.py (the board runner's longest steps as its app sees them)."""
import json

from bench import agent_blocking


def test_agent_blocking_sampled(tmp_path):
    out = tmp_path / "agent_blocking.json"
    assert agent_blocking.main(["--image-kib", "48", "--idle-s", "0.5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["run"]["state"] == "confirmed" and result["run"]["exits"] == [4], result["run"]
    kinds = result["summary"]["kinds"]
    # Every kind of work of an update was seen and timed: 48 KiB in 2 KiB chunks = 24+ chunks.
    assert kinds["chunk"]["count"] >= 24 and kinds["write"]["count"] >= 24, kinds
    for kind in ("connect", "command", "journal", "install step", "boot", "step idle", "step update"):
        assert kinds[kind]["count"] >= 1 and kinds[kind]["max_ms"] > 0, (kind, kinds)
    assert result["summary"]["verdict"] in ("met", "MISSED") and result["failures"] == []

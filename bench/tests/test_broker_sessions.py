"""Sampled run of bench/broker_sessions.py (the full size is `./run bench broker_sessions`).

The RabbitMQ cluster takes 20-30 s to start on this machine (three Erlang VMs, two joins), so
the sampled run is one small size per broker; NATS is covered by tests/test_natscluster.py and
the fleet bench's own test."""
import json

import pytest

from bench import broker_sessions
from fota.testkit.rabbitcluster import available


@pytest.mark.skipif(not available(), reason="rabbitmq-server (Debian) not installed")
def test_broker_sessions_sampled(tmp_path):
    """20 persistent sessions on Mosquitto and on a 3-node RabbitMQ cluster: all connect, each
    gets its QoS 1 command, memory per session is measured; on RabbitMQ a SIGKILLed node's
    devices reconnect to another node and every device gets the message published after the kill."""
    out = tmp_path / "sessions.json"
    assert broker_sessions.main(["--brokers", "mosquitto,rabbitmq", "--sessions", "20", "--idle-s", "1",
                                 "--timeout", "90", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failures"] == []
    runs = {r["broker"]: r for r in result["runs"]}
    for r in runs.values():
        assert r["connected"] == 20 and r["delivered"] == 20, r
        assert r["rss_kib_connected"] > 0 and r["rss_kib_before"] > 0, r  # per session: noise at 20 on Erlang
        assert r["deliver_s"] > 0 and r["connect_s"] > 0, r
    assert "kill" not in runs["mosquitto"]
    kill = runs["rabbitmq"]["kill"]
    assert kill["got"] == 20 and kill["devices_on_killed_node"] == 7, kill
    assert kill["dropped"] >= 7 and kill["reconnected"] == kill["dropped"], kill


def test_unknown_broker_fails_the_run(tmp_path):
    out = tmp_path / "sessions.json"
    assert broker_sessions.main(["--brokers", "kafka", "--sessions", "5", "--out", str(out)]) == 1
    assert any("unknown broker" in f for f in json.loads(out.read_text())["failures"])

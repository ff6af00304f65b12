"""fota.gmqtt_adapter: the raw PUBLISH packets, and the check that gmqtt still has what it uses."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from gmqtt import Message
from gmqtt.mqtt.connection import MQTTConnection
from gmqtt.mqtt.constants import MQTTv50
from gmqtt.mqtt.package import PublishPacket

from fota import gmqtt_adapter
from fota.device import protocol


@pytest.mark.parametrize("size", [0, 1, 8, 119, 2056, 16392, 70000])
def test_chunk_packets_are_what_gmqtt_would_send(size):
    """The chunk server writes a window of QoS 0 PUBLISH packets at once, encoded by the adapter:
    byte for byte gmqtt's MQTT 5 encoding (remaining lengths of 1 to 3 bytes)."""
    class Protocol:
        proto_ver = MQTTv50
    topic, payload = protocol.topic("dev-1", protocol.DATA), os.urandom(size)
    _, expected = PublishPacket.build_package(Message(topic, payload, qos=0), Protocol)
    assert gmqtt_adapter.publish_packet(topic.encode(), payload) == bytes(expected)


def test_the_installed_gmqtt_is_the_one_pinned_for_the_adapter():
    from importlib.metadata import version
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert f'"gmqtt=={gmqtt_adapter.GMQTT_VERSION}"' in pyproject
    assert version("gmqtt") == gmqtt_adapter.GMQTT_VERSION


def test_a_gmqtt_without_the_private_api_fails_at_import_with_the_version_to_pin(monkeypatch):
    gmqtt_adapter._check_import()  # the installed one passes
    monkeypatch.delattr(MQTTConnection, "send_package")
    with pytest.raises(gmqtt_adapter.GmqttChanged, match=r"MQTTConnection.send_package.*gmqtt==0\.8\.0"):
        gmqtt_adapter._check_import()


def test_a_connected_client_without_a_connection_fails_the_connect_check():
    from gmqtt import Client
    with pytest.raises(gmqtt_adapter.GmqttChanged, match="_connection.send_package"):
        gmqtt_adapter.check_connected(Client("never-connected"))  # _connection is None until connected


@pytest.mark.parametrize("quiet", [False, True])
def test_a_loop_ending_while_gmqtt_waits_to_reconnect_logs_no_traceback_with_the_filter(tmp_path, caplog, quiet):
    """Ctrl-C on `fota serve --workers N` stops the broker and the workers at once: a worker whose
    connection dropped ends its loop while gmqtt's reconnect task waits, and asyncio logged the
    CancelledError of gmqtt's done-callback as an "Exception in callback" with a traceback. The
    center installs quiet_cancelled_reconnects; without it the traceback is there (the first case)."""
    import asyncio
    import logging

    from gmqtt import Client

    from fota.server.broker import SERVER_USER
    from fota.testkit.broker import ManagedBroker

    broker = ManagedBroker(tmp_path / "mosquitto")
    caplog.set_level(logging.ERROR, logger="asyncio")

    async def main():
        if quiet:
            gmqtt_adapter.quiet_cancelled_reconnects(asyncio.get_running_loop())
        client = Client("fota:w:test")
        client.set_auth_credentials(SERVER_USER, broker.users[SERVER_USER])
        client.reconnect_delay = 30
        await client.connect(broker.host, broker.service_port, version=MQTTv50)
        broker.stop()
        for _ in range(100):
            if not client.is_connected:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # gmqtt's reconnect task now waits for its delay
    try:
        asyncio.run(main())
    finally:
        broker.stop()
    alarms = [r for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert bool(alarms) is not quiet, [r.getMessage() for r in alarms]

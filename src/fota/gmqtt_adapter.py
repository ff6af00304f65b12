"""The one module that uses gmqtt's private API (gmqtt is pinned in pyproject.toml for it).

Two things fota needs that gmqtt's public API does not offer:

* ``publish_qos0(client, topic, payloads)``: the control center's chunk server writes a whole
  window of chunks as MQTT 5 PUBLISH packets (QoS 0) encoded here, in one write to the client's
  connection (``client._connection.send_package``). gmqtt's ``client.publish`` builds a Message,
  encodes a packet and writes it, for every chunk. What that buys, measured by
  ``./run bench gmqtt_publish`` (bench/README.md; both paths in the same run, on Mosquitto over
  loopback, 2 KiB chunks in windows of 8 to 1,000 device topics, medians of 5): the event loop
  spends 10.2 µs of CPU per chunk with ``client.publish`` and 4.0 µs with this path (4.96 and
  1.95 CPU ms per MB of chunks: 2.5x less). A 64 KiB image to 10,000 devices is 320,000 chunks:
  about 2 s of the center's event-loop CPU, the loop that also takes every status and request.
* ``wait_acked(client)``: until the broker acknowledged every QoS 1 message the client sent
  (gmqtt's in-flight store, ``client._persistent_storage``). The simulator holds a reboot until
  its statuses were acknowledged, as the device's blocking QoS 1 publish does.
* ``unacked(client)``: the QoS 1 messages still in that store, as (topic, payload, retain). The
  simulator makes a new client for every connection; what the broker had not acknowledged when
  a connection died is published again on the next one, as the device does (docs/protocol.md §9).

The attributes used are checked when this module is imported and when a client connects: a
gmqtt without them fails there with the version fota was written for, not with an
AttributeError in the middle of a deployment.
"""
from __future__ import annotations

from asyncio import CancelledError

from gmqtt import Client

GMQTT_VERSION = "0.8.0"   # the version pinned in pyproject.toml (dependencies)


class GmqttChanged(RuntimeError):
    """The installed gmqtt lacks a private attribute this module uses."""


def _changed(what: str) -> GmqttChanged:
    try:
        from importlib.metadata import version
        installed = version("gmqtt")
    except Exception:  # not installed as a distribution (a source checkout)
        installed = "unknown"
    return GmqttChanged(f"gmqtt {installed} has no {what}: fota uses it through fota.gmqtt_adapter, "
                        f"written for gmqtt=={GMQTT_VERSION} (install that version, or adapt the adapter)")


def _check_import() -> None:
    from gmqtt.mqtt.connection import MQTTConnection
    if not callable(getattr(MQTTConnection, "send_package", None)):
        raise _changed("MQTTConnection.send_package")
    probe = Client("fota-gmqtt-adapter-probe")
    if "_connection" not in vars(probe):
        raise _changed("Client._connection")
    for method in ("wait_empty", "get_all"):
        if not callable(getattr(getattr(probe, "_persistent_storage", None), method, None)):
            raise _changed("Client._persistent_storage." + method)


_check_import()


def check_connected(client: Client) -> None:
    """Raise GmqttChanged if a connected client cannot take raw packets."""
    if not callable(getattr(getattr(client, "_connection", None), "send_package", None)):
        raise _changed("Client._connection.send_package on a connected client")


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """An MQTT 5 PUBLISH packet: QoS 0, no retain, no properties (MQTT 5.0 §3.3)."""
    length = 2 + len(topic) + 1 + len(payload)  # topic length, topic, properties length 0, payload
    header = bytearray(b"\x30")
    while True:
        length, byte = divmod(length, 128)
        header.append(byte | 0x80 if length else byte)
        if not length:
            break
    return b"".join((header, len(topic).to_bytes(2, "big"), topic, b"\0", payload))


def publish_qos0(client: Client, topic: str, payloads: list[bytes]) -> None:
    """Publish payloads to one topic at QoS 0 (MQTT 5), in order, in one write.

    The client must have connected with MQTT 5 (the packets carry a properties length)."""
    name = topic.encode()
    client._connection.send_package(b"".join([publish_packet(name, payload) for payload in payloads]))


async def wait_acked(client: Client) -> None:
    """Return once the broker acknowledged every QoS 1 (and 2) message the client published."""
    await client._persistent_storage.wait_empty()


def unacked(client: Client) -> list[tuple[str, bytes, bool]]:
    """The QoS 1 messages an MQTT 3.1.1 client published that the broker has not acknowledged
    (PUBACK), oldest first, as (topic, payload, retain), read back from their stored packets."""
    return [publish_fields(packet) for _, packet in client._persistent_storage.get_all()]


def publish_fields(packet: bytes) -> tuple[str, bytes, bool]:
    """(topic, payload, retain) of a stored MQTT 3.1.1 QoS 1 PUBLISH packet, as gmqtt keeps it."""
    i = 1
    while packet[i] & 0x80:  # remaining length (varint)
        i += 1
    i += 1
    tlen = int.from_bytes(packet[i:i + 2], "big")
    topic = packet[i + 2:i + 2 + tlen].decode()
    # then the packet id (2 bytes); MQTT 3.1.1 has no properties
    return topic, bytes(packet[i + 2 + tlen + 2:]), bool(packet[0] & 0x01)


def quiet_cancelled_reconnects(loop) -> None:
    """Drop one known false alarm from the loop's error log. When the connection drops, gmqtt
    starts a reconnect task with a done-callback (MqttPackageHandler._handle_exception_in_future)
    that calls future.exception(); if the loop ends while that task waits for its reconnect delay
    (a worker stopped by the same Ctrl-C that stopped the broker), asyncio cancels the task and the
    callback raises CancelledError, which asyncio logs with a traceback as an "Exception in
    callback". Nothing failed. Every other error goes to the handler that was there before."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_gmqtt", False):
        return  # installed by an earlier center on this loop (the workers' tests run several)

    def handler(loop, context):
        handle = context.get("handle")
        callback = getattr(getattr(handle, "_callback", None), "func", None)  # a functools.partial
        if isinstance(context.get("exception"), CancelledError) and \
                getattr(callback, "__qualname__", "") == "MqttPackageHandler._handle_exception_in_future":
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)
    handler.quiets_gmqtt = True
    loop.set_exception_handler(handler)

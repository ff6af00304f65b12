"""The fault-injecting proxy itself: cut, stall and throttle against a real local echo server
and the real Mosquitto."""
from __future__ import annotations

import asyncio
import os
import time

import paho.mqtt.client as mqtt
import pytest

from fota.testkit.faultproxy import FaultProxy
from fota.tools.waiting import wait_until


class Echo:
    """A TCP echo server on loopback that records what each connection received."""

    def __init__(self):
        self.received: list[bytearray] = []

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, r, w):
        got = bytearray()
        self.received.append(got)
        try:
            while data := await r.read(65536):
                got += data
                w.write(data)
                await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


async def _read_until_closed(reader, timeout=10.0) -> bytes:
    got = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                got += data
    except (ConnectionError, OSError):
        pass
    return bytes(got)


async def _read_exactly(reader, n, timeout=20.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.readexactly(n)


def _run(coro):
    return asyncio.run(coro)


def test_cut_after_down_forwards_exactly_k_bytes_per_connection_then_aborts_both_sides():
    async def main():
        echo = await Echo().start()
        proxy = await FaultProxy(echo.port, cut_after_down=3000).start()
        try:
            for _ in range(2):  # every connection gets the budget again
                r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
                w.write(os.urandom(10000))
                await w.drain()
                got = await _read_until_closed(r)
                assert len(got) == 3000
                w.close()
            await asyncio.sleep(0.1)
            assert [s.cut for s in proxy.sessions] == ["down", "down"]
            assert [s.down for s in proxy.sessions] == [3000, 3000]
            assert proxy.bytes_down == 6000 and proxy.cuts == 2 and proxy.connections == 2
            assert proxy.open_connections == 0
            assert proxy.bytes_up == sum(len(x) for x in echo.received)  # counted what it forwarded
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_cut_after_up_delivers_exactly_k_bytes_upstream_and_closes_the_client():
    async def main():
        echo = await Echo().start()
        proxy = await FaultProxy(echo.port, cut_after_up=1000).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = os.urandom(5000)
            w.write(payload)
            await w.drain()
            got = await _read_until_closed(r)
            await asyncio.sleep(0.1)
            assert bytes(echo.received[0]) == payload[:1000]  # exactly the first K bytes, unaltered
            assert got == payload[:len(got)] and len(got) <= 1000
            assert proxy.sessions[0].cut == "up" and proxy.bytes_up == 1000
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_cut_after_total_counts_both_directions():
    async def main():
        echo = await Echo().start()
        proxy = await FaultProxy(echo.port, cut_after=4000).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = os.urandom(3000)
            w.write(payload)
            await w.drain()
            got = await _read_until_closed(r)
            s = proxy.sessions[0]
            assert s.cut == "total" and s.up + s.down == 4000
            assert got == payload[:len(got)] and len(got) == s.down
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_stall_holds_data_for_t_seconds_without_closing_and_loses_nothing():
    async def main():
        echo = await Echo().start()
        proxy = await FaultProxy(echo.port).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            w.write(b"before")
            await w.drain()
            assert await _read_exactly(r, 6) == b"before"
            proxy.stall(1.0)
            t0 = time.monotonic()
            payload = os.urandom(50000)
            w.write(payload)
            await w.drain()
            got = await _read_exactly(r, len(payload))
            assert time.monotonic() - t0 >= 0.95
            assert got == payload
            w.write(b"after")  # the connection survived the stall
            await w.drain()
            assert await _read_exactly(r, 5) == b"after"
            assert proxy.cuts == 0 and proxy.open_connections == 1 and proxy.stalls == 1
            w.close()
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_stall_after_k_bytes_pauses_each_connection_once():
    async def main():
        echo = await Echo().start()
        proxy = await FaultProxy(echo.port, stall_after=1000, stall_for=1.0).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = os.urandom(4000)
            t0 = time.monotonic()
            w.write(payload)
            await w.drain()
            first = await _read_exactly(r, 1000)
            t_first = time.monotonic() - t0
            rest = await _read_exactly(r, 3000)
            t_rest = time.monotonic() - t0
            assert first + rest == payload
            assert t_rest - t_first >= 0.95 and t_rest >= 0.95
            # only once per connection
            w.write(b"x" * 2000)
            await w.drain()
            await _read_exactly(r, 2000)
            assert proxy.sessions[0].stalled and proxy.stalls == 1
            w.close()
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_throttle_limits_bytes_per_second():
    async def main():
        echo = await Echo().start()
        rate = 20000
        proxy = await FaultProxy(echo.port, throttle_down=rate).start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = os.urandom(30000)
            t0 = time.monotonic()
            w.write(payload)
            await w.drain()
            got = await _read_exactly(r, len(payload))
            elapsed = time.monotonic() - t0
            assert got == payload
            # 30 kB at 20 kB/s with a 100 ms burst allowance: at least 1.4 s; the upper bound
            # only catches a throttle stuck far below its rate.
            assert 1.4 <= elapsed < 12, elapsed
            assert proxy.bytes_down == len(payload) and proxy.bytes_up == len(payload)
            w.close()
        finally:
            await proxy.close()
            await echo.close()
    _run(main())


def test_refuses_non_loopback_addresses():
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(1883, "192.0.2.1")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy(1883, host="0.0.0.0")


def test_mqtt_through_the_proxy_to_the_real_broker_and_a_cut(open_broker):
    """paho through the proxy to the real Mosquitto: messages flow, then a 3 KiB down-budget
    cuts the subscriber's connection and paho sees it drop."""
    with FaultProxy(open_broker.port) as proxy:
        got: list[bytes] = []
        drops: list[int] = []
        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fp-sub-{time.monotonic_ns()}")
        sub.on_message = lambda c, u, m: got.append(m.payload)
        sub.on_disconnect = lambda c, u, f, rc, p: drops.append(1)
        sub.connect("127.0.0.1", proxy.port)
        sub.subscribe("fp/test", 0)
        sub.loop_start()
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fp-pub-{time.monotonic_ns()}")
        pub.connect("127.0.0.1", open_broker.port)
        pub.loop_start()
        try:
            time.sleep(0.3)
            pub.publish("fp/test", b"hello", qos=1).wait_for_publish(5)
            wait_until(lambda: got == [b"hello"], timeout=10, what="message through the proxy")
            assert proxy.bytes_down > 5 and proxy.bytes_up > 0
            proxy.cut_after_down = proxy.sessions[0].down + 3072  # live change: 3 KiB more
            for _ in range(4):
                pub.publish("fp/test", os.urandom(1000), qos=1).wait_for_publish(5)
            wait_until(lambda: drops, timeout=10, what="the cut to reach paho")
            assert proxy.sessions[0].cut == "down"
            assert proxy.sessions[0].down == proxy.cut_after_down
            # a 1000-byte QoS 0 PUBLISH on fp/test is 1012 bytes on the wire: three fit in
            # 3072, the fourth is cut inside and never delivered
            assert len(got) == 4
        finally:
            sub.disconnect()
            pub.disconnect()
            sub.loop_stop()
            pub.loop_stop()

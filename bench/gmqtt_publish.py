"""Benchmark: what the chunk server's raw PUBLISH path buys over gmqtt's public ``client.publish``.

The chunk server writes a window of chunks as MQTT 5 PUBLISH packets it encodes itself, in one
write to gmqtt's connection (fota.gmqtt_adapter.publish_qos0, gmqtt private API). This bench
publishes the same chunk windows both ways, on the same broker in the same run:

* ``public``: ``client.publish(topic, chunk, qos=0)`` for every chunk;
* ``raw``: ``gmqtt_adapter.publish_qos0(client, topic, window)`` for every window.

One gmqtt client (MQTT 5, the server account, as the center) on a fresh Mosquitto with fota's
configuration publishes --chunks chunks of --chunk bytes (plus the 8-byte chunk header) in
windows of --window, to the data topics of --devices devices in turn; after every --burst
windows it publishes a QoS 1 marker and waits for its PUBACK (the broker has read everything
before it, and buffers stay bounded: the center too answers one request at a time). A paho
subscriber (its own thread) counts the bytes that arrive. The two paths alternate, --repeat
runs each; the medians are reported: the event loop thread's CPU time (``time.thread_time``)
and the wall time per chunk, and CPU milliseconds per MB of chunk payload.

    ./run bench gmqtt_publish [--chunks 32000] [--chunk 2048] [--window 8] [--repeat 5]

Exits 1 if a run fails (the subscriber does not get every byte within --timeout, or it raises).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50

from bench._report import print_table
from fota import gmqtt_adapter
from fota.device import protocol as P
from fota.server.broker import SERVER_USER
from fota.testkit.broker import ManagedBroker as Broker

PATHS = ("public", "raw")


class Subscriber:
    """A paho client on its own network thread counting the chunk bytes that arrive."""

    def __init__(self, broker: Broker):
        self.received = 0
        self.lock = threading.Lock()
        subscribed = threading.Event()
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-gmqtt-sub", protocol=paho.MQTTv311)
        c.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
        c.on_connect = lambda client, *args: client.subscribe(P.PREFIX + "+/" + P.DATA, qos=0)
        c.on_subscribe = lambda *args: subscribed.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.service_port)
        c.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber did not subscribe")
        self.client = c

    def _on_message(self, client, userdata, msg) -> None:
        with self.lock:
            self.received += len(msg.payload)

    def wait_for(self, total: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.received >= total:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _windows(args) -> list[tuple[str, list[bytes]]]:
    """(topic, chunk messages) of every window, built before the clock starts."""
    data = bytes(range(256)) * (args.chunk // 256 + 1)
    windows = []
    for n in range(args.chunks // args.window):
        device = f"bench-{n % args.devices:05d}"
        first = (n // args.devices) * args.window
        windows.append((P.topic(device, P.DATA),
                        [struct.pack(P.CHUNK_HEADER, 1, first + i) + data[:args.chunk] for i in range(args.window)]))
    return windows


async def _publish(broker: Broker, path: str, windows, burst: int) -> dict:
    client = Client(f"bench-gmqtt-{path}")
    client.set_auth_credentials(SERVER_USER, broker.users[SERVER_USER])
    await client.connect(broker.host, broker.service_port, version=MQTTv50)
    try:
        cpu0, t0 = time.thread_time(), time.perf_counter()
        for n, (topic, messages) in enumerate(windows, 1):
            if path == "raw":
                gmqtt_adapter.publish_qos0(client, topic, messages)
            else:
                for message in messages:
                    client.publish(topic, message, qos=0)
            if n % burst == 0 or n == len(windows):
                client.publish("bench/marker", b"", qos=1)
                await gmqtt_adapter.wait_acked(client)
            else:
                await asyncio.sleep(0)  # the center answers one request per turn of its loop
        return {"cpu_s": time.thread_time() - cpu0, "wall_s": time.perf_counter() - t0}
    finally:
        await client.disconnect()


def run(args) -> dict:
    windows = _windows(args)
    chunks = len(windows) * args.window
    payload = chunks * (args.chunk + P.CHUNK_HEADER_SIZE)
    runs: dict[str, list[dict]] = {path: [] for path in PATHS}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        broker = Broker(Path(tmp) / "mosquitto")
        sub = None
        try:
            sub = Subscriber(broker)
            for r in range(args.repeat):
                for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
                    before = sub.received
                    try:
                        result = asyncio.run(_publish(broker, path, windows, args.burst))
                    except Exception as exc:
                        failures.append(f"{path} run {r + 1}: {exc!r}")
                        continue
                    if not sub.wait_for(before + payload, args.timeout):
                        failures.append(f"{path} run {r + 1}: {sub.received - before} of {payload} bytes arrived")
                        continue
                    runs[path].append(result)
                    print(f"[bench] {path} run {r + 1}: {result}", file=sys.stderr)
        finally:
            if sub is not None:
                sub.close()
            broker.stop()
    summary = {}
    for path, results in runs.items():
        if results:
            cpu, wall = (statistics.median(r[k] for r in results) for k in ("cpu_s", "wall_s"))
            summary[path] = {"cpu_us_per_chunk": cpu / chunks * 1e6, "wall_us_per_chunk": wall / chunks * 1e6,
                             "cpu_ms_per_mb": cpu * 1e3 / (payload / 1e6)}
    return {"chunks": chunks, "chunk": args.chunk, "window": args.window, "devices": args.devices,
            "burst": args.burst, "payload_bytes": payload, "runs": runs, "summary": summary, "failures": failures}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, default=32000, help="chunks per run (1,000 devices x 64 KiB)")
    ap.add_argument("--chunk", type=int, default=P.DEFAULT_CHUNK_SIZE, help="bytes of image per chunk")
    ap.add_argument("--window", type=int, default=P.DEFAULT_WINDOW, help="chunks per window (one request)")
    ap.add_argument("--devices", type=int, default=1000, help="data topics published to in turn")
    ap.add_argument("--burst", type=int, default=16, help="windows between two waits for the broker's PUBACK")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each path (alternating)")
    ap.add_argument("--timeout", type=float, default=60.0, help="s for the subscriber to get a run's bytes")
    ap.add_argument("--out", default="bench/results/gmqtt_publish.json")
    args = ap.parse_args(argv)
    result = run(args)
    summary = result["summary"]
    rows = []
    for path in PATHS:
        s = summary.get(path)
        if s is None:
            rows.append([path, "-", "-", "-", "-"])
            continue
        ratio = s["cpu_us_per_chunk"] / summary["raw"]["cpu_us_per_chunk"] if "raw" in summary else None
        rows.append([path, f"{s['cpu_us_per_chunk']:.1f}", f"{s['wall_us_per_chunk']:.1f}", f"{s['cpu_ms_per_mb']:.2f}",
                     f"{ratio:.2f}" if ratio else "-"])
    print_table(f"{result['chunks']:,} chunks of {args.chunk} B in windows of {args.window}: "
                f"gmqtt client.publish vs the raw path (medians of {args.repeat})",
                ["path", "loop CPU µs/chunk", "wall µs/chunk", "loop CPU ms/MB", "CPU / raw"], rows,
                left=("path",))
    for failure in result["failures"]:
        print(f"FAILED: {failure}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"[bench] results in {out}", file=sys.stderr)
    return 1 if result["failures"] or len(summary) < len(PATHS) else 0


if __name__ == "__main__":
    sys.exit(main())

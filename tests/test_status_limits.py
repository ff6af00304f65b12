"""One device must not exhaust the control center (issue 11, item 2): statuses refused at parsing
(size, NUL, NaN, ranges), a rate limit per device, the retention of the status history, and a
paginated history. Real Mosquitto; SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from fota.device import protocol as P
from fota.server import counters, metrics
from fota.server.deployments import create_deployment, device_history
from fota.server.fleet import provision_device
from fota.server.ingest import Incoming, write_batch
from fota.server.releases import create_release
from fota.server.retention import Retention, prune
from fota.server.center import parse_status
from fota.server.statuses import StatusLimiter, StatusRefused, stored_payload
from fota.server.store import Campaign, CampaignDevice, Job, StatusEvent, Store, utcnow
from fota.tools.waiting import wait_until_async
from fota.tools.signing import generate_private_key
from conftest import run_micropython
from test_api import API, bearer, make_env
from test_core import SIGNING_KEY, Harness, cmd, make_update
from test_server import add_device, center_for

KEY = generate_private_key()


def status(seq: int, state: str = "health", **fields) -> dict:
    return {"job": None, "state": state, "code": None, "reason": None, "progress": 0.0, "bytes": 0, "total": 0,
            "version": "1.0.0", "boot": 1, "seq": seq, **fields}


def encode(msg: dict) -> bytes:
    return json.dumps(msg).encode()


# ---- parsing: what the center refuses -------------------------------------------------------------

REFUSED = {
    "oversize": encode(status(1, reason="x" * 5000)),
    "reason too long": encode(status(1, reason="x" * (P.MAX_REASON + 1))),
    "NUL in the reason": encode(status(1, reason="a\u0000b")),
    "NUL in a key": b'{"state": "health", "boot": 1, "seq": 1, "x\\u0000": 1}',
    "NUL in an unknown field": encode(status(1, extra=["ok", {"deep": "\u0000"}])),
    "NaN progress": b'{"state": "downloading", "job": 1, "boot": 1, "seq": 1, "progress": NaN}',
    "Infinity": b'{"state": "health", "boot": 1, "seq": 1, "uptime": Infinity}',
    "overflowing float": b'{"state": "health", "boot": 1, "seq": 1, "progress": 1e999}',
    "negative progress": encode(status(1, "downloading", job=1, progress=-0.5)),
    "progress over 1": encode(status(1, "downloading", job=1, progress=1.5)),
    "negative bytes": encode(status(1, bytes=-1)),
    "total over 32 bits": encode(status(1, total=2**31)),
    "negative uptime": encode(status(1, uptime=-1)),
    "battery over 100": encode(status(1, battery=101)),
    "boolean battery": encode(status(1, battery=True)),
    "integer beyond 64 bits": encode(status(1, extra=2**64)),
    "bad code": encode(status(1, "failed", job=1, code="not a code")),
    "long code": encode(status(1, "failed", job=1, code="E_" + "X" * 31)),
    "long version": encode(status(1, version="1" * 65)),
    "ok not a boolean": encode(status(1, ok="yes")),
    "current not a state": encode(status(1, "rejected", current="elsewhere")),
    "lone surrogate": b'{"state": "health", "boot": 1, "seq": 1, "reason": "\\ud800"}',
    "negative seq": encode(status(-1)),
    "not an object": b"[1, 2]",
    "not JSON": b"{nope",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_parse_status_refuses(name):
    with pytest.raises(StatusRefused) as exc:
        parse_status(REFUSED[name])
    assert exc.value.kind == ("oversize" if name == "oversize" else "invalid")


def test_every_status_the_device_sends_fits():
    """A whole update, refusals of malformed commands, a postponement and health reports of an app
    whose exception text is long (and not ASCII): every status parses, and none meets the rate
    limit even when all arrive at once."""
    image = bytes(range(256)) * 9 + b"tail"
    h = Harness(SIGNING_KEY)
    h.core.version = "v" * 64
    h.run(h.core.command(b"not json"))
    h.run(h.core.command(b"{" + b" " * 9000 + b"}"))
    h.run(h.core.command(cmd(make_update(SIGNING_KEY, image, job=5))))
    h.serve(image, 256)
    h.core.app_error = "app failed to start: ValueError: " + "\u00e9\u4e2d" * 5000
    h.run([h.core._health()])
    low = Harness(SIGNING_KEY)
    low.core.battery, low.core.external = 3, False
    low.run(low.core.command(cmd(dict(make_update(SIGNING_KEY, image, job=6), min_battery=50))))
    published = [payload for topic, payload in h.published + low.published if topic == P.STATUS]
    sent = [json.loads(p) for p in published]
    assert {"rejected", "downloading", "verifying", "installing", "rebooting", "health", "postponed"} <= \
        {m["state"] for m in sent}
    limiter = StatusLimiter()
    for payload in published:
        raw = payload.encode() if isinstance(payload, str) else payload
        assert len(raw) <= P.MAX_STATUS_BYTES
        assert limiter.allow("d1", parse_status(raw), now=0.0)
    longest = max((m.get("reason") or "" for m in sent), key=len)  # absent when empty (compact statuses)
    assert longest.startswith("app failed") and len(longest) == P.MAX_REASON  # cut by the device


def test_the_device_cuts_a_long_reason_on_micropython():
    result = run_micropython(
        "import json\n"
        "from fota.device import core as C\n"
        "a = C.UpdateCore._publish_status(None, {'state': 'health', 'reason': '\\u00e9x' * 3000})\n"
        "r = json.loads(a[2])['reason']\n"
        "print(len(r), len(a[2].encode()) <= C.P.MAX_STATUS_BYTES, r[:2] == '\\u00e9x')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(P.MAX_REASON), "True", "True"]


def test_stored_payload_holds_each_field_once():
    msg = parse_status(encode(status(3, ok=False, reason="crash", uptime=61234, battery=80)))
    assert stored_payload(msg) == {"bytes": 0, "total": 0, "ok": False, "uptime": 61234, "battery": 80}


# ---- the rate limit's rule ------------------------------------------------------------------------

def test_rate_limit_rule():
    limiter = StatusLimiter(rate=1.0, burst=10, transitions=3, transition_rate=0.0)
    # a flood of health reports at one instant: the burst passes, the rest does not
    assert sum(limiter.allow("flooder", status(i), now=0.0) for i in range(100)) == 10
    assert limiter.allow("flooder", status(100, "downloading", job=7), now=0.0)  # a transition passes
    assert not limiter.allow("flooder", status(101, "downloading", job=7), now=0.0)  # the same state again: no
    assert limiter.allow("flooder", status(102, "verifying", job=7), now=0.0)
    assert limiter.allow("flooder", status(103, "installing", job=7), now=0.0)
    assert not limiter.allow("flooder", status(104, "rebooting", job=7), now=0.0)  # made-up transitions: bounded
    assert limiter.allow("flooder", status(105), now=1.0)  # one token a second
    assert not limiter.allow("flooder", status(106), now=1.0)
    # another device is not affected; a quiet bucket fills up again and is forgotten
    assert limiter.allow("other", status(1), now=1.0)
    assert limiter.forget_idle(now=1000.0) == 1 and len(limiter) == 1  # the flooder has no transition refill


def test_a_legitimate_device_never_meets_the_default_rate_limit():
    """Progress at most once a second, every state of an update, a health report per connect,
    reconnects every few seconds: nothing is dropped (defaults of the control center)."""
    limiter = StatusLimiter()
    t, seq = 0.0, 0
    for update in range(20):
        for state in ["downloading"] * 11 + ["verifying", "installing", "rebooting", "trial", "confirmed", "health"]:
            seq += 1
            job = None if state == "health" else update + 1
            assert limiter.allow("dev", status(seq, state, job=job), now=t)
            t += 1.0 if state == "downloading" else 0.0
        for _ in range(5):  # a flaky link: reconnect, health report, a refused duplicate command
            seq += 2
            assert limiter.allow("dev", status(seq - 1), now=t)
            assert limiter.allow("dev", status(seq, "rejected", job=update + 1, code="E_DUPLICATE_JOB"), now=t)
            t += 2.0


# ---- the control center, with a real broker -------------------------------------------------------

def _metric(store: Store, line_start: str) -> float:
    for line in metrics.render(store).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not in /metrics")


def _events(store: Store, device_id: str) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(StatusEvent).where(StatusEvent.device_id == device_id))


def with_center(store, broker, tmp_path, body, devices, **settings) -> None:
    """Start the devices and a control center, run ``await body(center)``, stop them all."""
    for dev in devices:
        dev.start()

    async def scenario():
        center = center_for(store, broker, tmp_path, **settings)
        await center.start()
        try:
            await body(center)
        finally:
            await center.stop()
    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        for dev in devices:
            dev.stop()


def test_refused_statuses_are_acknowledged_counted_and_not_stored(store, broker, tmp_path):
    dev = add_device(store, broker, KEY, auto=False)

    async def body(center):
        infos = [dev.client.publish(dev.topic(P.STATUS), REFUSED[name], qos=1) for name in sorted(REFUSED)]
        for info in infos:
            info.wait_for_publish(5)
        assert all(info.is_published() for info in infos)  # acknowledged: never redelivered
        dev.status(None, "health", ok=True, uptime=5)
        await wait_until_async(lambda: _events(store, dev.id) == 1, what="the valid status stored")
        await wait_until_async(lambda: _metric(store, 'fota_statuses_dropped_total{reason="invalid"}') == len(REFUSED) - 1,
                    what="refusals counted in /metrics")
        assert center.refused == len(REFUSED)
        assert _metric(store, 'fota_statuses_dropped_total{reason="oversize"}') == 1
        assert _metric(store, "fota_statuses_received_total") == 1
    with_center(store, broker, tmp_path, body, [dev])
    [event] = device_history(store, dev.id)
    assert event.state == "health" and event.payload == {"bytes": None, "total": None, "ok": True, "uptime": 5}


def test_a_nul_status_does_not_slow_other_devices(store, broker, tmp_path, caplog):
    """On PostgreSQL a NUL failed every batch it was in, which then went one message at a time
    (a traceback each): now it is refused at parsing and the batches stay whole."""
    hostile, other = add_device(store, broker, KEY, auto=False), add_device(store, broker, KEY, auto=False)

    async def body(center):
        for i in range(200):
            other.status(None, "health", ok=True, uptime=i)
            if i % 10 == 0:
                hostile.status(None, "health", ok=False, reason="bad\u0000byte")
        await wait_until_async(lambda: _events(store, other.id) == 200, timeout=30, what="the other device's statuses")
        assert center.refused == 20
    with caplog.at_level(logging.WARNING, logger="fota.server.center.intake"):
        # the other device sends faster than any real one: no rate limit in the way here
        with_center(store, broker, tmp_path, body, [hostile, other],
                    status_limiter=StatusLimiter(rate=1000, burst=1000))
    assert not [r for r in caplog.records if "one by one" in r.getMessage() or "dropping" in r.getMessage()]
    assert _events(store, hostile.id) == 0
    # one line about the hostile device, not one per status
    assert len([r for r in caplog.records if hostile.id in r.getMessage()]) == 1


def test_rate_limit_drops_a_flood_but_not_a_job_transition(store, broker, tmp_path):
    rel = create_release(store, tmp_path / "blobs", KEY, os.urandom(1000), "2.0.0", ["unix"])
    dev = add_device(store, broker, KEY, auto=False)
    dep = create_deployment(store, rel, device_ids=[dev.id])
    job = dep.jobs[0].id

    async def body(center):
        t0 = time.monotonic()
        for i in range(100):
            dev.status(None, "health", ok=True, uptime=i)
        dev.status(job, "failed", code="E_TIMEOUT", reason="stalled")  # after the flood: still applied
        await wait_until_async(lambda: center.rate_limited + _events(store, dev.id) == 101, timeout=20,
                    what="every status stored or limited")
        elapsed = time.monotonic() - t0
        await wait_until_async(lambda: center.job_states(dep.id)[dev.id] == "failed", what="the job failed")
        assert 11 <= _events(store, dev.id) <= 11 + elapsed + 1
        await wait_until_async(lambda: _metric(store, 'fota_statuses_dropped_total{reason="rate_limited"}')
                    == center.rate_limited, what="rate-limited statuses counted in /metrics")
    with_center(store, broker, tmp_path, body, [dev], status_limiter=StatusLimiter(rate=1.0, burst=10))


# ---- the managed broker's packet limit ------------------------------------------------------------

def test_managed_broker_packet_limit_fits_the_largest_legitimate_packets(tmp_path):
    """max_packet_size 16 KiB: a full chunk (8192 + 8 bytes) and a command of MAX_COMMAND_BYTES
    on a 64-character device id's topics pass; a 20 KB status gets its sender disconnected."""
    import threading

    import paho.mqtt.client as mqtt

    from fota.server.broker import MANAGED_MAX_PACKET, Mosquitto
    device_id = "d" * 64
    got, gone = [], threading.Event()
    with Mosquitto(tmp_path / "mosquitto", auth=False, max_packet_size=MANAGED_MAX_PACKET) as broker:
        def client(name):
            c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            return c
        receiver = client("receiver")
        receiver.on_message = lambda c, u, msg: got.append((msg.topic, len(msg.payload)))
        receiver.subscribe("fota/#", qos=1)
        time.sleep(0.3)
        sender = client("sender")
        sender.on_disconnect = lambda *args: gone.set()
        for suffix, size in ((P.DATA, P.MAX_CHUNK_SIZE + P.CHUNK_HEADER_SIZE), (P.CMD, P.MAX_COMMAND_BYTES),
                             (P.STATUS, P.MAX_STATUS_BYTES)):
            sender.publish(P.topic(device_id, suffix), os.urandom(size), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(got) == sorted([(P.topic(device_id, P.DATA), P.MAX_CHUNK_SIZE + P.CHUNK_HEADER_SIZE),
                                      (P.topic(device_id, P.CMD), P.MAX_COMMAND_BYTES),
                                      (P.topic(device_id, P.STATUS), P.MAX_STATUS_BYTES)])
        sender.publish(P.topic(device_id, P.STATUS), b"x" * 20000, qos=1)
        assert gone.wait(5)  # the broker closed the connection
        time.sleep(0.3)
        assert len(got) == 3
        for c in (sender, receiver):
            c.disconnect()
            c.loop_stop()


# ---- retention ------------------------------------------------------------------------------------

def test_retention_keeps_what_campaigns_and_operators_need_and_bounds_the_rest(store, tmp_path):
    for device_id in ("d1", "d2"):
        provision_device(store, device_id, "unix")
    rel = create_release(store, tmp_path / "blobs", KEY, os.urandom(1000), "2.0.0", ["unix"])
    done_job, live_job, other_job = (create_deployment(store, rel, device_ids=[d]).jobs[0].id
                                     for d in ("d1", "d1", "d2"))
    dep = create_deployment(store, rel, device_ids=["d2"])
    with store.session() as s:
        campaign = Campaign(name="spring", release_id=rel.id, deployment_id=dep.id, spec={}, state="running")
        s.add(campaign)
        s.flush()
        s.add(CampaignDevice(campaign_id=campaign.id, device_id="d2", wave=0, state="probation"))
    t0 = utcnow()
    seq = 0

    def incoming(device_id, job, state, **fields):
        nonlocal seq
        seq += 1
        msg = parse_status(encode(status(seq, state, job=job, **fields)))
        return Incoming(P.STATUS, device_id, msg, t0 + timedelta(milliseconds=seq))

    batch = [incoming("d1", done_job, s) for s in ("downloading", "installing", "confirmed", "confirmed")]
    batch += [incoming("d1", None, "health", ok=True) for _ in range(20)]
    batch += [incoming("d1", live_job, "downloading", progress=i / 10) for i in range(8)]
    batch += [incoming("d1", other_job, "confirmed")]  # not d1's job
    batch += [incoming("d2", None, "health", ok=True) for _ in range(12)]  # on probation
    batch += [incoming("d2", None, "rejected", code="E_BAD_CHUNK") for _ in range(6)]
    with store.session() as s:
        write_batch(s, batch, {})
    with store.session() as s:
        s.execute(update(Job).where(Job.id == live_job).values(state="downloading"))

    deleted = prune(store, Retention(keep=3, days=None, batch=4), ["d1", "d2"], utcnow(), "test-worker")

    def kept(device_id):  # every stored status, those that took no effect included
        return [(e.job_id, e.state, e.seq) for e in device_history(store, device_id, include_ignored=True)]
    d1 = kept("d1")
    assert [e for e in d1 if e[0] == live_job] == [(live_job, "downloading", 25 + i) for i in range(8)]
    assert (done_job, "confirmed", 3) in d1  # the status that ended the job
    unprotected = [e for e in d1 if e[0] != live_job and e != (done_job, "confirmed", 3)]
    assert unprotected == [(None, "health", 23), (None, "health", 24), (other_job, "confirmed", 33)]
    d2 = kept("d2")
    assert len([e for e in d2 if e[1] == "health"]) == 12  # probation: the campaign judges by them
    assert [e[1] for e in d2 if e[1] != "health"] == ["rejected"] * 3
    assert deleted == 33 + 18 - 12 - 15
    with store.session() as s:
        assert counters.totals(s)[counters.PRUNED] == deleted
    assert _metric(store, "fota_statuses_received_total") == 33 + 18  # deleted ones still counted

    # by age: everything not protected and older than the limit
    with store.session() as s:
        s.execute(update(StatusEvent).values(received_at=utcnow() - timedelta(days=40)))
    prune(store, Retention(keep=None, days=30), [], utcnow(), "test-worker")
    assert [e for e in kept("d1") if e[0] != live_job] == [(done_job, "confirmed", 3)]
    assert len(kept("d2")) == 12


def test_the_control_center_prunes_periodically(store, broker, tmp_path):
    dev = add_device(store, broker, KEY, auto=False)

    async def body(center):
        for i in range(10):
            dev.status(None, "health", ok=True, uptime=i)
        await wait_until_async(lambda: center.pruned == 8 and _events(store, dev.id) == 2, timeout=20,
                    what="the device's history cut to 2")
        assert [e.seq for e in device_history(store, dev.id)] == [9, 10]
    with_center(store, broker, tmp_path, body, [dev], retention=Retention(keep=2, days=None),
                retention_interval=0.2)


def test_retention_settings_of_a_home(tmp_path):
    from fota.server.home import Home, HomeError
    home = Home(tmp_path / "home")
    assert home.retention() == Retention()  # the defaults
    cfg = home.config()
    home.save_config(dict(cfg, history_keep=50, history_days=None))
    assert home.retention() == Retention(keep=50, days=None)
    assert home.retention(keep=0, days=7) == Retention(keep=None, days=7)  # 0: no count limit
    assert home.retention(keep=0, days=0) is None  # keep everything
    home.save_config(dict(cfg, history_keep=-1))
    with pytest.raises(HomeError, match="history_keep"):
        home.retention()


# ---- history pages --------------------------------------------------------------------------------

def test_history_is_paginated(db_url, tmp_path):
    env = make_env(db_url, tmp_path)
    try:
        with env.store.session() as s:
            s.add_all(StatusEvent(device_id="dev-1", state="health", boot=1, seq=i, payload={})
                      for i in range(1, 8))
        read = bearer(env.reader)
        url = f"{API}/devices/dev-1/history"
        seen, cursor = [], None
        while True:
            r = env.client.get(url, headers=read, params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200
            page = r.json()
            assert len(page["statuses"]) <= 3
            seen += [e["seq"] for e in page["statuses"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(range(1, 8))
        r = env.client.get(url, headers=read, params={"limit": 5, "order": "desc"})
        assert [e["seq"] for e in r.json()["statuses"]] == [7, 6, 5, 4, 3]
        r = env.client.get(url, headers=read, params={"limit": 5, "order": "desc", "cursor": r.json()["next_cursor"]})
        assert [e["seq"] for e in r.json()["statuses"]] == [2, 1] and r.json()["next_cursor"] is None
        assert env.client.get(url, headers=read, params={"cursor": 2**63 - 1}).json() == \
            {"statuses": [], "next_cursor": None}  # the schema's largest cursor: no server error
        for bad in ({"limit": 0}, {"limit": 1001}, {"cursor": 2**63}, {"cursor": -1}, {"order": "sideways"}):
            assert env.client.get(url, headers=read, params=bad).status_code == 422
        schema = env.client.get("/openapi.json").json()
        spec = schema["paths"][f"{API}/devices/{{device_id}}/history"]["get"]
        params = {p["name"]: p for p in spec["parameters"]}
        assert params["limit"]["schema"]["maximum"] == 1000 and "cursor" in params
        out = spec["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert set(schema["components"]["schemas"][out.rsplit("/", 1)[1]]["properties"]) == {"statuses",
                                                                                             "next_cursor"}
    finally:
        env.client.close()
        env.store.dispose()


def test_cli_history_pages(tmp_path):
    from typer.testing import CliRunner

    from fota.cli import app
    from fota.server.home import Home
    home = Home(tmp_path / "home")
    store = Store(home.database_url)
    try:
        provision_device(store, "dev-1", "unix")
        with store.session() as s:
            s.add_all(StatusEvent(device_id="dev-1", state="health", boot=1, seq=i, payload={}, code=f"E_S{i}")
                      for i in range(1, 6))
    finally:
        store.dispose()
    runner = CliRunner()
    first = runner.invoke(app, ["history", "dev-1", "--limit", "2", "--home", str(home.path)])
    assert first.exit_code == 0, first.output
    assert "E_S1" in first.output and "E_S2" in first.output and "E_S3" not in first.output
    hint = [line for line in first.output.splitlines() if line.startswith("more:")][0]
    cursor = hint.split("--cursor ")[1].split()[0]
    second = runner.invoke(app, ["history", "dev-1", "--limit", "2", "--cursor", cursor, "--home", str(home.path)])
    assert "E_S3" in second.output and "E_S4" in second.output and "E_S2" not in second.output
    everything = runner.invoke(app, ["history", "dev-1", "--limit", "2", "--all", "--home", str(home.path)])
    assert all(f"E_S{i}" in everything.output for i in range(1, 6)) and "more:" not in everything.output

"""Several control-center workers: MQTT v5 shared subscriptions + PostgreSQL.

* what Mosquitto does with a dead member of a shared group (the reason for the design);
* the worker registry (heartbeats, adoption of a dead worker, its claimed jobs freed);
* two `fota worker` processes driving a campaign over simulated devices, one killed with
  SIGKILL in the middle: the other finishes it, nothing lost, nothing done twice.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import func, select, update

from fota.device import protocol as P
from fota.server import workers
from fota.server.broker import SERVER_USER
from fota.server.campaigns import campaign_summary, create_campaign, start_campaign
from fota.server.deployments import create_deployment
from fota.server.home import Home
from fota.server.releases import create_release
from fota.server.store import CenterWorker, Job, StatusEvent, Store, utcnow
from fota.sim import FailurePlan, SimFleet, device_ids, provision
from fota.testkit.brokerspy import BrokerSpy
from fota.tools.waiting import wait_until
from fota.tools.keyring import Keyring

from test_sim import SimThread, add_users

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ the broker's behaviour

def _member(broker, client_id: str, group: str, topic: str, persistent: bool):
    got: list[bytes] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
    c.on_message = lambda client, userdata, msg: got.append(msg.payload)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600 if persistent else 0
    c.connect(broker.host, broker.service_port, clean_start=not persistent, properties=props)
    c.loop_start()
    c.subscribe(f"$share/{group}/{topic}", qos=1)
    return c, got


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "clean"])
def test_mosquitto_keeps_queueing_a_dead_shared_members_share(broker, persistent):
    """Mosquitto 2.0 goes on routing a share of a group's QoS 1 messages to a member whose
    persistent session outlived its connection (they wait in that session); a member without
    a session (expiry 0) leaves the group when it dies. Hence: persistent sessions (nothing
    lost while all workers are down) + a live worker drains a dead one's session."""
    group, tag = f"g{secrets.token_hex(3)}", secrets.token_hex(3)
    topic = f"fota/probe/{tag}/status"
    live, got_live = _member(broker, f"live-{tag}", group, topic, persistent)
    dead, _ = _member(broker, f"dead-{tag}", group, topic, persistent)
    time.sleep(0.5)
    dead.loop_stop()
    dead.socket().close()  # dies without DISCONNECT, as under SIGKILL
    time.sleep(1.0)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{tag}", protocol=mqtt.MQTTv5)
    pub.username_pw_set(SERVER_USER, broker.users[SERVER_USER])
    pub.connect(broker.host, broker.service_port)
    pub.loop_start()
    for i in range(40):
        pub.publish(topic, b"%d" % i, qos=1).wait_for_publish(10)
    wait_until(lambda: len(got_live) >= (20 if persistent else 40), timeout=30, what="the live member's share")
    time.sleep(0.5)
    back, got_back = _member(broker, f"dead-{tag}", group, topic, persistent)  # the dead one's id again
    time.sleep(1.0)
    try:
        if persistent:
            # round robin over both members, the dead one included: half waited in its session
            assert len(got_live) == 20 and len(got_back) == 20
            assert sorted(got_live + got_back, key=int) == [b"%d" % i for i in range(40)]
        else:
            assert len(got_live) == 40 and got_back == []
    finally:
        for c in (live, back, pub):
            c.disconnect()
            c.loop_stop()
        if persistent:  # delete the two sessions
            for cid in (f"live-{tag}", f"dead-{tag}"):
                _member(broker, cid, group, topic, False)[0].disconnect()


def sim_deployment(store: Store, root: Path, ids: list[str], image: bytes = b"x" * 4096):
    """(keyring, deployment): a fresh signing keyring in root/keys, release 2.0.0 of ``image`` for
    hardware 'sim' in root/blobs, and its deployment to the devices ``ids``, provisioned here."""
    keyring = Keyring(root / "keys")
    keyring.init()
    provision(store, ids)
    rel = create_release(store, root / "blobs", keyring.signer().key, image, "2.0.0", ["sim"], kind="image")
    return keyring, create_deployment(store, rel, device_ids=ids)


# ------------------------------------------------------------------ the registry

def test_registry_heartbeats_adoption_and_released_claims(db_url, tmp_path):
    store = Store(db_url)
    try:
        ids = device_ids(2, "reg")
        _, dep = sim_deployment(store, tmp_path, ids)
        workers.register(store, "w-a", lease=5)
        with store.session() as s:  # w-a claimed one job and sent the other
            first, second = sorted(j.id for j in dep.jobs)
            s.execute(update(Job).where(Job.id == first).values(worker="w-a"))
            s.execute(update(Job).where(Job.id == second).values(worker="w-a", state="sent"))
        assert workers.heartbeat(store, "w-a")
        if store.engine.dialect.name == "sqlite":
            with pytest.raises(workers.SingleWorkerError, match="PostgreSQL"):
                workers.register(store, "w-b", lease=5)
            with store.session() as s:  # w-a went silent
                s.execute(update(CenterWorker).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        workers.register(store, "w-b", lease=5)
        if store.engine.dialect.name != "sqlite":
            assert workers.adopt_stale(store, "w-b", lease=5) is None  # w-a is alive
        with store.session() as s:
            s.execute(update(CenterWorker).where(CenterWorker.id == "w-a")
                      .values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        assert workers.adopt_stale(store, "w-b", lease=5) == "w-a"
        assert workers.adopt_stale(store, "w-b", lease=5) is None  # adopted once
        # its unsent claim is free again; the sent job stays its own
        with store.session() as s:
            assert s.get(Job, first).worker is None and s.get(Job, second).worker == "w-a"
        assert not workers.heartbeat(store, "w-a")  # declared dead: it must stop
        assert workers.live_workers(store, lease=5) == ["w-b"]
        workers.forget(store, "w-a")
        workers.retire(store, "w-b")
        assert workers.live_workers(store, lease=5) == []
    finally:
        store.dispose()


# ------------------------------------------------------------------ SIGKILL mid-campaign

class StatusSpy(BrokerSpy):
    """A plain (not shared) subscriber: every status the devices publish, by (device, boot, seq)."""

    def __init__(self, broker):
        self.statuses: dict[tuple[str, int, int], dict] = {}
        super().__init__(broker)

    def _on_message(self, client, userdata, msg):
        body = json.loads(msg.payload)
        self.statuses[(msg.topic.split("/")[2], body["boot"], body["seq"])] = body


def _start_worker(home: Home, log: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "fota.cli", "worker", "--home", str(home.path), "--lease", "3"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _stored_keys(store: Store) -> set[tuple[str, int, int]]:
    with store.session() as s:
        return {tuple(r) for r in s.execute(select(StatusEvent.device_id, StatusEvent.boot, StatusEvent.seq))}


@pytest.mark.postgres
def test_worker_killed_mid_campaign_the_other_finishes_nothing_lost_nothing_twice(tmp_path, broker):
    from db_fixtures import postgres_database
    n = 30
    with postgres_database() as url:
        home = Home(tmp_path / "home")
        home.save_config({"database_url": url, "broker_url": broker.server_url, "broker_port": broker.port,
                          "server_password": broker.users[SERVER_USER]})
        keyring = home.keyring
        keyring.init()
        store = Store(url)
        procs: list[subprocess.Popen] = []
        sim = spy = None
        try:
            ids = device_ids(n, "kw")
            passwords = provision(store, ids)
            add_users(broker, passwords)
            # a device outside the campaign (other hardware) that reports after the kill: the
            # dead worker's share of its statuses must come back from its session
            bystander = f"kw-by-{secrets.token_hex(2)}"
            bystander_pw = provision(store, [bystander], hardware="other", tags=())[bystander]
            add_users(broker, {bystander: bystander_pw})
            procs = [_start_worker(home, tmp_path / f"worker-{i}.log") for i in (1, 2)]
            wait_until(lambda: len(workers.live_workers(store)) == 2, timeout=60, what="two workers registered")
            spy = StatusSpy(broker)
            # slow links: every chunk takes 50 ms, so the campaign is still downloading at the kill
            fleet = SimFleet.build(passwords, host=broker.host, port=broker.port, root_key=keyring.root_public(),
                                   trust=keyring.trust(), plan=FailurePlan(slow=1.0, chunk_delay=0.05))
            sim = SimThread(fleet).start()
            wait_until(lambda: _online(store) == n, timeout=60, what=f"{n} devices online")
            rel = create_release(store, home.blobs, keyring.signer().key, os.urandom(48 * 1024), "2.0.0",
                                 ["sim"], kind="image")
            create_campaign(store, "scale", rel, {"waves": [20, 100], "probation": 1, "max_in_flight": 10})
            start_campaign(store, "scale")
            wait_until(lambda: _count(store, ("downloading", "verifying", "installing", "rebooting", "trial",
                                              "confirmed")) >= 3, timeout=120, interval=0.05,
                       what="the campaign under way")
            victim = procs[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=bystander)
            pub.username_pw_set(bystander, bystander_pw)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            for seq in range(1, 11):  # round robin: about half wait in the dead worker's session
                msg = {"job": None, "state": "idle", "code": None, "reason": None, "boot": 1, "seq": seq}
                pub.publish(P.topic(bystander, P.STATUS), json.dumps(msg), qos=1).wait_for_publish(10)
            pub.disconnect()
            pub.loop_stop()
            with store.session() as s:
                at_kill = s.execute(select(Job.state, func.count()).group_by(Job.state)).all()
            print("jobs at the kill:", at_kill)
            assert _count(store, ("confirmed",)) < n, "the campaign finished before the kill: slow the devices down"
            wait_until(lambda: campaign_summary(store, "scale", devices=False)["state"] == "done",
                       timeout=240, interval=0.5, what="the campaign done by the surviving worker")
            summary = campaign_summary(store, "scale")
            # the bystander (another hardware type) is shown skipped, never driven
            assert {d["device"]: d["state"] for d in summary["devices"]} == \
                {**{i: "succeeded" for i in ids}, bystander: "skipped"}, summary["devices"]
            # every device on the new image, through one accepted job, installed once
            assert all(d.running_version() == "2.0.0" for d in fleet.devices.values())
            with store.session() as s:
                jobs = s.execute(select(Job.device_id, func.count()).where(Job.kind == "update")
                                 .group_by(Job.device_id)).all()
            assert sorted(jobs) == [(i, 1) for i in ids]
            for dev in ids:
                states = [b["state"] for (d, _, _), b in spy.statuses.items() if d == dev]
                assert states.count("installing") == 1 and states.count("confirmed") == 1, (dev, states)
            # no status lost: every one the devices published is a row (the dead worker's
            # share was drained from its session by the survivor)
            wait_until(lambda: set(spy.statuses) <= _stored_keys(store), timeout=60,
                       what="every published status stored")
            assert _stored_keys(store) == set(spy.statuses)
            # the survivor adopted the dead worker: its row and session are gone
            wait_until(lambda: workers.count_workers(store) == 1, timeout=30, what="the dead worker forgotten")
            assert procs[1].poll() is None
            log = (tmp_path / "worker-2.log").read_text()
            drained = re.search(r"adopted dead worker \S+: drained (\d+) message", log)
            # statuses the broker kept routing to the dead worker (the bystander's at least),
            # ingested from its session
            assert drained and int(drained.group(1)) > 0, log
            assert {(bystander, 1, seq) for seq in range(1, 11)} <= _stored_keys(store)
        finally:
            if sim is not None:
                sim.stop()
            if spy is not None:
                spy.close()
            stop_processes(procs)
            store.dispose()


def _online(store: Store) -> int:
    from fota.server.store import Device
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Device).where(Device.online.is_(True)))


def stop_processes(procs) -> None:
    """Worker processes still running: SIGTERM, then SIGKILL after 30 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _count(store: Store, states) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(Job).where(Job.kind == "update", Job.state.in_(states)))


# ------------------------------------------------------------------ out-of-order statuses

def test_a_status_older_than_the_stored_ones_does_not_move_its_job_back(db_url, tmp_path):
    """Two workers may ingest one device's statuses in either order (round robin): a job
    takes a status only if its (boot, seq) is newer than every stored one of that job."""
    from fota.server.ingest import Incoming
    from fota.server.center import ControlCenter
    store = Store(db_url)
    center = None
    try:
        keyring, dep = sim_deployment(store, tmp_path, ["ooo-1"])
        job_id = dep.jobs[0].id
        center = ControlCenter(store, "mqtt://u:p@127.0.0.1:1", tmp_path / "blobs", signer=keyring.signer(),
                               campaign_interval=None)

        def status(state, boot, seq):
            msg = {"job": job_id, "state": state, "code": None, "reason": None, "progress": 0.5, "boot": boot,
                   "seq": seq, "version": "1.0.0"}
            center.intake.write_batch([Incoming("status", "ooo-1", msg, utcnow())], {})
            with store.session() as s:
                return s.get(Job, job_id).state

        assert status("installing", 1, 7) == "installing"
        assert status("downloading", 1, 5) == "installing"   # late: stored, not applied
        assert status("rebooting", 1, 8) == "rebooting"
        assert status("trial", 2, 1) == "trial"              # a new boot starts seq again
        assert status("rebooting", 1, 9) == "trial"
        with store.session() as s:
            assert s.scalar(select(func.count()).select_from(StatusEvent)) == 5
    finally:
        if center is not None:
            center.db.shutdown()
        store.dispose()


# ------------------------------------------------------------------ fota serve --workers

def _fota(home: Path, *args: str, **kw):
    env = dict(os.environ, FOTA_HOME=str(home), COLUMNS="160")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    kw.setdefault("stdout", subprocess.PIPE)
    return subprocess.Popen([sys.executable, "-m", "fota.cli", *args], env=env, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def test_sqlite_takes_one_control_center(tmp_path):
    home = Home(tmp_path / "home")
    home.config()
    home.keyring.init()
    out = _fota(home.path, "serve", "--workers", "2").communicate(timeout=60)[0]
    assert "SQLite supports one control-center worker" in out and "PostgreSQL" in out
    first = _fota(home.path, "serve")
    try:
        wait_until(lambda: (home.path / "serve.lock").exists() and (home.path / "broker" / "mosquitto.pid").exists(),
                   timeout=60, what="the first control center up")
        second = _fota(home.path, "serve")
        out = second.communicate(timeout=60)[0]
        assert second.returncode == 1 and "another control center runs on" in out, out
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.wait(30)


def _worker_rows(store: Store) -> list[tuple]:
    with store.session() as s:
        return [(w.id, w.heartbeat_at.isoformat(timespec="seconds"), w.adopted_by)
                for w in s.scalars(select(CenterWorker).order_by(CenterWorker.id))]


@pytest.mark.postgres
def test_serve_starts_n_workers_and_replaces_a_dead_one(tmp_path, broker):
    from db_fixtures import postgres_database
    with postgres_database() as url:
        home = Home(tmp_path / "home")
        home.save_config({"database_url": url, "broker_url": broker.server_url, "broker_port": broker.port,
                          "server_password": broker.users[SERVER_USER]})
        home.keyring.init()
        store = Store(url)
        # Into a file: nobody reads a pipe while it runs, and the output explains a failure.
        output = tmp_path / "serve.log"
        with open(output, "w") as log:
            serve = _fota(home.path, "serve", "--workers", "2", stdout=log)
        try:
            # Generous deadlines: measured 2-5 s to two workers and 11-13 s to the replacement
            # (the 10 s lease, then the adoption) with the machine's load average at 7-9; they
            # only bound a failure.
            wait_until(lambda: len(workers.live_workers(store)) == 2, timeout=120, what="two workers")
            first = set(workers.live_workers(store))
            pid = int(next(iter(first)).split(":")[-2])
            os.kill(pid, signal.SIGKILL)
            # a new worker (a new identity) replaces it; the dead one is adopted and forgotten
            wait_until(lambda: len(set(workers.live_workers(store)) - first) == 1
                       and workers.count_workers(store) == 2, timeout=120, what="the dead worker replaced")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nworkers: {_worker_rows(store)}\n"
                                 f"fota serve output:\n{output.read_text()[-4000:]}") from None
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(90)
            store.dispose()


# ------------------------------------------------------------------ all workers down

@pytest.mark.postgres
def test_statuses_published_while_every_worker_is_down_are_stored_by_the_next_one(tmp_path, broker):
    """Both workers stop; a device publishes meanwhile (its statuses wait in the stopped workers'
    sessions, half in each); a worker started later adopts both sessions and stores them all."""
    from db_fixtures import postgres_database
    from fota.testkit.center import CenterThread
    group = f"down{secrets.token_hex(3)}"
    with postgres_database() as url:
        store = Store(url)
        keyring = Keyring(tmp_path / "keys")
        keyring.init()
        settings = dict(signer=keyring.signer(), share_group=group, lease=2.0, campaign_interval=None)
        dev = f"down-{secrets.token_hex(3)}"
        password = provision(store, [dev])[dev]
        broker.add_user(dev, password)
        new = None
        try:
            first = [CenterThread(store, broker.server_url, tmp_path / "blobs", **settings).start() for _ in (1, 2)]
            for center in first:
                center.stop()
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev)
            pub.username_pw_set(dev, password)
            pub.connect(broker.host, broker.port)
            pub.loop_start()
            for seq in range(1, 31):
                msg = {"job": None, "state": "idle", "code": None, "reason": None, "boot": 1, "seq": seq}
                pub.publish(P.topic(dev, P.STATUS), json.dumps(msg), qos=1).wait_for_publish(10)
            pub.disconnect()
            pub.loop_stop()
            time.sleep(1.0)
            new = CenterThread(store, broker.server_url, tmp_path / "blobs", **settings).start()
            wait_until(lambda: len(_stored_keys(store)) == 30, timeout=60, what="30 statuses stored")
            assert _stored_keys(store) == {(dev, 1, seq) for seq in range(1, 31)}
            wait_until(lambda: workers.count_workers(store) == 1, timeout=30, what="both stopped workers forgotten")
            assert sorted(new.center.adopted) == sorted(c.center.client_id for c in first)
        finally:
            if new is not None:
                new.stop()
            store.dispose()


def test_each_job_is_served_by_its_own_worker_in_order(tmp_path, broker):
    """Two workers share the chunk requests (shared subscription, round robin): a request that
    reaches the worker which did not send the job goes on to the one that did, so a device's
    windows arrive in order and nothing waits for a chunk timeout or is sent twice."""
    from db_fixtures import postgres_database
    from fota.testkit.center import CenterThread
    group = f"order{secrets.token_hex(3)}"
    n, size, chunk = 20, 40 * 1024, 1024
    with postgres_database() as url:
        store = Store(url)
        keyring = Keyring(tmp_path / "keys")
        keyring.init()
        settings = dict(signer=keyring.signer(), keys_update=keyring.keys_update(), share_group=group,
                        campaign_interval=None, chunk=chunk, window=8)
        ids = device_ids(n, "ord")
        passwords = provision(store, ids)
        add_users(broker, passwords)
        centers, sim = [], None
        try:
            centers = [CenterThread(store, broker.server_url, tmp_path / "blobs", **settings).start() for _ in (1, 2)]
            wait_until(lambda: all(c.center.workgroup.live == {c2.center.client_id for c2 in centers} for c in centers),
                       timeout=30, what="each worker sees both alive")
            fleet = SimFleet.build(passwords, host=broker.host, port=broker.port, root_key=keyring.root_public(),
                                   trust=keyring.trust())
            sim = SimThread(fleet).start()
            wait_until(lambda: _online(store) == n, timeout=60, what=f"{n} devices online")
            rel = create_release(store, tmp_path / "blobs", keyring.signer().key, os.urandom(size), "2.0.0",
                                 ["sim"], kind="image")
            dep = create_deployment(store, rel, device_ids=ids)
            wait_until(lambda: _count(store, ("confirmed",)) == n, timeout=120, what="all confirmed")
            # every chunk was sent once: no window overtook another, no timeout re-request...
            assert sum(c.center.chunks for c in centers) == n * (size // chunk)
            assert sum(d.chunks for d in fleet.devices.values()) == n * (size // chunk)
            assert sum(c.center.forwarded for c in centers) > 0  # ...though requests reached both
        finally:
            if sim is not None:
                sim.stop()
            for c in centers:
                c.stop()
            store.dispose()

"""TLS on the broker listener: real TLS Mosquitto, real MicroPython devices, the control center."""
from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import time

import pytest

from conftest import BrokerInfo, both_interpreters
from fota.device.mqtt import MQTTClient
from fota.examples import hello_files
from fota.server.broker import SERVER_USER, Mosquitto
from fota.server.deployments import create_deployment, device_history
from fota.server.releases import create_release
from fota.server.tls import ca_der, create_ca, ensure_tls
from fota.testkit.fleet import Fleet
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files
from fota.tools.keyring import Keyring


class TlsBroker(BrokerInfo):
    """BrokerInfo of a TLS-only Mosquitto: its clients verify against tls.cafile."""

    def __init__(self, broker: Mosquitto):
        super().__init__(broker)
        self.tls = broker.tls

    @property
    def server_url(self) -> str:
        return f"mqtts://{SERVER_USER}:{self.users[SERVER_USER]}@{self.host}:{self.service_port}"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mosquitto-tls")
    files = ensure_tls(directory / "tls")
    with Mosquitto(directory / "broker", auth=True, tls=files) as m:
        info = TlsBroker(m)
        info.add_user(SERVER_USER, "server-secret")
        yield info


@pytest.fixture
def tls_fleet(tmp_path, tls_broker, sqlite_url, interpreter):
    f = Fleet(tmp_path, tls_broker, sqlite_url, ssl_context=tls_broker.tls.client_context(),
              interpreter=interpreter)
    yield f
    f.close()


def test_ca_and_server_certificate_are_made_once_and_reused(tmp_path):
    files = ensure_tls(tmp_path / "tls")
    for key in (files.keyfile, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    before = {p: p.read_bytes() for p in (files.cafile, files.certfile, files.keyfile)}
    again = ensure_tls(tmp_path / "tls")
    assert again == files and all(p.read_bytes() == data for p, data in before.items())
    # The certificate names localhost and 127.0.0.1 and chains to the CA (CPython checks both).
    ctx = files.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ca_der(files.cafile)[:1] == b"\x30"  # DER SEQUENCE


@both_interpreters
def test_signed_update_end_to_end_over_tls(tls_fleet, tls_broker):
    dev = "tls-1"
    tls_fleet.add_device(dev, cadata=tls_broker.tls.ca_der(), server_hostname="localhost")
    broker_cfg = json.loads((tls_fleet.root(dev) / "config.json").read_text())["broker"]
    assert broker_cfg["tls"] is True and bytes.fromhex(broker_cfg["cadata"]) == tls_broker.tls.ca_der()
    tls_fleet.wait_online(dev)
    files = hello_files("1.1.0")
    files["blob.bin"] = os.urandom(20000)
    rel = create_release(tls_fleet.store, tls_fleet.blobs, tls_fleet.key, pack_files(files), "1.1.0", ["unix"])
    dep = create_deployment(tls_fleet.store, rel, device_ids=[dev])
    j = tls_fleet.wait_job(dep.jobs[0].id)
    assert j.state == "confirmed", (j.state, j.code, j.reason)
    tls_fleet.wait_online(dev, version="1.1.0")
    assert tls_fleet.running_version(dev) == "1.1.0" and tls_fleet.devices[dev].reboots == 1
    history = [e.state for e in device_history(tls_fleet.store, dev) if e.job_id == j.id]
    compact = [s for i, s in enumerate(history) if i == 0 or s != history[i - 1]]
    assert compact == ["downloading", "verifying", "installing", "rebooting", "trial", "confirmed"]
    log = tls_fleet.devices[dev].log_text()
    assert "hello app 1.1.0 started" in log and "TLS handshake" not in log
    # The paho spy (a third client) saw the statuses over TLS too.
    assert "confirmed" in [s["state"] for s in tls_fleet.spy.of(dev, j.id)]


def test_device_trusting_another_ca_or_name_never_comes_online(tls_fleet, tls_broker, tmp_path):
    impostor_ca, _ = create_ca(tmp_path / "impostor", name="impostor CA")
    tls_fleet.add_device("tls-other-ca", cadata=ca_der(impostor_ca), server_hostname="localhost")
    tls_fleet.add_device("tls-other-name", cadata=tls_broker.tls.ca_der(), server_hostname="broker.example")
    expected = {"tls-other-ca": "not correctly signed by the trusted CA", "tls-other-name": "CN"}
    for dev, reason in expected.items():
        proc = tls_fleet.devices[dev]
        wait_until(lambda: "TLS handshake with" in proc.log_text() and reason in proc.log_text(),
                   timeout=15, what=f"{dev} to log its TLS failure")
    time.sleep(1.0)  # a few back-off rounds
    for dev in expected:
        row = tls_fleet.device_row(dev)
        assert not row.online and row.last_seen is None, dev
        # A verification failure is retried with back-off, not a crash of the agent.
        assert tls_fleet.devices[dev].starts == 1 and tls_fleet.devices[dev].exits == [], dev
    assert not [s for s in tls_fleet.spy.statuses if s[1] in expected]


def test_plain_mqtt_to_the_tls_port_fails(tls_broker):
    password = tls_broker.users[SERVER_USER]
    for port in (tls_broker.port, tls_broker.service_port):  # both listeners are TLS only
        plain = MQTTClient(f"plain-{time.monotonic_ns()}", tls_broker.host, port, user=SERVER_USER,
                           password=password, clean_session=True, timeout=3)
        with pytest.raises(OSError):
            plain.connect()
    # The same account and client over TLS get in (on the service listener, the server account's).
    secure = MQTTClient(f"tls-{time.monotonic_ns()}", tls_broker.host, tls_broker.service_port, user=SERVER_USER,
                        password=password, clean_session=True, timeout=3,
                        ssl_context=tls_broker.tls.client_context())
    secure.connect()
    secure.disconnect()


def test_control_center_verifies_the_broker_with_the_given_context(tls_broker, sqlite_url, tmp_path):
    from fota.server.center import ControlCenter
    from fota.server.store import Store
    ring = Keyring(tmp_path / "keys")
    ring.init()
    store = Store(sqlite_url)

    def center(url, **kw):
        return ControlCenter(store, url, tmp_path / "blobs", signer=ring.signer(),
                             client_id=f"center-{time.monotonic_ns()}", **kw)

    async def scenario():
        # mqtts:// without a context: the system's CAs, which do not know the test CA.
        with pytest.raises(ssl.SSLCertVerificationError):
            await center(tls_broker.server_url).start(timeout=5)
        with pytest.raises(ValueError, match="mqtts"):
            await center(tls_broker.server_url.replace("mqtts:", "mqtt:"),
                         ssl_context=tls_broker.tls.client_context()).start()
        c = center(tls_broker.server_url, ssl_context=tls_broker.tls.client_context())
        await c.start(timeout=5)
        await c.stop()

    asyncio.run(scenario())
    store.dispose()


def test_home_managed_broker_with_tls_init(tmp_path):
    from typer.testing import CliRunner
    from fota.cli import app
    from fota.cli_common import make_unix_device
    from fota.server.app import control_center
    from fota.server.fleet import list_devices, provision_device
    from fota.server.home import Home
    from fota.server.store import Store
    from fota.tools.supervisor import DeviceProcess

    home = Home(tmp_path / "home")
    home.keyring.init()
    assert not home.broker_tls and home.broker_url.startswith("mqtt://")  # plain by default
    result = CliRunner().invoke(app, ["broker", "tls-init", "--home", str(home.path)])
    assert result.exit_code == 0, result.output
    assert home.config()["broker_tls"] and home.broker_url.startswith("mqtts://")
    store = Store(home.database_url)
    _, password = provision_device(store, "home-tls-1", "unix")
    root = make_unix_device(home, "home-tls-1", "unix", password)
    assert json.loads((root / "config.json").read_text())["broker"]["tls"] is True

    async def scenario():
        async with control_center(home, client_id=f"center-{time.monotonic_ns()}") as center:
            assert center.ssl_context is not None
            port = home.config()["broker_port"]
            with pytest.raises(OSError):  # the managed listener is TLS only
                MQTTClient("probe", "127.0.0.1", port, user=SERVER_USER,
                           password=home.config()["server_password"], timeout=3).connect()
            proc = DeviceProcess(root).start()
            try:
                deadline = time.monotonic() + 20
                while not any(d.id == "home-tls-1" and d.online for d in list_devices(store)):
                    assert time.monotonic() < deadline, proc.log_text()
                    await asyncio.sleep(0.2)
            finally:
                proc.stop()

    asyncio.run(scenario())
    store.dispose()


def test_tls_init_with_the_operators_own_certificates(tmp_path):
    from typer.testing import CliRunner
    from fota.cli import app
    from fota.server.home import Home
    from fota.server.tls import issue_server_cert
    ca, ca_key = create_ca(tmp_path / "pki", name="operator CA")
    cert, key = issue_server_cert(tmp_path / "pki", ca, ca_key, hostnames=["broker.example"], ips=["127.0.0.1"])
    home = Home(tmp_path / "home")
    runner = CliRunner()
    partial = runner.invoke(app, ["broker", "tls-init", "--home", str(home.path), "--cafile", str(ca)])
    assert partial.exit_code == 1 and "go together" in str(partial.exception)
    result = runner.invoke(app, ["broker", "tls-init", "--home", str(home.path), "--cafile", str(ca),
                                 "--certfile", str(cert), "--keyfile", str(key)])
    assert result.exit_code == 0, result.output
    files = home.tls_files()
    assert (files.cafile, files.certfile, files.keyfile) == (ca, cert, key)
    assert home.broker_cadata() == ca_der(ca) and not home.tls_dir.exists()  # no CA of the home's own

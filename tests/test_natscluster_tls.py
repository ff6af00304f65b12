"""TLS on the NATS cluster (fota.server.natscluster with tls=): 3 real nats-server processes whose
MQTT listeners, client ports and routes speak only TLS with a certificate of the fota CA
(fota.server.tls); a real MicroPython device that pinned the CA, a control center verifying the
nodes against it; clients that do not trust the CA, and plaintext, refused."""
from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import urllib.request

import pytest

from fota.examples import hello_files
from fota.server.broker import SERVER_USER, BrokerError
from fota.server.deployments import create_deployment, device_history
from fota.server.natscluster import NatsCluster, mqtt_ping
from fota.server.releases import create_release
from fota.server.tls import TlsError, client_context, create_ca, ensure_tls, issue_server_cert
from fota.testkit.fleet import Fleet
from fota.tools.bundle import pack_files
from fota.tools.waiting import wait_until

nats = pytest.importorskip("nats")

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The fota CA with the nodes' certificate (localhost, 127.0.0.1; clientAuth for the routes),
    and an impostor CA with a certificate for the same names."""
    from fota.server.home import Home
    directory = tmp_path_factory.mktemp("pki")
    files = Home(directory / "home").nats_tls_files()  # a home's CA (test_home_on_a_tls_cluster)
    impostor_ca, impostor_key = create_ca(directory / "impostor", name="impostor CA")
    impostor = issue_server_cert(directory / "impostor", impostor_ca, impostor_key, stem="nats", client_auth=True)
    return files, impostor_ca, impostor


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki):
    files, _, _ = pki
    with NatsCluster(tmp_path_factory.mktemp("nats-tls"), server_password="server-secret", tls=files) as c:
        yield c


class TlsCluster:
    """What testkit.fleet.Fleet needs of a broker: the center's URL, the devices' address (node 2's
    MQTT listener) and their accounts."""

    def __init__(self, cluster: NatsCluster):
        self.cluster = cluster
        self.host = HOST
        self.port = cluster.mqtt_ports[1]
        self.server_url = cluster.server_url

    def add_users(self, passwords: dict[str, str]) -> None:
        self.cluster.add_devices(passwords)


@pytest.fixture
def fleet(tmp_path, cluster, pki, sqlite_url):
    files, _, _ = pki
    f = Fleet(tmp_path, TlsCluster(cluster), sqlite_url, spy=False, ssl_context=cluster.ssl_context(),
              device_settings={"progress_interval_ms": 0, "cadata": files.ca_der(), "server_hostname": "localhost"})
    yield f
    f.close()


def _connections(cluster) -> list[dict]:
    out = []
    for node in cluster.nodes:
        with urllib.request.urlopen(f"http://{HOST}:{node.ports.monitor}/connz", timeout=5) as r:
            out += json.load(r)["connections"] or []
    return out


def test_signed_update_over_tls_on_the_cluster(fleet, cluster):
    """The real MicroPython agent, with its per-device account, connects over TLS to a node's MQTT
    listener, verifying it against the CA it pinned; the control center reaches the nodes over
    TLS (tls:// URLs, handshake first, verified against the CA); a signed update goes through
    (command, chunks, statuses) and the device confirms it. Every client connection on every
    node is a TLS one."""
    dev = "ntls-1"
    fleet.add_device(dev)
    broker_cfg = json.loads((fleet.root(dev) / "config.json").read_text())["broker"]
    assert broker_cfg["tls"] is True and broker_cfg["port"] == cluster.mqtt_ports[1]
    fleet.wait_online(dev)
    files = hello_files("1.1.0")
    files["blob.bin"] = b"\x5a" * 6000
    rel = create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), "1.1.0", ["unix"])
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    job = fleet.wait_job(dep.jobs[0].id)
    assert job.state == "confirmed", (job.state, job.code, job.reason)
    fleet.wait_online(dev, version="1.1.0")
    assert fleet.running_version(dev) == "1.1.0" and fleet.devices[dev].reboots == 1
    states = [e.state for e in device_history(fleet.store, dev) if e.job_id == job.id]
    assert states[-1] == "confirmed" and "downloading" in states
    assert "TLS handshake" not in fleet.devices[dev].log_text()
    conns = _connections(cluster)
    kinds = {(c.get("kind"), c.get("type")) for c in conns}
    assert any(c.get("mqtt_client") == dev for c in conns), kinds  # the device, on node 2
    assert any(c.get("name") == fleet.center.center.client_id for c in conns)
    plain = [c for c in conns if not c.get("tls_version")]
    assert not plain, plain


def test_device_trusting_another_ca_or_name_never_comes_online(fleet, pki):
    """A device that pinned another CA, or expects another name, refuses the node: it logs the
    TLS failure, retries with back-off, and never comes online."""
    _, impostor_ca, _ = pki
    from fota.server.tls import ca_der
    fleet.add_device("ntls-other-ca", cadata=ca_der(impostor_ca))
    fleet.add_device("ntls-other-name", server_hostname="nats.example")
    expected = {"ntls-other-ca": "not correctly signed by the trusted CA", "ntls-other-name": "CN"}
    for dev, reason in expected.items():
        proc = fleet.devices[dev]
        wait_until(lambda: "TLS handshake with" in proc.log_text() and reason in proc.log_text(),
                   timeout=20, what=f"{dev} to log its TLS failure")
    for dev in expected:
        row = fleet.device_row(dev)
        assert not row.online and row.last_seen is None, dev
        assert fleet.devices[dev].starts == 1 and fleet.devices[dev].exits == [], dev


def test_clients_that_do_not_trust_the_ca_are_refused(cluster, pki, tmp_path):
    """MQTT and NATS clients verify the node's certificate: with another CA (or, for MQTT,
    another name) the handshake fails before a password is sent; a control center whose
    context trusts another CA does not start."""
    files, impostor_ca, _ = pki
    cluster.add_devices({"ntls-probe": "probe-pw"})
    port = cluster.mqtt_ports[0]
    mqtt_ping(HOST, port, "ntls-probe", "probe-pw", 5, files.client_context(), "localhost")  # trusted: in
    with pytest.raises(ssl.SSLCertVerificationError):
        mqtt_ping(HOST, port, "ntls-probe", "probe-pw", 5, client_context(impostor_ca), "localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        mqtt_ping(HOST, port, "ntls-probe", "probe-pw", 5, files.client_context(), "nats.example")
    with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not know the fota CA
        mqtt_ping(HOST, port, "ntls-probe", "probe-pw", 5, ssl.create_default_context(), "localhost")

    from fota.server.center import ControlCenter
    from fota.server.store import Store
    from fota.tools.keyring import Keyring
    ring = Keyring(tmp_path / "keys")
    ring.init()
    store = Store(f"sqlite:///{tmp_path / 'fota.db'}")

    def center(**kw):
        return ControlCenter(store, cluster.server_url, tmp_path / "blobs", signer=ring.signer(),
                             client_id=f"center-{time.monotonic_ns()}", **kw)

    async def scenario():
        with pytest.raises(ssl.SSLCertVerificationError):
            await center(ssl_context=client_context(impostor_ca)).start(timeout=2)
        with pytest.raises(ssl.SSLCertVerificationError):  # tls:// without a context: system CAs
            await center().start(timeout=2)
        c = center(ssl_context=cluster.ssl_context())
        await c.start(timeout=10)
        assert c.mqtt.connected
        await c.stop()
    try:
        asyncio.run(scenario())
    finally:
        store.dispose()


def test_plaintext_to_the_tls_ports_fails(cluster, pki):
    """No listener but monitoring speaks plaintext: an MQTT CONNECT on the MQTT port, a NATS
    client without TLS on the client port and a route without TLS on the cluster port are all
    closed; a route that speaks TLS but shows no certificate, or one of another CA, too (the
    routes are mutual TLS); a route with the cluster's certificate gets the node's INFO."""
    files, _, impostor = pki
    with pytest.raises((BrokerError, OSError)):
        mqtt_ping(HOST, cluster.mqtt_ports[0], SERVER_USER, cluster.server_password, 5)

    async def plain_nats():
        url = cluster.server_url.split(",")[0].replace("tls://", "nats://")
        await nats.connect(url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)
    with pytest.raises(Exception):
        asyncio.run(plain_nats())

    route = cluster.nodes[0].ports.cluster

    def route_hello(ctx: ssl.SSLContext | None) -> bytes:
        with socket.create_connection((HOST, route), timeout=5) as raw:
            sock = raw if ctx is None else ctx.wrap_socket(raw, server_hostname="localhost")
            if ctx is None:
                sock.sendall(b'CONNECT {"name":"intruder"}\r\nPING\r\n')
            return sock.recv(4096)

    assert route_hello(None) == b""
    with pytest.raises(ssl.SSLError):
        route_hello(files.client_context())  # TLS, no client certificate
    other = files.client_context()
    other.load_cert_chain(*map(str, impostor))  # a certificate of another CA
    with pytest.raises((ssl.SSLError, ConnectionError)):
        assert route_hello(other) == b""
    own = files.client_context()
    own.load_cert_chain(str(files.certfile), str(files.keyfile))
    assert route_hello(own).startswith(b"INFO ")

    # And the center refuses to send a password to a node in clear: an ssl_context with nats://
    # URLs, or nodes listed with and without TLS, are configuration errors.
    from fota.server.center.natsconn import NatsAddress
    with pytest.raises(ValueError, match="tls://"):
        NatsAddress.parse(cluster.server_url.replace("tls://", "nats://"), cluster.ssl_context())
    first, *rest = cluster.server_url.split(",")
    with pytest.raises(ValueError, match="all or none"):
        NatsAddress.parse(",".join([first.replace("tls://", "nats://"), *rest]))


def test_node_certificate_is_made_once_and_must_allow_client_auth(tmp_path):
    """The nodes' certificate sits next to Mosquitto's, from the same CA, and is reused; a
    serverAuth-only certificate (Mosquitto's) is refused for a cluster: the routes would fail."""
    nodes = ensure_tls(tmp_path / "tls", ["localhost", "nats1.example"], ["127.0.0.1"], stem="nats",
                       client_auth=True)
    mosquitto = ensure_tls(tmp_path / "tls")
    assert nodes.cafile == mosquitto.cafile and nodes.certfile.name == "nats.pem"
    before = nodes.certfile.read_bytes()
    assert ensure_tls(tmp_path / "tls", ["localhost", "nats1.example"], ["127.0.0.1"], stem="nats",
                      client_auth=True).certfile.read_bytes() == before
    with pytest.raises(TlsError, match="clientAuth"):
        NatsCluster(tmp_path / "nats", server_password="x", tls=mosquitto)
    # `fota broker nats-tls-init` is for a home whose broker is a NATS cluster
    from typer.testing import CliRunner

    from fota.cli import app
    result = CliRunner().invoke(app, ["broker", "nats-tls-init", "--home", str(tmp_path / "home")])
    assert result.exit_code == 1 and "not a NATS cluster" in str(result.exception)


def test_home_on_a_tls_cluster(cluster, pki):
    """A home whose broker_url lists the nodes (nats://…): `fota broker nats-tls-init` issues
    the nodes' certificate from the home's CA (here: the one the cluster already runs with,
    reused), switches broker_url to tls://, and from then on the control center (`fota serve`'s
    control_center) verifies the nodes against that CA and a device made by the home pins it and
    comes online over TLS on a node's MQTT listener."""
    from typer.testing import CliRunner

    from fota.cli import app
    from fota.cli_common import make_unix_device
    from fota.server.app import control_center
    from fota.server.fleet import list_devices, provision_device
    from fota.server.home import Home
    from fota.server.store import Store
    from fota.tools.supervisor import DeviceProcess
    files, _, _ = pki
    home = Home(files.cafile.parent.parent)
    home.keyring.init()
    cfg = home.config()
    cfg.update(broker_url=cluster.server_url.replace("tls://", "nats://"), broker_mqtt_port=cluster.mqtt_ports[2],
               broker_hostname="localhost")
    home.save_config(cfg)
    assert not home.broker_tls and home.broker_cadata() is None
    cert = files.certfile.read_bytes()
    result = CliRunner().invoke(app, ["broker", "nats-tls-init", "--home", str(home.path), "--hostname", "localhost"])
    assert result.exit_code == 0, result.output
    assert "handshake_first" in result.output and str(files.certfile) in result.output
    assert files.certfile.read_bytes() == cert  # reused: the same names, the same CA
    assert home.broker_url == cluster.server_url and home.broker_tls
    assert home.broker_cadata() == files.ca_der()
    store = Store(home.database_url)
    _, password = provision_device(store, "ntls-home-1", "unix")
    cluster.add_devices({"ntls-home-1": password})
    root = make_unix_device(home, "ntls-home-1", "unix", password)
    broker = json.loads((root / "config.json").read_text())["broker"]
    assert (broker["host"], broker["port"], broker["tls"]) == ("localhost", cluster.mqtt_ports[2], True)

    async def scenario():
        async with control_center(home, client_id=f"center-{time.monotonic_ns()}") as center:
            assert center.ssl_context is not None and center.mqtt.connected
            proc = DeviceProcess(root).start()
            try:
                deadline = time.monotonic() + 20
                while not any(d.id == "ntls-home-1" and d.online for d in list_devices(store)):
                    assert time.monotonic() < deadline, proc.log_text()
                    await asyncio.sleep(0.2)
            finally:
                proc.stop()
    try:
        asyncio.run(scenario())
    finally:
        store.dispose()

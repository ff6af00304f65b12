"""The managed broker reachable by boards: its device listener beyond loopback, TLS only, the
server certificate naming the address boards use (real Mosquitto, real TLS handshakes)."""
from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import subprocess
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from typer.testing import CliRunner

from fota.cli import app
from fota.server.broker import BrokerError, free_port, parse_listen, write_config
from fota.server.home import Home
from fota.server.tls import client_context, ensure_tls

NAME = "fota.home.arpa"


def _network_address() -> str | None:
    """One of this machine's non-loopback IPv4 addresses (hostname -I), None if it has none."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        try:
            ip = ipaddress.ip_address(word)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback:
            return word
    return None


def _serve(home: Home, *args: str) -> str:
    """What `fota serve` printed, its error included (fail() raises CLIError)."""
    result = CliRunner().invoke(app, ["serve", "--home", str(home.path), *args])
    return result.output + str(result.exception or "")


def _san(certfile) -> set[str]:
    san = x509.load_pem_x509_certificate(certfile.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    return {*san.get_values_for_type(x509.DNSName)} | {str(i) for i in san.get_values_for_type(x509.IPAddress)}


def test_parse_listen():
    assert parse_listen("0.0.0.0") == ("0.0.0.0", None)
    assert parse_listen("192.0.2.7:8884") == ("192.0.2.7", 8884)
    assert parse_listen("[::]:8883") == ("::", 8883)
    assert parse_listen("broker.lan") == ("broker.lan", None)
    for bad in ("0.0.0.0:", "0.0.0.0:99999", ":8883", "[::1]x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_config_opens_only_the_device_listener_with_tls(tmp_path):
    files = ensure_tls(tmp_path / "tls")
    conf = write_config(tmp_path / "broker", 8883, service_port=18830, tls=files, host="0.0.0.0").read_text()
    device, service = conf.split("listener ")[1:]
    assert device.startswith("8883 0.0.0.0\n")
    for line in (f"cafile {files.cafile}", f"certfile {files.certfile}", f"keyfile {files.keyfile}"):
        assert line in device and line in service
    assert service.startswith("18830 127.0.0.1\n")
    with pytest.raises(BrokerError, match="needs TLS"):
        write_config(tmp_path / "plain", 8883, service_port=18830, host="0.0.0.0")


def _listen(home: Home, listen: str, hostname: str | None = None) -> None:
    """What 'fota serve --listen --hostname' keeps once its checks passed (without serving)."""
    from fota.cli import _broker_listen_settings, _save_broker_listen
    _save_broker_listen(home, _broker_listen_settings(home, listen, hostname))


def test_listen_beyond_loopback_turns_tls_on_and_persists(tmp_path):
    from test_cli import background, stop
    home = Home(tmp_path / "home")
    assert home.broker_listen == ("127.0.0.1", home.config()["broker_port"]) and not home.broker_tls
    home.keyring.init()
    port = free_port()
    proc = background(home.path, "serve", "--listen", f"0.0.0.0:{port}", "--hostname", NAME)
    try:
        from fota.tools.waiting import wait_until
        wait_until(lambda: json.loads(home.config_path.read_text()).get("broker_listen"), timeout=30,
                   what="fota serve --listen did not keep its settings")
    finally:
        out = stop(proc)
    assert "TLS turned on" in out and f"device listener on 0.0.0.0:{port}" in out, out
    cfg = json.loads(home.config_path.read_text())
    assert (cfg["broker_listen"], cfg["broker_hostname"], cfg["broker_tls"]) == (f"0.0.0.0:{port}", NAME, True)
    assert home.device_broker == (NAME, port)
    url = urlsplit(home.broker_url)  # the center stays on loopback
    assert (url.scheme, url.hostname, url.port) == ("mqtts", "127.0.0.1", home.config()["broker_service_port"])
    cfg.update(broker_listen="0.0.0.0")
    home.save_config(cfg)
    assert home.broker_listen == ("0.0.0.0", 8883)  # the MQTT-over-TLS port by default
    assert "not an ADDR[:PORT]" in _serve(home, "--listen", "0.0.0.0:x")


def test_serve_that_fails_keeps_no_listen_settings(tmp_path):
    """--listen/--hostname are kept only when serving starts: no keys, or a second worker on
    SQLite, leave config.json as it was."""
    home = Home(tmp_path / "home")
    before = json.loads(home.config_path.read_text()) if home.config_path.exists() else home.config()
    out = _serve(home, "--listen", "0.0.0.0", "--hostname", NAME)
    assert "no keys" in out and "TLS turned on" not in out
    home.keyring.init()
    out = _serve(home, "--listen", "0.0.0.0", "--hostname", NAME, "--workers", "2")
    assert "SQLite supports one" in out
    assert json.loads(home.config_path.read_text()) == before
    assert not home.broker_tls and home.broker_listen[0] == "127.0.0.1"


def test_certificate_names_the_listen_address_and_hostname_same_ca(tmp_path):
    home = Home(tmp_path / "home")
    home.config()
    files = ensure_tls(home.tls_dir, *home.tls_names())
    ca_before = files.cafile.read_bytes()
    assert _san(files.certfile) == {"localhost", "127.0.0.1"}
    cfg = home.config()
    cfg.update(broker_listen="192.0.2.7:8884", broker_hostname=NAME)
    home.save_config(cfg)
    files = home.tls_files()  # TLS implied by the listener beyond loopback
    assert _san(files.certfile) == {"localhost", "127.0.0.1", "192.0.2.7", NAME}
    assert files.cafile.read_bytes() == ca_before  # re-issued by the CA devices already pin


def test_a_board_on_the_network_verifies_the_broker(tmp_path):
    """The managed broker bound to the machine's network address (or every address when it has
    none): a TLS client there verifies the certificate by --hostname and by IP against the
    home's CA, and the service listener is not reachable from the network."""
    from fota.server.app import managed_broker
    address = _network_address()
    home = Home(tmp_path / "home")
    port = free_port()
    home.keyring.init()
    _listen(home, f"{address or '0.0.0.0'}:{port}", NAME)
    assert home.broker_tls
    store = home.store()
    broker = managed_broker(home, store)
    try:
        target = address or "127.0.0.1"
        ctx = client_context(home.broker_cafile)
        for server_hostname in (NAME, target):
            with socket.create_connection((target, port), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with socket.create_connection((target, port), timeout=5) as raw, pytest.raises(ssl.SSLCertVerificationError):
            ctx.wrap_socket(raw, server_hostname="other.home.arpa")
        if address:
            with pytest.raises(OSError):
                socket.create_connection((address, home.config()["broker_service_port"]), timeout=2).close()
    finally:
        broker.stop()
        store.dispose()


def test_simulated_devices_connect_to_a_tls_home(tmp_path):
    """fota simulate on a home whose broker listens beyond loopback (TLS only, a --hostname that
    does not resolve here), started as soon as fota serve's broker answers: the simulated devices
    connect to the devices' TLS listener, verifying it with the home's CA (Mosquitto accepts
    nothing else there), the control center marks them online, and a rollout to them is confirmed."""
    import os

    from fota.tools.waiting import wait_until
    from test_cli import FOTA, background, fota, stop, wait_listed
    home = Home(tmp_path / "home")
    home.keyring.init()
    port = free_port()
    _listen(home, f"0.0.0.0:{port}", NAME)
    image = tmp_path / "fw.bin"
    image.write_bytes(os.urandom(4 * 1024))
    r = fota(home.path, "release", "create", str(image), "--version", "2.0.0", "--hardware", "unix")
    assert r.returncode == 0, r.stdout + r.stderr  # the database made before two processes open it
    serve = subprocess.Popen(FOTA + ["serve"], env=dict(os.environ, FOTA_HOME=str(home.path)),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sim = None
    try:
        wait_until(lambda: _answers(port), timeout=30, what="fota serve did not start")
        sim = background(home.path, "simulate", "--devices", "2", "--hardware", "unix", "--duration", "60")
        wait_listed(home.path, lambda listing: listing.count("sim-000") == 2 and listing.count("yes") == 2,
                    "the control center did not mark the simulated devices online", sim, serve,
                    timeout=30, interval=0.3)
        r = fota(home.path, "deploy", "2.0.0", "--tag", "sim")
        assert r.returncode == 0 and "2 device(s)" in r.stdout, r.stdout + r.stderr
        watch = fota(home.path, "status", "--watch", timeout=60)
        assert "2 confirmed" in watch.stdout, watch.stdout + watch.stderr
    finally:
        sim_out = stop(sim) if sim is not None else ""
        out = stop(serve)
    assert "connected 2/2" in sim_out and "confirmed 2" in sim_out, sim_out + out
    assert "TLS-only" not in sim_out and "Traceback" not in sim_out + out, sim_out + out
    assert "unprovisioned" not in out, out


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False

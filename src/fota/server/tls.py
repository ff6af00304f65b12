"""TLS for the broker listener: a private CA, the broker's server certificate, device CA data.

    <dir>/ca.pem, ca.key          the fota CA (devices pin it; the key only issues server certs)
    <dir>/server.pem, server.key  the broker's certificate (EC P-256, SAN DNS + IP, serverAuth)
    <dir>/nats.pem, nats.key      the NATS nodes' certificate (the same, plus clientAuth: routes)

Keys are EC P-256, written 0600. `ensure_tls(dir)` creates what is missing and reuses the rest,
so the CA that devices were provisioned with survives restarts. Operators with their own PKI
pass their files instead: `TlsFiles(cafile, certfile, keyfile)` (see docs/architecture.md, TLS).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fota.tools.private import private_dir

RENEW_BEFORE = datetime.timedelta(days=30)   # ensure_tls re-issues a server cert this close to expiry


class TlsError(RuntimeError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a TLS listener: the CA that clients verify against, the server cert and key."""
    cafile: Path
    certfile: Path
    keyfile: Path

    def __post_init__(self):
        for name in ("cafile", "certfile", "keyfile"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        missing = [str(p) for p in (self.cafile, self.certfile, self.keyfile) if not p.is_file()]
        if missing:
            raise TlsError(f"TLS file(s) not found: {', '.join(missing)}")

    def ca_der(self) -> bytes:
        return ca_der(self.cafile)

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.cafile)


def client_context(cafile: Path) -> ssl.SSLContext:
    """A client context that trusts only cafile (hostname checked, TLS 1.2 or later)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
    finally:
        os.close(fd)
    tmp.replace(path)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp.replace(path)


def create_ca(directory: Path, name: str = "fota CA", days: int = 3650) -> tuple[Path, Path]:
    """Create a self-signed CA (EC P-256) in directory: returns (ca.pem, ca.key)."""
    directory = Path(directory)
    private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=True, crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    _write_key(key, key_path)
    _write_cert(cert, cert_path)
    return cert_path, key_path


def issue_server_cert(directory: Path, ca_cert: Path, ca_key: Path, hostnames=("localhost",),
                      ips=("127.0.0.1",), days: int = 825, *, stem: str = "server",
                      client_auth: bool = False) -> tuple[Path, Path]:
    """Issue the broker's certificate signed by the CA: returns (<stem>.pem, <stem>.key).

    client_auth: the certificate may also authenticate its holder as a TLS client (extended key
    usage clientAuth besides serverAuth): a NATS node presents it to the other nodes on the
    cluster routes, which verify it (mutual TLS)."""
    directory = Path(directory)
    private_dir(directory)
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    hostnames, ips = list(hostnames), list(ips)
    if not hostnames and not ips:
        raise TlsError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName(h) for h in hostnames] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hostnames or ips)[0])]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=days), ca.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]
                                                 + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_key(key, key_path)
    _write_cert(cert, cert_path)
    return cert_path, key_path


def ca_der(ca_cert_path: Path) -> bytes:
    """The CA certificate as DER, what a device pins (the first certificate of a PEM bundle)."""
    return x509.load_pem_x509_certificate(Path(ca_cert_path).read_bytes()).public_bytes(serialization.Encoding.DER)


def has_client_auth(cert_path: Path) -> bool:
    """The certificate's extended key usage allows TLS client authentication (or is unrestricted)."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in usage


def _needs_server_cert(cert_path: Path, key_path: Path, ca_path: Path, hostnames, ips,
                       client_auth: bool = False) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return True
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return True  # the CA was replaced
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    wanted = {*hostnames} | {ipaddress.ip_address(i) for i in ips}
    have = {*san.get_values_for_type(x509.DNSName)} | {*san.get_values_for_type(x509.IPAddress)}
    if client_auth and not has_client_auth(cert_path):
        return True
    return not wanted <= have or cert.not_valid_after_utc - _now() < RENEW_BEFORE


def ensure_tls(directory: Path, hostnames=("localhost",), ips=("127.0.0.1",), *, stem: str = "server",
               client_auth: bool = False) -> TlsFiles:
    """The CA and server certificate in directory, created on first use and then reused.

    The server certificate is re-issued (by the same CA, so devices keep working) when it is
    missing, close to expiry, lacks one of hostnames/ips, or was not issued by ca.pem.
    stem: the certificate's file names (<stem>.pem, <stem>.key): "server" for Mosquitto, "nats"
    for the NATS nodes' certificate, which also has client_auth (the cluster routes' mutual TLS).
    """
    directory = Path(directory)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
    if not ca_cert.exists():
        if (directory / f"{stem}.pem").exists():
            raise TlsError(f"{ca_cert} is missing but {directory / (stem + '.pem')} exists: restore the CA "
                           "(devices pin it) or remove the directory to start over")
        create_ca(directory)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    if _needs_server_cert(cert, key, ca_cert, hostnames, ips, client_auth):
        if not ca_key.exists():
            raise TlsError(f"the server certificate must be (re-)issued but the CA key {ca_key} is missing")
        issue_server_cert(directory, ca_cert, ca_key, hostnames, ips, stem=stem, client_auth=client_auth)
    return TlsFiles(ca_cert, cert, key)

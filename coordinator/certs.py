"""`coordinator certs`: a private CA and the certificates of one deployment, with `cryptography`.

Owns: making a CA (ca.pem, ca-key.pem), one certificate and key per host (HOST.pem, HOST-key.pem)
whose subject alternative names are the host's name or address plus localhost, 127.0.0.1 and ::1
(so that launch-local and a stage's same-machine peers dial it by loopback too), with both the
serverAuth and clientAuth uses (a stage serves its upstream and dials its next stage), and one
client certificate (client.pem, client-key.pem; clientAuth only) for a coordinator that runs on no
listed host and for API clients. Keys are ECDSA P-256, created with mode 0600 (never widened
first); the directory is created 0700. An existing CA is kept unless `force`: a new one would
stop every certificate it signed from being trusted.

Does not own: reading or checking the files at start (protos/tls.py) or the flags (tls_arguments).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 825
CLIENT_NAME = "client"
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*$")


class CertificateError(ValueError):
    """The hosts or the directory cannot be used; one line saying what to do."""


def parse_hosts(text: str) -> list[str]:
    """'NAME,NAME,IP,...' as a list of host names and addresses, each checked."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise CertificateError("--hosts needs at least one host name or IP address, e.g. --hosts node1,10.0.0.2")
    for host in hosts:
        if not (_is_address(host) or _DNS_NAME.match(host)) or len(host) > 253:
            raise CertificateError(f"--hosts: {host!r} is neither a DNS name nor an IP address")
        if host == CLIENT_NAME:
            raise CertificateError(f"--hosts: {CLIENT_NAME!r} names the client certificate; call the host otherwise")
    if len(set(hosts)) != len(hosts):
        raise CertificateError("--hosts names a host twice")
    return hosts


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _alternative_name(host: str) -> x509.GeneralName:
    return x509.IPAddress(ipaddress.ip_address(host)) if _is_address(host) else x509.DNSName(host)


def _file_stem(host: str) -> str:
    return host.replace(":", "_").replace("*", "_wildcard")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write a fresh file created with `mode` (an old one is removed first, so it never keeps a
    wider mode)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer).public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerline CA")])
    certificate = (_builder("layerline CA", name, key.public_key(), days)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(key, hashes.SHA256()))
    return key, certificate


def _make_leaf(name: str, alternative_names: list[str], uses: list, ca_key, ca: x509.Certificate,
               days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (_builder(name, ca.subject, key.public_key(), days)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(uses), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if alternative_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_alternative_name(n) for n in alternative_names]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def host_names(host: str) -> list[str]:
    """The subject alternative names of `host`'s certificate: itself, then the loopback names."""
    return [host, *(n for n in LOOPBACK_NAMES if n != host)]


def make_certificates(out: Path, hosts: list[str], *, force: bool = False, days: int = DEFAULT_DAYS) -> list[Path]:
    """Write a CA, a certificate per host and a client certificate into `out`; returns the paths written."""
    if days < 1:
        raise CertificateError("--days must be at least 1")
    out = Path(out)
    ca_path, ca_key_path = out / "ca.pem", out / "ca-key.pem"
    if (ca_path.exists() or ca_key_path.exists()) and not force:
        raise CertificateError(f"{ca_path} exists: pass --force to make a new CA (certificates signed by the old "
                               "one stop being trusted), or --out another directory")
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise CertificateError(f"cannot create --out {out}: {err.strerror or err}") from None
    ca_key, ca = _make_ca(days)
    written: list[Path] = []

    def save(stem: str, key, certificate) -> None:
        _write(out / f"{stem}-key.pem", _key_pem(key), 0o600)
        _write(out / f"{stem}.pem", _cert_pem(certificate), 0o644)
        written.extend([out / f"{stem}.pem", out / f"{stem}-key.pem"])

    save("ca", ca_key, ca)
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for host in hosts:
        save(_file_stem(host), *_make_leaf(host, host_names(host), both, ca_key, ca, days))
    save(CLIENT_NAME, *_make_leaf("layerline client", [], [ExtendedKeyUsageOID.CLIENT_AUTH], ca_key, ca, days))
    return written


def add_certs_command(commands) -> None:
    """The `certs` subcommand on the coordinator's subparsers."""
    certs = commands.add_parser("certs", help="make a CA and TLS certificates for the stages, coordinator and clients")
    certs.add_argument("--out", required=True, metavar="DIR", help="directory to write the files into (made 0700)")
    certs.add_argument("--hosts", required=True, metavar="NAME,IP,...",
                       help="host names and IP addresses the stages and coordinator are dialled by, comma separated; "
                            "one certificate each (localhost, 127.0.0.1 and ::1 are added to each)")
    certs.add_argument("--days", type=int, default=DEFAULT_DAYS,
                       help=f"days the certificates are valid (default {DEFAULT_DAYS})")
    certs.add_argument("--force", action="store_true", help="replace an existing CA in --out")


def cmd_certs(args: argparse.Namespace) -> int:
    written = make_certificates(Path(args.out), parse_hosts(args.hosts), force=args.force, days=args.days)
    for path in written:
        print(f"wrote {path}" + (" (private key, mode 0600)" if path.name.endswith("-key.pem") else ""))
    print("keep ca-key.pem off the serving machines; give each host its HOST.pem, HOST-key.pem and ca.pem")
    return 0

"""TLS on every gRPC hop: the files, the credentials made from them, and the one way to open a channel.

Owns: `TlsFiles` (a CA, a certificate and its key, read and checked once, so that a missing,
unreadable or mismatched file is one line at start rather than a failed handshake later), the
server credentials made from them (a CA given: every peer must present a certificate that chains
to it, mutual TLS), the channel credentials (the own certificate and key, the CA the server's
certificate is checked against, host name included), `open_channel` (sync or asyncio; no TLS: an
insecure channel) and the rule of secure listening (`check_listen`: a non-loopback address needs
TLS or an explicit --insecure).

Does not own: the flags (tls_arguments), making certificates (coordinator/certs.py), binding a
port (channel_options.bind takes the credentials made here) or the same-machine Unix socket
(unix_socket; it never leaves the machine's network namespace).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from protos.addresses import is_loopback_host
from protos.channel_options import channel_options


class TlsError(OSError):
    """A TLS file cannot be used, or a server would listen in the open without TLS; one line saying
    what to do. An OSError, so that both command lines print it as their one-line error."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of one process's TLS identity. `ca`: the certificates peers must chain to (on a
    server: a client certificate is then required; on a channel: the server's is checked against
    it); `cert` and `key`: this process's own certificate chain and its private key (both or
    neither). Build with `TlsFiles.read` to have the files checked."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)

    @classmethod
    def read(cls, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
             flags: tuple[str, str, str] = ("--tls-ca", "--tls-cert", "--tls-key"),
             cert_from_ca: bool = False) -> TlsFiles:
        """Read and check the files. `flags` name them in errors; `cert_from_ca`: the certificate must
        chain to `ca` too (one CA for a whole deployment, as between stages)."""
        ca_flag, cert_flag, key_flag = flags
        if (cert is None) != (key is None):
            given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
            raise TlsError(f"{given} needs {missing} too (a certificate and its private key go together)")
        ca_pem = _read(ca, ca_flag) if ca else None
        cert_pem = _read(cert, cert_flag) if cert else None
        key_pem = _read(key, key_flag) if key else None
        authorities = _certificates(ca_pem, ca_flag, ca) if ca_pem else []
        if cert_pem is not None:
            chain = _certificates(cert_pem, cert_flag, cert)
            _check_key(chain[0], key_pem, f"{key_flag} {key}", f"{cert_flag} {cert}")
            _check_dates(chain[0], f"{cert_flag} {cert}")
            if cert_from_ca and not _issued_by(chain[-1], authorities):
                raise TlsError(f"{cert_flag} {cert} is not signed by the CA in {ca_flag} {ca}; give the CA that "
                               "signed it (coordinator certs writes both into one directory)")
        return cls(ca=ca_pem, cert=cert_pem, key=key_pem)

    @property
    def has_identity(self) -> bool:
        """Whether a certificate and key are present (to serve, or to present as a client)."""
        return self.cert is not None and self.key is not None


def _read(path: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise TlsError(f"cannot read {flag} {path}: {err.strerror or err}") from None
    if not data.strip():
        raise TlsError(f"{flag} {path} is empty")
    return data


def _certificates(pem: bytes, flag: str, path: str | None) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise TlsError(f"{flag} {path} holds no PEM certificate (expected '-----BEGIN CERTIFICATE-----')")
    return certificates


def _check_key(certificate: x509.Certificate, key_pem: bytes | None, key_name: str, cert_name: str) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem or b"", password=None)
    except (ValueError, TypeError) as err:
        raise TlsError(f"{key_name} is not an unencrypted PEM private key ({err})") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            certificate.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TlsError(f"{key_name} is not the private key of {cert_name}; give the key made with that certificate")


def _check_dates(certificate: x509.Certificate, name: str) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if certificate.not_valid_after_utc < now:
        raise TlsError(f"{name} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; make new certificates")
    if certificate.not_valid_before_utc > now:
        raise TlsError(f"{name} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
                       "check this machine's clock")


def _issued_by(certificate: x509.Certificate, authorities: list[x509.Certificate]) -> bool:
    for authority in authorities:
        if authority == certificate:
            return True
        if authority.subject == certificate.issuer:
            try:
                certificate.verify_directly_issued_by(authority)
                return True
            except (ValueError, TypeError, InvalidSignature):
                continue
    return False


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Credentials for a server's port: its certificate and key; with a CA, clients must present a
    certificate that chains to it (mutual TLS), else they need none (server-side TLS)."""
    if not tls.has_identity:
        raise TlsError("a TLS server needs a certificate and its key")
    return grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                       require_client_auth=tls.ca is not None)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Credentials for a channel: the server's certificate is checked against the CA (gRPC's default
    roots where none is given) and must name the host dialled; the own certificate, if any, is
    presented to servers that ask for one."""
    return grpc.ssl_channel_credentials(root_certificates=tls.ca, private_key=tls.key, certificate_chain=tls.cert)


def open_channel(address: str, tls: TlsFiles | None = None, *, aio: bool = False,
                 options: list[tuple[str, int]] | None = None):
    """A channel to `address` with layerline's options: over TLS with `tls`, plaintext without;
    a grpc.aio channel when `aio`. Every layerline channel is opened here."""
    grpc_module = grpc.aio if aio else grpc
    options = channel_options() if options is None else options
    if tls is None:
        return grpc_module.insecure_channel(address, options=options)
    return grpc_module.secure_channel(address, channel_credentials(tls), options=options)


def check_listen(host: str, *, tls: bool, insecure: bool, tls_flags: str) -> None:
    """Refuse to listen on a non-loopback `host` without TLS unless `insecure` (--insecure) is given.
    `tls_flags` names the flags that would give the server TLS."""
    if tls or insecure or is_loopback_host(host):
        return
    raise TlsError(f"refusing to listen on {host} without TLS: anyone who reaches the port could use it; give "
                   f"{tls_flags} (coordinator certs makes them), or --insecure on a network you trust")

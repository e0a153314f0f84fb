"""The TLS flags of both command lines, and turning them into `TlsFiles`.

Owns: `--tls-cert/--tls-key/--tls-ca` (the hops between a deployment's processes: mutual TLS, all
three together), `--api-tls-cert/--api-tls-key/--api-tls-ca` (the coordinator's public API:
server-side TLS, client certificates required when a CA is given), the client form of the hop
flags (`coordinator generate`, `coordinator info`: a CA to check the server, a certificate only if
the server asks for one) and `--insecure`; reading them (`hop_tls`, `api_tls`, `client_tls`) and
the secure-listening check of a command (`check_server_listen`).

Does not own: what the files are checked for or how credentials are made (protos/tls.py, imported
only when TLS flags are read: `stage-server` adds these flags before it has loaded gRPC).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protos.tls import TlsFiles

HOP_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")
API_FLAGS = ("--api-tls-ca", "--api-tls-cert", "--api-tls-key")


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The hop flags of a server (stage-server, coordinator serve / launch-local)."""
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="this process's certificate (PEM) for the hops between stages and coordinator; with "
                             "--tls-key and --tls-ca, every hop is mutual TLS (coordinator certs makes them)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key (PEM) of --tls-cert")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="the CA (PEM) every peer's certificate must chain to; peers without one are refused")


def add_api_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """The public API's flags (coordinator serve / launch-local)."""
    parser.add_argument("--api-tls-cert", metavar="FILE",
                        help="certificate (PEM) of the public API: clients connect over TLS")
    parser.add_argument("--api-tls-key", metavar="FILE", help="the private key (PEM) of --api-tls-cert")
    parser.add_argument("--api-tls-ca", metavar="FILE",
                        help="require API clients to present a certificate that chains to this CA (PEM)")


def add_client_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """A client's flags (coordinator generate / info): the same names as the hop flags."""
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="connect over TLS, checking the server's certificate against this CA (PEM); with "
                             "--stages, the stages' CA")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="client certificate (PEM) to present (for a server that requires one; with --stages, "
                             "needed)")
    parser.add_argument("--tls-key", metavar="FILE", help="the private key (PEM) of --tls-cert")


def add_insecure_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--insecure", action="store_true",
                        help="listen on a non-loopback --host without TLS (refused otherwise); only on a network "
                             "you trust")


def hop_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The hop flags as TlsFiles (None when none is given); all three go together."""
    from protos.tls import TlsError, TlsFiles

    given = [args.tls_ca, args.tls_cert, args.tls_key]
    if not any(given):
        return None
    missing = [flag for flag, value in zip(HOP_FLAGS, given) if not value]
    if missing:
        raise TlsError(f"mutual TLS between hops needs {', '.join(HOP_FLAGS)} together; missing {', '.join(missing)}")
    return TlsFiles.read(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, flags=HOP_FLAGS, cert_from_ca=True)


def api_tls(args: argparse.Namespace) -> TlsFiles | None:
    """The public API's flags as TlsFiles (None when none is given)."""
    from protos.tls import TlsError, TlsFiles

    if not (args.api_tls_cert or args.api_tls_key or args.api_tls_ca):
        return None
    if not args.api_tls_cert:
        raise TlsError("--api-tls-cert and --api-tls-key are needed for TLS on the public API")
    return TlsFiles.read(ca=args.api_tls_ca, cert=args.api_tls_cert, key=args.api_tls_key, flags=API_FLAGS)


def client_tls(args: argparse.Namespace) -> TlsFiles | None:
    """A client's flags as TlsFiles (None when none is given: plaintext)."""
    from protos.tls import TlsFiles

    if not (args.tls_ca or args.tls_cert or args.tls_key):
        return None
    return TlsFiles.read(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, flags=HOP_FLAGS)


def check_server_listen(args: argparse.Namespace, *, hops: bool | None = None, api: bool | None = None) -> None:
    """Refuse a non-loopback --host without TLS unless --insecure. `hops`: whether the command takes
    hops there (a stage), and whether they have TLS; `api`: the same for the public API (None: the
    command does not serve it)."""
    from protos.tls import check_listen

    if hops is not None:
        check_listen(args.host, tls=hops, insecure=args.insecure, tls_flags=", ".join(HOP_FLAGS))
    if api is not None:
        check_listen(args.host, tls=api, insecure=args.insecure, tls_flags="--api-tls-cert and --api-tls-key")


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """Every TLS flag of a coordinator that serves the public API (serve, launch-local)."""
    add_tls_arguments(parser)
    add_api_tls_arguments(parser)
    add_insecure_argument(parser)


def serving_tls(args: argparse.Namespace, *, stages_listen: bool, api_listens: bool = True
                ) -> dict[str, TlsFiles | None]:
    """The coordinator's TLS files as CoordinatorConfig fields (stage_tls, api_tls), after the
    secure-listening check of its --host; `stages_listen`: stages started by this command listen
    on --host too (launch-local); `api_listens`: so does the public API (not for a one-shot
    launch-local, whose API listens on loopback)."""
    hops, api = hop_tls(args), api_tls(args)
    check_server_listen(args, hops=(hops is not None) if stages_listen else None,
                        api=(api is not None) if api_listens else None)
    return {"stage_tls": hops, "api_tls": api}


def stage_tls_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The hop flags and --insecure as given, for the stage processes a command starts."""
    flags = [(flag, value) for flag, value in zip(HOP_FLAGS, (args.tls_ca, args.tls_cert, args.tls_key)) if value]
    return (*(part for pair in flags for part in pair), *(("--insecure",) if args.insecure else ()))

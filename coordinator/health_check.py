"""A one-shot grpc.health.v1 check of a stage server or coordinator, for container health checks.

Owns: `python -m coordinator.health_check HOST:PORT [--tls-ca F --tls-cert F --tls-key F]
[--service NAME] [--timeout S]`: one Health.Check call, exit status 0 when the answer is SERVING,
1 otherwise (NOT_SERVING, no answer in time, refused), one line on stdout either way. With the hop
TLS files it speaks mutual TLS, which a Kubernetes `grpc:` probe cannot (the kubelet presents no
client certificate), so a deployment whose ports take only mutual TLS probes through this command.

Does not own: the health states themselves (each server sets them: NOT_SERVING while loading and
draining), the TLS files' checks (protos/tls.py), nor the container entrypoint that calls it
(deploy/docker/entrypoint.sh, `health`).
"""

from __future__ import annotations

import argparse
import sys

from protos.tls_arguments import add_client_tls_arguments, client_tls

DEFAULT_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m coordinator.health_check",
                                     description="exit 0 when the server at ADDRESS answers SERVING on grpc.health.v1")
    parser.add_argument("address", metavar="HOST:PORT", help="the server to ask, e.g. 127.0.0.1:50051")
    parser.add_argument("--service", default="", help="the health service name to ask about (default: the server)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the answer (default {DEFAULT_TIMEOUT_S:g}, "
                             f"at most {MAX_TIMEOUT_S:g})")
    add_client_tls_arguments(parser)
    return parser


def check(address: str, *, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S, tls=None) -> tuple[bool, str]:
    """(serving, one line saying what the server answered or why there was no answer)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.tls import open_channel

    with open_channel(address, tls) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=False)
        except grpc.RpcError as err:
            detail = (err.details() or "").partition("\n")[0]
            return False, f"{address}: no health answer ({err.code().name}: {detail})"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, f"{address}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        print(f"--timeout must be more than 0 and at most {MAX_TIMEOUT_S:g} seconds", file=sys.stderr)
        return 2
    try:
        tls = client_tls(args)
    except OSError as err:  # TlsError: a missing or mismatched file, one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    serving, line = check(args.address, service=args.service, timeout_s=args.timeout, tls=tls)
    print(line)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())

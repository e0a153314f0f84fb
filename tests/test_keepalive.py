"""Servers accept the pings our channels send, so an idle stream keeps its connection (protos/channel_options.py)."""

from __future__ import annotations

import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.channel_options import KEEPALIVE_TIME_MS, SERVER_MIN_PING_INTERVAL_MS, channel_options, server_options

PING_EVERY_MS = 200  # the channels' 30 s and the servers' 10 s, scaled down so the test takes seconds
IDLE_S = 6.0


def idle_stream_outcome(server_opts: list[tuple[str, int]]) -> grpc.StatusCode:
    """Open a health Watch (one message, then silence) on a server with `server_opts`, from a channel
    pinging every PING_EVERY_MS; returns how the stream ended (DEADLINE_EXCEEDED = it lived)."""
    server = grpc.server(futures.ThreadPoolExecutor(2), options=server_opts)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    options = [(k, v) for k, v in channel_options() if k != "grpc.keepalive_time_ms"]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[*options, ("grpc.keepalive_time_ms", PING_EVERY_MS)]) \
                as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""),
                                                                timeout=IDLE_S)
            started = time.monotonic()
            try:
                for _ in stream:
                    pass
            except grpc.RpcError as err:
                assert time.monotonic() - started < IDLE_S + 5
                return err.code()
            return grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_an_idle_stream_outlives_the_channels_pings():
    assert idle_stream_outcome(server_options(min_ping_interval_ms=PING_EVERY_MS // 3)) == \
        grpc.StatusCode.DEADLINE_EXCEEDED


def test_with_grpcs_default_the_server_closes_it():
    """The failure the setting prevents: GOAWAY too_many_pings after three pings without data. The
    channels' options alone leave the server at gRPC's default ping policy."""
    assert idle_stream_outcome(channel_options()) == grpc.StatusCode.UNAVAILABLE


def test_servers_accept_pings_more_often_than_channels_send_them():
    assert SERVER_MIN_PING_INTERVAL_MS < KEEPALIVE_TIME_MS
    assert ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS) in server_options()

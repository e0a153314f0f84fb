"""The delaying TCP relay on loopback: a round trip takes twice the one-way latency, bytes arrive
whole and in order both ways, half-closes travel on, a target that refuses closes the connection,
and closing the relay ends its connections within its bound."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
from delay_relay import DelayRelay


@pytest.fixture
def echo_server():
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    listener.close()
    thread.join(5)


def _round_trip_s(address: str, trips: int = 10) -> float:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        best = float("inf")
        for _ in range(trips):
            started = time.perf_counter()
            sock.sendall(b"x" * 100)
            got = b""
            while len(got) < 100:
                got += sock.recv(100 - len(got))
            best = min(best, time.perf_counter() - started)
        return best


@pytest.mark.parametrize("one_way_ms", [0, 5, 20])
def test_a_round_trip_takes_twice_the_one_way_latency(echo_server, one_way_ms):
    with DelayRelay("127.0.0.1:0", echo_server, one_way_ms / 1000) as relay:
        rtt = _round_trip_s(relay.address)
    assert 2 * one_way_ms / 1000 <= rtt < 2 * one_way_ms / 1000 + 0.005


def test_bytes_arrive_whole_and_in_order_both_ways_through_bounded_buffers(echo_server):
    payload = os.urandom(3 * 1024 * 1024)
    with DelayRelay("127.0.0.1:0", echo_server, 0.002, max_chunks=4, chunk_bytes=4096) as relay:
        host, port = relay.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while data := sock.recv(65536):  # the echo's half-close comes back through the relay
                got += data
            sender.join(20)
        assert bytes(got) == payload


def test_a_target_that_refuses_closes_the_connection():
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{unused.getsockname()[1]}"
    with DelayRelay("127.0.0.1:0", dead, 0.001) as relay:
        host, port = relay.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.settimeout(5)
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass


def test_closing_the_relay_ends_its_connections_within_its_bound(echo_server):
    relay = DelayRelay("127.0.0.1:0", echo_server, 0.05).start()
    host, port = relay.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"ping")
        deadline = time.monotonic() + 5
        while relay.connections() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        relay.close(timeout_s=3)
        assert time.monotonic() - started < 3.5
        assert relay.connections() == 0
        sock.settimeout(5)
        try:
            while sock.recv(100):
                pass
        except ConnectionResetError:
            pass

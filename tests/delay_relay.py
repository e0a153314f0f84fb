"""A TCP relay that delays every chunk by a fixed one-way latency: the latency of a link, where the
kernel has no netem.

Owns: `DelayRelay` (listens on one address and forwards each connection to one target; every chunk
read in either direction is written to the other side `one_way_s` after it was read, in order, so a
round trip through the relay takes twice that), and a command line that runs one relay until
SIGTERM or SIGINT (`python tests/delay_relay.py --listen HOST:PORT --target HOST:PORT --one-way-ms D`,
printing "delay relay ready" on stderr once it listens). Each direction holds at most `max_chunks`
chunks of at most `chunk_bytes` bytes: a full buffer stops reading from that side, so a slow reader
slows its sender as TCP would. Closing stops accepting, shuts every connection and waits (bounded)
for the relay's threads.

Does not own: bandwidth (tc's tbf on the hosts does that), nor where relays sit (shaped_hosts).
"""

from __future__ import annotations

import argparse
import queue
import signal
import socket
import sys
import threading
import time

DEFAULT_CHUNK_BYTES = 64 * 1024
DEFAULT_MAX_CHUNKS = 256
CONNECT_TIMEOUT_S = 10.0
_EOF = b""


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class _Direction:
    """One direction of one connection: a reader thread stamps chunks, a writer thread sends each when due."""

    def __init__(self, source: socket.socket, sink: socket.socket, one_way_s: float, max_chunks: int,
                 chunk_bytes: int, done) -> None:
        self._source, self._sink, self._delay = source, sink, one_way_s
        self._chunk_bytes, self._done = chunk_bytes, done
        self._chunks: queue.Queue = queue.Queue(max_chunks)
        self._stopped = threading.Event()
        self.threads = [threading.Thread(target=self._read, daemon=True),
                        threading.Thread(target=self._write, daemon=True)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def _put(self, item) -> bool:
        while not self._stopped.is_set():
            try:
                self._chunks.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            while True:
                data = self._source.recv(self._chunk_bytes)
                if not self._put((time.monotonic() + self._delay, data)) or data == _EOF:
                    return
        except OSError:
            self._put((0.0, None))  # a reset: the writer closes the whole connection

    def _write(self) -> None:
        clean = False
        try:
            while not self._stopped.is_set():
                try:
                    due, data = self._chunks.get(timeout=0.2)
                except queue.Empty:
                    continue
                if data is None:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if data == _EOF:
                    self._sink.shutdown(socket.SHUT_WR)  # the half-close travels on, delayed like data
                    clean = True
                    break
                self._sink.sendall(data)
        except OSError:
            pass
        self._done(clean)


class _Connection:
    def __init__(self, client: socket.socket, target: tuple[str, int], relay: DelayRelay) -> None:
        self._client, self._target, self._relay = client, target, relay
        self._server: socket.socket | None = None
        self._lock = threading.Lock()
        self._finished = 0
        self._directions: list[_Direction] = []
        self._closed = False

    def open(self) -> None:
        try:
            server = socket.create_connection(self._target, timeout=CONNECT_TIMEOUT_S)
        except OSError:
            self.close()
            return
        args = (self._relay.one_way_s, self._relay.max_chunks, self._relay.chunk_bytes, self._finish)
        with self._lock:
            if self._closed:  # the relay closed while this connection dialled
                server.close()
                return
            self._server = server
            for sock in (self._client, server):
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._directions = [_Direction(self._client, server, *args), _Direction(server, self._client, *args)]
            for direction in self._directions:
                direction.start()

    def _finish(self, clean: bool) -> None:
        with self._lock:
            self._finished += 1
            both = self._finished == 2
        if both or not clean:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for direction in self._directions:
            direction.stop()
        for sock in (self._client, self._server):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or send
                except OSError:
                    pass
                sock.close()
        self._relay.forget(self)

    def threads(self) -> list[threading.Thread]:
        with self._lock:
            return [t for d in self._directions for t in d.threads]


class DelayRelay:
    """Forwards connections made to `listen` ("HOST:PORT", port 0 picks one) to `target`, each chunk
    `one_way_s` late in each direction."""

    def __init__(self, listen: str, target: str, one_way_s: float, *, max_chunks: int = DEFAULT_MAX_CHUNKS,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not 0 <= one_way_s <= 10:
            raise ValueError(f"one-way latency {one_way_s} s is outside 0..10 s")
        if max_chunks < 1 or chunk_bytes < 1:
            raise ValueError("the buffer bounds must be positive")
        self._target = _split(target)
        self.one_way_s, self.max_chunks, self.chunk_bytes = one_way_s, max_chunks, chunk_bytes
        host, port = _split(listen)
        self._listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener.settimeout(0.2)
        self.address = f"{listen.rpartition(':')[0]}:{self._listener.getsockname()[1]}"
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> DelayRelay:
        self._acceptor.start()
        return self

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connection = _Connection(client, self._target, self)
            with self._lock:
                if self._stopped.is_set():
                    client.close()
                    return
                self._connections.add(connection)
            threading.Thread(target=connection.open, daemon=True).start()

    def forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stopped.set()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        threads = [self._acceptor] if self._acceptor.is_alive() else []
        for connection in connections:
            threads.extend(connection.threads())
            connection.close()
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> DelayRelay:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT each connection is forwarded to")
    parser.add_argument("--one-way-ms", type=float, required=True, help="delay of every chunk, each direction")
    args = parser.parse_args(argv)
    try:
        relay = DelayRelay(args.listen, args.target, args.one_way_ms / 1000).start()
    except (OSError, ValueError) as err:
        print(f"delay relay: {err}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"delay relay ready {relay.address} -> {args.target} ({args.one_way_ms} ms each way)", file=sys.stderr,
          flush=True)
    while not stop.wait(0.5):
        pass
    relay.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

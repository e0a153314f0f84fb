"""Hosts on one machine for tests and benchmarks: network namespaces joined by a bridge.

Owns: `namespace_hosts` (N namespaces, each with one veth on a bridge in the root namespace, one
address each in a /24 the caller names; the root namespace takes .1), `netns_available`, and
`ServerProcess` (a layerline server started inside a namespace, waited for by its ready line and
stopped). Every wait is bounded; namespaces and links are deleted however the caller exits.
Does not own: what runs on the hosts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def netns_available() -> str:
    """'' when namespaces can be made here, else why not (tests skip then). With LAYERLINE_REQUIRE_NETNS=1
    (CI, which runs as root) a machine without them is an error instead: the multi-host tests must run."""
    reason = _why_no_netns()
    if reason and os.environ.get("LAYERLINE_REQUIRE_NETNS") == "1":
        raise RuntimeError(f"LAYERLINE_REQUIRE_NETNS=1, but {reason}")
    return reason


def _why_no_netns() -> str:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command"
    probe = _ip("netns", "list", check=False)
    return "" if probe.returncode == 0 else f"`ip netns` is unavailable: {probe.stderr.strip()}"


@dataclass(frozen=True)
class Host:
    namespace: str
    address: str


def _delete(prefix: str, count: int) -> None:
    for index in range(count):
        _ip("netns", "delete", f"{prefix}h{index}", check=False)
        _ip("link", "delete", f"{prefix}v{index}", check=False)
    _ip("link", "delete", f"{prefix}br", check=False)


@contextlib.contextmanager
def namespace_hosts(prefix: str, subnet: str, count: int) -> Iterator[list[Host]]:
    """`count` hosts named PREFIXh0.. with addresses SUBNET.2.. (`subnet` like "10.241.0"); the root
    namespace is SUBNET.1 on the bridge PREFIXbr. Names stay within Linux's 15 characters."""
    _delete(prefix, count)  # left over from a run that was killed
    hosts = [Host(f"{prefix}h{i}", f"{subnet}.{i + 2}") for i in range(count)]
    try:
        bridge = f"{prefix}br"
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for index, host in enumerate(hosts):
            outside, inside = f"{prefix}v{index}", f"{prefix}p{index}"
            _ip("netns", "add", host.namespace)
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            _ip("link", "set", inside, "netns", host.namespace)
            _ip("link", "set", outside, "master", bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", inside)
            _ip("-n", host.namespace, "link", "set", inside, "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        _delete(prefix, count)


class ServerProcess:
    """`python -m MODULE ARGS` (or `command`, a whole argv) inside `namespace` (None: this one), with
    `env` added to this process's environment; `ready` is the text of its ready line. `start` waits
    for it (bounded) and raises with the process's last lines if it never comes."""

    def __init__(self, namespace: str | None, module: str | None, *args: str, ready: str,
                 command: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        self.command = [*prefix, *(command or [sys.executable, "-m", module, *args])]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.ready_text = ready
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        env=self.env)
        threading.Thread(target=self._follow, daemon=True).start()
        return self

    def _follow(self) -> None:
        for line in self.process.stderr:
            if len(self.lines) < 1000:
                self.lines.append(line)
            if self.ready_text in line:
                self.ready.set()

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(self.command[-8:])} not ready (exit {self.process.poll()}):\n"
                                   + "".join(self.lines[-15:]))

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

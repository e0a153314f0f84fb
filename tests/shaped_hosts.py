"""A layerline deployment across network-namespace hosts over shaped links, for tests and benchmarks.

Owns: `role_command` (a role started as the container starts it: deploy/docker/entrypoint.sh, or the
CLI modules where the checkout has no entrypoint), and `ShapedDeployment`: one host per stage plus
one for the coordinator on a bridge (netns_hosts), certificates from the `certs` role naming every
host, a stage per stage host (mutual TLS); on request, delaying relays, bandwidth and a blocked hop,
and coordinators (`coordinator serve`, mutual TLS on its API too).

How the links are shaped. Latency: a delay relay (delay_relay.py) runs in each stage host, in front
of its stage (the stage on PORT, the relay on the same address and a port of its own), and the
coordinator is given the relays' addresses as the stages'. Every connection into a stage host then
goes through that host's relay: coordinator → first stage, stage k → stage k+1, the last stage's
chained step to the first, and the coordinator's results stream from the last stage, whose answers
come back on the same connection; each chunk waits the one-way latency each way, so a round trip
over any hop takes the RTT. The relay dials its stage by the host's own address, not loopback, so
the stage still knows its peers by their certificates. The certificates name the hosts' addresses,
which are also the relays'. Bandwidth: tc's tbf on every host's egress (the veth inside its
namespace), so each host sends at most the rate. A blocked hop: an htb class with a zero-length
queue on the sending host's egress that a u32 filter steers the hop's packets into, so they are
dropped and a connection attempt hangs as behind a firewall (the kernel here has neither netem nor
tc's drop action); the host's other traffic goes through htb's default class at the same rate.

Does not own: making namespaces (netns_hosts) or what runs over the deployment.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from netns_hosts import Host, ServerProcess, namespace_hosts

from protos.tls import TlsFiles

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"
_MODULES = {"stage": ["stage_server.cli"], "coordinator": ["coordinator.cli"], "certs": ["coordinator.cli", "certs"]}
STAGE_PORT, API_PORT = 50700, 50650
RELAY_PORTS = 50710  # one port per latency, counted up from this
_ENV = {"LAYERLINE_PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}


def role_command(role: str, *args: str) -> list[str]:
    """The argv of `role` ("stage", "coordinator", "certs") with `args`, as the container runs it."""
    if ENTRYPOINT.exists():
        return ["sh", str(ENTRYPOINT), role, *args]
    return [sys.executable, "-m", *_MODULES[role], *args]


def _tc(host: Host, *args: str, check: bool = True) -> None:
    done = subprocess.run(["ip", "netns", "exec", host.namespace, "tc", *args], capture_output=True, text=True,
                          timeout=20)
    if check and done.returncode:
        raise RuntimeError(f"tc {' '.join(args)} in {host.namespace}: {done.stderr.strip()}")


class ShapedDeployment:
    """Hosts PREFIXh0.. on SUBNET.2..: one per span of `spans` ("0:15", ...), the last one the
    coordinator's; the stages are started (defaults but the address, port and TLS, plus `stage_args`)
    and waited for on entering."""

    def __init__(self, prefix: str, subnet: str, model_dir: Path, spans: list[str], scratch: Path, *,
                 stage_args: tuple[str, ...] = ()) -> None:
        self.prefix, self.subnet, self.model_dir, self.spans = prefix, subnet, model_dir, spans
        self.certs = scratch / "certs"
        self.stage_args = stage_args
        self.hosts: list[Host] = []
        self.processes: list[ServerProcess] = []
        self._stack = contextlib.ExitStack()
        self._relays: dict[float, list[str]] = {}
        self._rate: str | None = None  # what `shape` set, kept by `block`

    @property
    def stage_hosts(self) -> list[Host]:
        return self.hosts[:-1]

    @property
    def coordinator_host(self) -> Host:
        return self.hosts[-1]

    def _device(self, host: Host) -> str:
        return f"{self.prefix}p{self.hosts.index(host)}"

    def _tls(self, name: str, prefix: str = "--tls") -> list[str]:
        return [f"{prefix}-cert", str(self.certs / f"{name}.pem"), f"{prefix}-key", str(self.certs / f"{name}-key.pem"),
                f"{prefix}-ca", str(self.certs / "ca.pem")]

    def client_tls(self) -> TlsFiles:
        """What an API client presents and checks."""
        return TlsFiles.read(ca=str(self.certs / "ca.pem"), cert=str(self.certs / "client.pem"),
                             key=str(self.certs / "client-key.pem"))

    def _start(self, namespace: str | None, command: list[str], ready: str) -> ServerProcess:
        process = ServerProcess(namespace, None, command=command, ready=ready, env=_ENV).start()
        self.processes.append(process)
        return process

    def __enter__(self) -> ShapedDeployment:
        try:
            self.hosts = self._stack.enter_context(namespace_hosts(self.prefix, self.subnet, len(self.spans) + 1))
            self._stack.callback(self._stop_all)
            made = subprocess.run(role_command("certs", "--out", str(self.certs), "--hosts",
                                               ",".join(h.address for h in self.hosts)),
                                  capture_output=True, text=True, timeout=60, env={**os.environ, **_ENV})
            if made.returncode:
                raise RuntimeError(f"certs: {made.stderr.strip()}")
            stages = [self._start(host.namespace, role_command(
                "stage", "--model", str(self.model_dir), "--layers", span, "--host", host.address,
                "--port", str(STAGE_PORT), "--quiet", *self._tls(host.address), *self.stage_args),
                "stage-server ready") for host, span in zip(self.stage_hosts, self.spans)]
            for stage in stages:
                stage.wait_ready(600)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _stop_all(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def direct(self) -> list[str]:
        """The stages' own addresses: links without added latency."""
        return [f"{h.address}:{STAGE_PORT}" for h in self.stage_hosts]

    def through_relays(self, one_way_ms: float) -> list[str]:
        """The stages' addresses behind relays that delay each chunk `one_way_ms` each way (started on
        first use, one per stage host and latency, kept until the deployment ends)."""
        if one_way_ms not in self._relays:
            port = RELAY_PORTS + len(self._relays)
            relays = [self._start(host.namespace, [
                sys.executable, str(Path(__file__).with_name("delay_relay.py")), "--listen", f"{host.address}:{port}",
                "--target", f"{host.address}:{STAGE_PORT}", "--one-way-ms", str(one_way_ms)], "delay relay ready")
                for host in self.stage_hosts]
            for relay in relays:
                relay.wait_ready(60)
            self._relays[one_way_ms] = [f"{h.address}:{port}" for h in self.stage_hosts]
        return self._relays[one_way_ms]

    def shape(self, rate: str | None) -> None:
        """Every host sends at most `rate` (tc's units, e.g. "1gbit", "20mbit"); None: unshaped. Undoes `block`."""
        self._rate = rate
        for host in self.hosts:
            _tc(host, "qdisc", "del", "dev", self._device(host), "root", check=False)
            if rate is None:
                continue
            bits = _bits_per_s(rate)
            burst = max(16 * 1024, int(bits / 8 * 0.002))  # 2 ms of the rate: no less than a few packets
            _tc(host, "qdisc", "add", "dev", self._device(host), "root", "tbf", "rate", rate, "burst", str(burst),
                "latency", "100ms")

    def block(self, sender: Host, address: str) -> None:
        """Drop every packet `sender` sends to `address` ("IP:PORT"): connections to it hang. The rest
        of its traffic keeps the rate `shape` set (htb's default class, in place of tbf)."""
        ip, port = address.rsplit(":", 1)
        device = self._device(sender)
        _tc(sender, "qdisc", "del", "dev", device, "root", check=False)
        _tc(sender, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "10")
        _tc(sender, "class", "add", "dev", device, "parent", "1:", "classid", "1:10", "htb", "rate",
            self._rate or "10gbit")
        _tc(sender, "class", "add", "dev", device, "parent", "1:", "classid", "1:20", "htb", "rate", "8bit")
        _tc(sender, "qdisc", "add", "dev", device, "parent", "1:20", "handle", "20:", "pfifo", "limit", "0")
        _tc(sender, "filter", "add", "dev", device, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "ip",
            "dst", f"{ip}/32", "match", "ip", "dport", port, "0xffff", "flowid", "1:20")

    @contextlib.contextmanager
    def coordinator(self, stages: list[str], *args: str, port: int = API_PORT) -> Iterator[tuple[str, ServerProcess]]:
        """`coordinator serve` on the coordinator's host over `stages`; yields its API's address and
        its process (whose `lines` are its log)."""
        host = self.coordinator_host
        process = self._start(host.namespace, role_command(
            "coordinator", "serve", "--stages", ",".join(stages), "--model", str(self.model_dir), "--host",
            host.address, "--port", str(port), *self._tls(host.address), *self._tls(host.address, "--api-tls"),
            *args), "coordinator serving")
        try:
            process.wait_ready(300)
            yield f"{host.address}:{port}", process
        finally:
            process.stop()
            self.processes.remove(process)


def _bits_per_s(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"{rate!r}: give a rate like 1gbit or 20mbit")


@contextlib.contextmanager
def shaped_deployment(prefix: str, subnet: str, model_dir: Path, spans: list[str], scratch: Path,
                      **kwargs) -> Iterator[ShapedDeployment]:
    with ShapedDeployment(prefix, subnet, model_dir, spans, scratch, **kwargs) as deployment:
        yield deployment

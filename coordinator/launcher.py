"""Starting and stopping local stage-server processes (`coordinator launch-local`).

Owns: one `stage-server` child process per planned layer range, on free loopback
ports, reporting each stage's progress as it loads, and stopping them all (SIGTERM,
then SIGKILL after a grace period) however the launcher exits; and `check_ports_free`,
which finds a port another process holds before any stage starts.

Does not own: the split (planner) or the public API (app).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from protos.channel_options import cannot_listen

READY_LINE = re.compile(r"stage-server ready on (\S+):(\d+)")
# A stage listening on every address is dialled on loopback: an address it holds (and one its TLS
# certificate names; coordinator certs adds the loopback names to every host's).
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


class LaunchError(RuntimeError):
    """A stage could not start; the message carries its last output."""


def check_ports_free(host: str, ports: list[int]) -> None:
    """Raise LaunchError naming the first of `ports` (0: any free port, nothing to check) that cannot be
    bound on `host` now, so that a held port fails the launch before any stage starts."""
    for port in ports:
        if port == 0:
            continue
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no hold
                probe.bind((host, port))
        except OSError as err:
            raise LaunchError(cannot_listen(host, port, err.strerror or str(err))) from None


@dataclass
class LocalStage:
    layers: tuple[int, int]
    process: subprocess.Popen
    address: str = ""
    output: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)


class LocalStages:
    """N stage servers of one model on this machine."""

    def __init__(self, model_dir: str, ranges: list[tuple[int, int]], *, dtype: str = "auto",
                 host: str = "127.0.0.1", threads: int = 0, extra_args: tuple[str, ...] = (),
                 echo: bool = True, cpu_sets: list[str] | None = None) -> None:
        self.model_dir = model_dir
        self.ranges = ranges
        self.dtype = dtype
        self.host = host
        self.threads = threads
        self.extra_args = extra_args
        self.echo = echo
        self.cpu_sets = cpu_sets  # per stage, a taskset CPU list ("0", "2-3") to pin it to
        self.stages: list[LocalStage] = []

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.stages]

    def start(self, timeout_s: float = 600.0) -> list[str]:
        """Spawn every stage and wait until all have loaded; returns their addresses in order."""
        for index, (start, end) in enumerate(self.ranges):
            command = [sys.executable, "-m", "stage_server.cli", "--model", self.model_dir,
                       "--layers", f"{start}:{end}", "--host", self.host, "--port", "0", "--dtype", self.dtype,
                       "--quiet", "--log-level", "WARNING", *self.extra_args]
            if self.threads:
                command += ["--threads", str(self.threads)]
            if self.cpu_sets:
                command = ["taskset", "-c", self.cpu_sets[index % len(self.cpu_sets)], *command]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
            stage = LocalStage((start, end), process)
            self.stages.append(stage)
            threading.Thread(target=self._follow, args=(index, stage), daemon=True).start()
        self._say(f"starting {len(self.stages)} stage servers of {self.model_dir}")
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        for index, stage in enumerate(self.stages):
            while not stage.ready.wait(0.2):
                if stage.process.poll() is not None:
                    self.stop()
                    tail = "".join(stage.output[-15:])
                    raise LaunchError(f"stage {index} (layers {stage.layers[0]}:{stage.layers[1]}) exited with code "
                                      f"{stage.process.returncode}:\n{tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise LaunchError(f"stage {index} did not load within {timeout_s:.0f}s")
            self._say(f"stage {index}: layers {stage.layers[0]}:{stage.layers[1]} ready on {stage.address} "
                      f"({time.monotonic() - t0:.1f}s)")
        return self.addresses

    def _follow(self, index: int, stage: LocalStage) -> None:
        for line in stage.process.stderr:
            stage.output.append(line)
            match = READY_LINE.search(line)
            if match:
                host = "127.0.0.1" if match.group(1) in WILDCARD_HOSTS else match.group(1)
                stage.address = f"{host}:{match.group(2)}"
                stage.ready.set()
            elif self.echo and ("error" in line.lower() or "warning" in line.lower()):
                print(f"[stage {index}] {line}", end="", file=sys.stderr)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every stage (they drain), then SIGKILL whatever is left after `grace_s`."""
        for stage in self.stages:
            if stage.process.poll() is None:
                stage.process.terminate()
        deadline = time.monotonic() + grace_s
        for stage in self.stages:
            try:
                stage.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stage.process.kill()
                stage.process.wait()

    def _say(self, message: str) -> None:
        if self.echo:
            print(f"layerline: {message}", file=sys.stderr, flush=True)

    def __enter__(self) -> LocalStages:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

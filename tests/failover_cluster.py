"""Real stage-server and coordinator processes on loopback, for failover tests and benchmarks.

Owns: starting stage servers (`python -m stage_server.cli`, each on its own port) and one
`coordinator serve` over them (replicas of a span joined by `|`, spans by `,`), waiting for them
(bounded), signalling one stage process (kill, freeze, resume, terminate) and starting it again on
its port, the stage states the coordinator reports, and what the stages still hold (Info). Every
process runs in its own process group, and every group is killed when the cluster closes. Does not
own: the load put on it (streaming_clients) or what a test or a benchmark checks.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

from coordinator.client import CoordinatorClient
from protos import stage_pb2, stage_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
READY_S = 120.0  # a stage or the coordinator loading on two shared cores
EXIT_S = 60.0  # a stage draining on SIGTERM (its drain time plus its exit deadline)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT)}


def _die_with_parent() -> None:
    """In the child before exec (Linux): end when the process that started it ends, even by SIGKILL,
    so that a test run killed from outside leaves no server behind in its own process group."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


class StageProcess:
    """One stage-server process serving `layers` on a fixed port; it can be started again there."""

    def __init__(self, model_dir: Path, layers: tuple[int, int], log_dir: Path, *, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.model_dir, self.layers, self.log_dir = Path(model_dir), layers, Path(log_dir)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.log_dir / f"stage-{self.port}-0.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process (not waiting for it to load); the previous one must have ended."""
        if self.running():
            raise RuntimeError(f"stage {self.address} is still running")
        self.starts += 1
        self.log_path = self.log_dir / f"stage-{self.port}-{self.starts}.log"
        command = [sys.executable, "-m", "stage_server.cli", "--model", str(self.model_dir),
                   "--layers", f"{self.layers[0]}:{self.layers[1]}", "--port", str(self.port), "--quiet",
                   *self.extra_args]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                            env=_environment(), start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def wait_ready(self, timeout_s: float = READY_S) -> None:
        """Until the process says it is ready (RuntimeError with its log if it ends or the time runs out)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "stage-server ready" in _log_tail(self.log_path, 200):
                return
            if not self.running():
                break
            time.sleep(0.1)
        raise RuntimeError(f"stage {self.address} not ready (exit {self.exit_code()}):\n{_log_tail(self.log_path)}")

    def restart(self, timeout_s: float = READY_S) -> None:
        """Start again on the same port once the last process has ended, and wait until it is ready."""
        self.wait_exit()
        self.start()
        self.wait_ready(timeout_s)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, signum: int) -> None:
        """Send `signum` to the process's group (it may have ended already)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL, and wait for the process to be gone."""
        self.signal(signal.SIGKILL)
        self.wait_exit(10.0)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM: the stage drains, then exits (see wait_exit)."""
        self.signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float = EXIT_S) -> int | None:
        """The exit status, once the process has ended (RuntimeError if it is still there after `timeout_s`)."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"stage {self.address} still running {timeout_s:.0f}s on:\n"
                               f"{_log_tail(self.log_path)}") from None

    def info(self, timeout_s: float = 2.0) -> stage_pb2.InfoResponse:
        with grpc.insecure_channel(self.address) as channel:
            return stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=timeout_s)

    def close(self) -> None:
        """Kill the process group whatever state it is in (stopped ones included)."""
        self.signal(signal.SIGKILL)
        self.signal(signal.SIGCONT)
        if self.process is not None:
            try:
                self.process.wait(10.0)
            except subprocess.TimeoutExpired:
                pass


class Cluster:
    """`replicas` stage processes for each span of `spans` and one coordinator process over them.
    Use as a context manager: every process is killed on exit, whatever happened."""

    def __init__(self, model_dir: Path, spans: list[tuple[int, int]], replicas: int, log_dir: Path, *,
                 stage_args: tuple[str, ...] = (), coordinator_args: tuple[str, ...] = ()) -> None:
        self.model_dir, self.log_dir = Path(model_dir), Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.spans = list(spans)
        self.stages = [[StageProcess(model_dir, span, self.log_dir, extra_args=stage_args) for _ in range(replicas)]
                       for span in self.spans]
        self.coordinator_args = tuple(coordinator_args)
        self.port = free_port()
        self.coordinator: subprocess.Popen | None = None
        self.coordinator_log = self.log_dir / f"coordinator-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def all_stages(self) -> list[StageProcess]:
        return [stage for span in self.stages for stage in span]

    def stages_argument(self) -> str:
        return ",".join("|".join(stage.address for stage in span) for span in self.stages)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        for stage in self.all_stages:
            stage.start()
        for stage in self.all_stages:
            stage.wait_ready()
        command = [sys.executable, "-m", "coordinator.cli", "serve", "--stages", self.stages_argument(),
                   "--model", str(self.model_dir), "--port", str(self.port), *self.coordinator_args]
        with open(self.coordinator_log, "w") as log:
            self.coordinator = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT,
                                                env=_environment(), start_new_session=True,
                                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.wait_coordinator()

    def wait_coordinator(self, timeout_s: float = READY_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.coordinator.poll() is not None:
                break
            try:
                self.model_info(timeout_s=2.0)
                return
            except grpc.RpcError:
                time.sleep(0.2)
        raise RuntimeError(f"coordinator {self.address} not ready (exit {self.coordinator.poll()}):\n"
                           f"{_log_tail(self.coordinator_log)}")

    def close(self) -> None:
        if self.coordinator is not None:
            try:
                os.killpg(self.coordinator.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.coordinator.wait(10.0)
            except subprocess.TimeoutExpired:
                pass
        for stage in self.all_stages:
            stage.close()

    def coordinator_alive(self) -> bool:
        return self.coordinator is not None and self.coordinator.poll() is None

    def model_info(self, timeout_s: float = 5.0):
        with CoordinatorClient(self.address, timeout_s=timeout_s) as client:
            return client.model_info()

    def states(self) -> dict[str, str]:
        """Each stage's state as the coordinator's GetModelInfo reports it (address → state)."""
        return {stage.address: stage.state for stage in self.model_info().stages}

    def busiest(self, span: int) -> StageProcess:
        """The replica of span `span` that runs the most sequences now (GetModelInfo's rows; the first
        on a tie): the one whose loss moves the most work."""
        rows = {stage.address: stage.rows for stage in self.model_info().stages}
        return max(self.stages[span], key=lambda stage: rows.get(stage.address, 0))

    def wait_state(self, stage: StageProcess, state: str, timeout_s: float) -> float:
        """Seconds until GetModelInfo shows `stage` in `state` (AssertionError with the states seen
        if it does not within `timeout_s`)."""
        started = time.monotonic()
        seen = None
        while time.monotonic() - started < timeout_s:
            try:
                seen = self.states()
            except grpc.RpcError as err:
                seen = f"GetModelInfo: {err.code().name}"
            if isinstance(seen, dict) and seen.get(stage.address) == state:
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"{stage.address} not {state} within {timeout_s:.0f}s; last seen: {seen}")

    def make_whole(self, timeout_s: float = 30.0) -> None:
        """Resume frozen stages, start ended ones again, and wait until the coordinator serves on all."""
        for stage in self.all_stages:
            stage.resume()
            if not stage.running():
                stage.restart()
        for stage in self.all_stages:
            self.wait_state(stage, "serving", timeout_s)

    def leftovers(self, timeout_s: float = 5.0, skip: tuple[StageProcess, ...] = ()) -> dict[str, tuple[int, int]]:
        """What running stages (but those of `skip`, e.g. a frozen one) still hold after up to `timeout_s`
        of polling: address → (active_sessions, cache_bytes), only those holding something (empty:
        nothing is left anywhere); a stage whose Info fails shows (-1, status code)."""
        deadline = time.monotonic() + timeout_s
        while True:
            held = {}
            for stage in self.all_stages:
                if not stage.running() or stage in skip:
                    continue
                try:
                    info = stage.info()
                except grpc.RpcError as err:
                    held[stage.address] = (-1, err.code().value[0])
                    continue
                if info.active_sessions or info.cache_bytes:
                    held[stage.address] = (info.active_sessions, info.cache_bytes)
            if not held or time.monotonic() > deadline:
                return held
            time.sleep(0.1)

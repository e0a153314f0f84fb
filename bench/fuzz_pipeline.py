"""The processes a fuzz profile runs against, and what is checked of them once it has run.

Owns: `run_profile`, one fuzz run from start to end: a tiny 2-stage pipeline of real processes
(stage servers with a short --session-timeout, and a coordinator), the fuzzer's own Results
subscription on the last stage (for seeds whose answers go to a collector), the fuzz itself in
two parts (a warm-up, after which each process's RSS is the baseline), a flood of unparseable
calls to each process (unary ones and Forward streams), and then the checks: each process's RSS
after the fuzz and after the flood, the sessions a seed started ended (and every stage's
active_sessions back to 0 once the rest have timed out), every process alive and SERVING,
tracebacks in their logs, and how long each takes to exit on SIGTERM. It returns the report as
a dict whose `problems` list is empty when all is well.

Does not own: the requests or the tally (fuzz_rpcs), the mutations (fuzz_mutations).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc  # noqa: E402
import psutil  # noqa: E402
from fuzz_rpcs import COORDINATOR, STAGE, Deployment, Fuzzer, Tally, split  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from coordinator.planner import plan_partition  # noqa: E402
from protos import stage_pb2, stage_pb2_grpc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

EXIT_LIMIT_S = 10.0  # a SIGTERM'd process must be gone by then
WARM_UP_SHARE = 0.1  # of the messages, sent before the RSS baseline is read
FORWARD_FLOOD_STREAMS = 12  # unparseable Forward streams per stage (gRPC's stop hung after ten)
VALID_CALLS_PER_RPC = 3  # each RPC's seeds sent unmutated first: they must be answered as valid


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(processes: dict[str, subprocess.Popen]) -> dict[str, float]:
    out = {}
    for name, process in processes.items():
        try:
            out[name] = round(psutil.Process(process.pid).memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            out[name] = 0.0
    return out


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def _infos(stages: tuple[str, ...]) -> list[stage_pb2.InfoResponse]:
    infos = []
    for address in stages:
        with grpc.insecure_channel(address) as channel:
            infos.append(stage_pb2_grpc.StageStub(channel).Info(stage_pb2.InfoRequest(), timeout=10))
    return infos


def _spawn(command: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """A process with its stderr lines collected as they come."""
    process = subprocess.Popen([sys.executable, "-m", *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()
    return process, lines


@contextlib.contextmanager
def _tiny_pipeline(work_dir: Path, session_timeout_s: float):
    """(stage addresses, coordinator address, {name: process}, {name: stderr lines}) of a running
    pipeline; the coordinator starts beside the stages (it waits for them itself)."""
    from tiny_models import save_tiny_model, save_tiny_tokenizer

    model_dir = work_dir / "tiny-llama"
    save_tiny_model(model_dir, "llama")
    save_tiny_tokenizer(model_dir)
    ports = [_free_port() for _ in range(3)]
    addresses = tuple(f"127.0.0.1:{port}" for port in ports)
    processes, outputs = {}, {}
    for i, (start, end) in enumerate(plan_partition(4, 2)):
        processes[f"stage {i}"], outputs[f"stage {i}"] = _spawn(
            ["stage_server.cli", "--model", str(model_dir), "--layers", f"{start}:{end}", "--port", str(ports[i]),
             "--quiet", "--log-level", "WARNING", "--threads", "1", "--small-step-threads", "1",
             "--head-threads", "1", "--session-timeout", str(session_timeout_s)])
    processes["coordinator"], outputs["coordinator"] = _spawn(
        ["coordinator.cli", "--log-level", "WARNING", "serve", "--stages", ",".join(addresses[:2]),
         "--model", str(model_dir), "--port", str(ports[2])])
    try:
        deadline = time.monotonic() + 180
        while not all(_serving(address) for address in addresses):
            dead = [name for name, process in processes.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{', '.join(dead) or 'the pipeline'} did not start: "
                                   f"{''.join(outputs[dead[0]] if dead else [])[-2000:]}")
            time.sleep(0.3)
        yield addresses[:2], addresses[2], processes, outputs
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(10)


def _subscribe(address: str, collector_id: str):
    """Hold a Results subscription, reading its answers on a thread; returns (channel, call)."""
    channel = grpc.insecure_channel(address)
    call = stage_pb2_grpc.StageStub(channel).Results(stage_pb2.ResultsRequest(collector_id=collector_id))

    def drain() -> None:
        with contextlib.suppress(grpc.RpcError):
            for _ in call:
                pass

    threading.Thread(target=drain, name="fuzz-collector", daemon=True).start()
    return channel, call


def _end_sessions(fuzzer: Fuzzer, stages: tuple[str, ...]) -> None:
    for stage, session in sorted(fuzzer.tally.sessions):
        with grpc.insecure_channel(stages[stage]) as channel, contextlib.suppress(grpc.RpcError):
            stage_pb2_grpc.StageStub(channel).EndSession(
                stage_pb2.EndSessionRequest(session_id=session, route=stages[stage + 1:]), timeout=10)


def _sessions_left(stages: tuple[str, ...], wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        left = [info.active_sessions for info in _infos(stages)]
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def _exit_seconds(processes: dict[str, subprocess.Popen]) -> dict[str, float | None]:
    """SIGTERM every process at once; seconds until each exited, None if not within EXIT_LIMIT_S + 5."""
    started = time.monotonic()
    for process in processes.values():
        process.terminate()
    out: dict[str, float | None] = {}
    while len(out) < len(processes) and time.monotonic() < started + EXIT_LIMIT_S + 5:
        for name, process in processes.items():
            if name not in out and process.poll() is not None:
                out[name] = round(time.monotonic() - started, 2)
        time.sleep(0.02)
    for name, process in processes.items():
        if name not in out:
            process.kill()
            process.wait(10)
            out[name] = None
    return out


def run_profile(*, messages: int, stage_share: float = 0.6, flood: int = 20_000, stage_flood: int = 20_000,
                seed: int = 1, workers: int = 2, session_timeout_s: float = 3.0, rss_limit_mb: float = 20.0,
                fuzz_rss_limit_mb: float = 32.0) -> dict:
    """Fuzz a fresh tiny pipeline with `messages` mutated messages (`stage_share` of them to the stages),
    then `flood` unparseable calls to the coordinator and `stage_flood` to each stage (and
    FORWARD_FLOOD_STREAMS unparseable Forward streams); the report (see the module's docstring).
    `rss_limit_mb`: how much a process's RSS may grow over the flood; `fuzz_rss_limit_mb`: from the
    end of the warm-up to the end, once every session is freed (glibc and torch keep some freed
    memory for reuse, so RSS does not come back to the byte)."""
    started = time.monotonic()
    stage_messages = round(messages * stage_share)
    plan = [*split(STAGE, stage_messages), *split(COORDINATOR, messages - stage_messages)]
    warm_up = [(method, round(count * WARM_UP_SHARE)) for method, count in plan]
    rest = [(method, count - first) for (method, count), (_, first) in zip(plan, warm_up)]
    with tempfile.TemporaryDirectory(prefix="layerline-fuzz-") as work, \
            _tiny_pipeline(Path(work), session_timeout_s) as (stages, coordinator, processes, outputs):
        started_s = time.monotonic() - started
        infos = _infos(stages)
        deployment = Deployment(stages=stages, coordinator=coordinator, fingerprint=infos[0].model_fingerprint,
                                hidden_size=infos[0].hidden_size, vocab_size=infos[-1].vocab_size,
                                collector_id=f"fuzz-collector-{seed}")
        channel, subscription = _subscribe(stages[-1], deployment.collector_id)
        fuzzer = Fuzzer(deployment, seed)
        try:
            seeds = fuzzer.valid(VALID_CALLS_PER_RPC, first_index=messages)
            fuzzer.run(warm_up, workers=workers)
            rss_before = _rss_mb(processes)
            fuzzer.run(rest, first_index=sum(count for _, count in warm_up), workers=workers)
            rss_fuzzed = _rss_mb(processes)
            fuzzed_s = time.monotonic() - started - started_s
            flood_started = time.monotonic()
            flooded = Tally()
            fuzzer.flood(COORDINATOR.methods_by_name["GetModelInfo"], coordinator, flood, flooded, workers)
            for address in stages:
                fuzzer.flood(STAGE.methods_by_name["Info"], address, stage_flood, flooded, workers)
                fuzzer.flood(STAGE.methods_by_name["Forward"], address, FORWARD_FLOOD_STREAMS, flooded, workers)
            rss_flooded = _rss_mb(processes)
            flood_s = time.monotonic() - flood_started
            subscription.cancel()
            _end_sessions(fuzzer, stages)
            sessions_left = _sessions_left(stages, wait_s=2 * session_timeout_s + 10)
            rss_end = _rss_mb(processes)
            serving = {name: _serving(a) for name, a in zip(processes, (coordinator, *stages))}
            alive = {name: p.poll() is None for name, p in processes.items()}
        finally:
            fuzzer.close()
            channel.close()
        exit_s = _exit_seconds(processes)
        time.sleep(0.5)  # the last lines of their logs
        tracebacks = {name: sum("Traceback" in line for line in lines) for name, lines in outputs.items()}
        warnings = {name: [line.strip()[-300:] for line in lines if " WARNING " in line or " ERROR " in line][-5:]
                    for name, lines in outputs.items()}
    tally = fuzzer.tally
    problems = list(tally.failures[:20])
    problems += [f"{failure} (flood)" for failure in flooded.failures[:10]]
    problems += [f"{failure} (a valid request)" for failure in seeds.failures]
    problems += [f"{name} died" for name, ok in alive.items() if not ok]
    problems += [f"{name} not SERVING after the fuzz" for name, ok in serving.items() if not ok]
    problems += [f"stage {i} still holds {n} sessions" for i, n in enumerate(sessions_left) if n]
    problems += [f"{name} took more than {EXIT_LIMIT_S:.0f} s to exit on SIGTERM" for name, s in exit_s.items()
                 if s is None or s > EXIT_LIMIT_S]
    problems += [f"{name}: RSS grew {rss_flooded[name] - rss_fuzzed[name]:.1f} MB over the flood"
                 for name in processes if rss_flooded[name] - rss_fuzzed[name] > rss_limit_mb]
    problems += [f"{name}: RSS grew {rss_end[name] - rss_before[name]:.1f} MB from the warm-up to the end"
                 for name in processes if rss_end[name] - rss_before[name] > fuzz_rss_limit_mb]
    return {"ok": not problems, "problems": problems, "seed": seed, "failures": len(tally.failures),
            "mutated_calls": sum(tally.calls.values()), "messages": sum(tally.messages.values()),
            "rpcs": tally.summary(), "valid_seeds": seeds.summary(), "flood": flooded.summary(),
            "rss_mb": {name: {"after_warm_up": rss_before[name], "after_fuzz": rss_fuzzed[name],
                              "after_flood": rss_flooded[name], "end": rss_end[name]} for name in processes},
            "sessions_left": sessions_left, "serving": serving, "alive": alive, "exit_s": exit_s,
            "tracebacks_logged": tracebacks, "last_warnings": warnings, "start_seconds": round(started_s, 1),
            "fuzz_seconds": round(fuzzed_s, 1), "flood_seconds": round(flood_s, 1),
            "seconds": round(time.monotonic() - started, 1)}

"""Process lifecycle of a stage server: bind, load, report health, drain, stop.

Owns: the gRPC server object, the health service (NOT_SERVING while the weights load, and
again while draining), reflection, the same-machine listener, the compute thread and what
loads on it (the slice, its split head and row chunks, the thread-count calibration), the
session store, the step trace file, the metrics port, the idle-session reaper, the registration with a coordinator
(--join, registration.py), and SIGTERM handling: a drain that takes no new session and waits for the
sessions held to end, up to drain_timeout_s; it builds
the stage's service once the port is bound and hands it the slice once loaded.
Does not own: request handling (servicer and the modules it builds) or argument parsing (cli).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import stage_pb2, unix_socket
from protos.channel_options import bind, server_options
from protos.metrics_endpoint import MetricsEndpoint
from protos.raw_parsing import add_servicer
from protos.reflection import enable_reflection
from protos.shutdown import EXIT_DEADLINE_S, exit_deadline, exit_now, stop_server
from protos.tls import TlsFiles, server_credentials
from stage_server.compute_thread import ComputeThread
from stage_server.core_share import CoreShare, usable_cores
from stage_server.deployment import Deployment
from stage_server.machine_lock import MachineLock
from stage_server.metrics import StageMetrics
from stage_server.registration import Registration, announcement
from stage_server.row_chunks import install_row_chunks
from stage_server.servicer import StageService
from stage_server.sessions import SessionStore
from stage_server.slice_loader import load_slice
from stage_server.split_head import SplitHead, install_split_head, parts_for
from stage_server.stage_model import StageModel
from stage_server.step_bounds import DEFAULT_MAX_STEP_TOKENS, StepBounds
from stage_server.step_runner import ServedSlice
from stage_server.step_trace import StepTrace
from stage_server.stream_slots import DEFAULT_STREAM_IDLE_TIMEOUT_S
from stage_server.thread_counts import ThreadCounts
from stage_server.unix_listener import UnixListener

log = logging.getLogger(__name__)
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
CONTROL_THREADS = 16


@dataclass(frozen=True)
class StageServerConfig:
    """Everything a stage process is started with; built once by the CLI."""

    model_dir: str
    layer_start: int
    layer_end: int
    host: str = "127.0.0.1"
    port: int = 50051
    dtype: str = "auto"
    device: str = "cpu"
    max_sessions: int = 64
    max_streams: int = 64  # Forward + Results streams open at once (a coordinator holds one or two)
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S  # a silent stream's slot may go to a new one
    max_cache_bytes: int = 2 << 30
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS  # rows × new tokens of one step (stage_server/step_bounds.py)
    session_timeout_s: float = 300.0
    drain_timeout_s: float = 30.0
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    small_step_threads: int | str = "auto"  # threads for steps of <= SMALL_STEP_TOKENS new tokens (see
    # stage_server/thread_counts.py): a count, 0 = `threads`, or "auto" = timed at start
    head_threads: int | str = "auto"  # threads sharing the last stage's LM head on small steps
    # (stage_server/split_head.py): a count >= 1 (1 = not split) or "auto" = usable cores, up to 4
    attention: str = "auto"  # auto | per-sequence | batched (stage_server/per_sequence_attention.py)
    trace_steps: str = ""  # a file to append per-micro-batch timestamps to (stage_server/step_trace.py)
    local_hops: bool = True  # hops between stages of this machine over a Unix socket (stage_server/unix_listener.py)
    peers: tuple[str, ...] = ()  # addresses of the deployment's other stages (--peers; stage_server/deployment.py)
    progress: bool = True
    tls: TlsFiles | None = None  # --tls-*: mutual TLS on the port and towards next hops (protos/tls.py)
    join: str = ""  # --join: the coordinator whose registry this stage announces itself to (registration.py)
    advertise: str = ""  # --advertise: the address announced; "" = host:port as bound
    metrics: MetricsEndpoint | None = None  # --metrics-port: Prometheus metrics (stage_server/metrics.py)


class StageServer:
    """A running stage: `start()` binds and loads, `stop()` drains and stops."""

    def __init__(self, config: StageServerConfig, startup_lock: MachineLock | None = None) -> None:
        """`startup_lock`: this machine's stage lock, held shared since the process started (the CLI
        takes it before importing torch); released once the weights are in."""
        self.config = config
        self.startup_lock = startup_lock or MachineLock()
        # Every open stream holds a pool thread for its whole life; CONTROL_THREADS more keep Info,
        # EndSession, StopChain and health checks answering when the streams are all taken, and
        # gRPC refuses calls beyond the pool (RESOURCE_EXHAUSTED) instead of queueing them unseen.
        workers = config.max_streams + CONTROL_THREADS
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=server_options(),
                                       maximum_concurrent_rpcs=workers)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        enable_reflection(self.grpc_server, [STAGE_SERVICE, health.SERVICE_NAME])
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.compute = ComputeThread()  # all torch work runs on it: load, calibration, steps
        self.service: StageService | None = None  # built in start, once the port (part of its name) is bound
        self.metrics = StageMetrics(lambda: self.service, config.metrics) if config.metrics is not None else None
        self.port = 0
        self.local_hops: UnixListener | None = None  # the same-machine socket, when listening
        self.split_head: SplitHead | None = None  # the last stage's LM head, when split
        self._trace: StepTrace | None = None
        self.core_share: CoreShare | None = None  # this stage's slot in the machine's core share
        self.registration: Registration | None = None  # with --join, once serving
        self._stopped = threading.Event()
        self._finished = threading.Event()  # stop() is done
        self.ready = threading.Event()  # loaded and serving

    def _set_health(self, status) -> None:
        for service in ("", STAGE_SERVICE):
            self.health.set(service, status)

    def start(self) -> None:
        """Bind the port (health NOT_SERVING), load the slice, then report SERVING."""
        cfg = self.config
        port = bind(self.grpc_server, cfg.host, cfg.port, server_credentials(cfg.tls) if cfg.tls else None)
        if cfg.trace_steps:  # before serving, so that a bad path fails the start, not the steps
            self._trace = StepTrace(cfg.trace_steps)
        self.service = StageService(f"layers {cfg.layer_start}:{cfg.layer_end} @ {cfg.host}:{port}", self.compute,
                                    max_streams=cfg.max_streams, stream_idle_timeout_s=cfg.stream_idle_timeout_s,
                                    trace=self._trace,
                                    use_local_hops=cfg.local_hops and unix_socket.SUPPORTED, tls=cfg.tls,
                                    deployment=Deployment(cfg.peers), meter=self.metrics)
        add_servicer(self.service, self.grpc_server, stage_pb2.DESCRIPTOR.services_by_name["Stage"])
        if self.metrics is not None:  # before serving: a taken metrics port fails the start
            self.metrics.start(cfg.host)
        self.grpc_server.start()
        self._listen_for_local_hops(port)
        self.port = port  # set once the server accepts connections
        log.info("listening on %s:%d, loading layers %d:%d of %s", cfg.host, self.port,
                 cfg.layer_start, cfg.layer_end, cfg.model_dir)
        try:
            loaded = self.compute.run(lambda: load_slice(
                cfg.model_dir, cfg.layer_start, cfg.layer_end, dtype=cfg.dtype, device=cfg.device,
                attention=cfg.attention, progress=cfg.progress))
            self._install_step_helpers(loaded)
        except Exception:
            if self.local_hops is not None:
                self.local_hops.close()
            self.grpc_server.stop(0)
            raise
        finally:
            # Held through the row-chunk probe too: its products on every core would make a neighbour
            # stage timing itself meanwhile find a second thread slower and keep one.
            self.startup_lock.release()
        model = StageModel(loaded)
        on_cpu = loaded.device.type == "cpu"
        threads = self._thread_counts() if on_cpu else None
        if on_cpu:
            self.compute.run(lambda: threads.calibrate(model.small_step_seconds, lock=self.startup_lock))
        sessions = SessionStore(make_cache=model.new_cache, bytes_per_token=model.bytes_per_token,
                                max_sessions=cfg.max_sessions, max_cache_bytes=cfg.max_cache_bytes,
                                idle_timeout_s=cfg.session_timeout_s)
        bounds = StepBounds.for_stage(max_step_tokens=cfg.max_step_tokens, max_cache_bytes=cfg.max_cache_bytes,
                                      bytes_per_token=model.bytes_per_token, hidden_size=model.hidden_size,
                                      takes_token_ids=loaded.is_first)
        self.service.serve(ServedSlice(model, sessions, bounds, threads=threads,
                                       split_head=self.split_head))
        threading.Thread(target=self._reap_idle_sessions, args=(sessions,), name="session-reaper",
                         daemon=True).start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.ready.set()
        if cfg.join:
            address = cfg.advertise or f"{cfg.host}:{port}"
            self.registration = Registration(cfg.join, lambda: announcement(self.service, address), cfg.tls)
            self.registration.start()
        log.info("ready: %s, %s on %s, %.1f MiB of weights, %s attention, %s, fingerprint %s, weights manifest %s",
                 self.service.name, loaded.dtype, loaded.device, loaded.parameter_bytes / 2**20, loaded.attention,
                 "lean layers" if getattr(loaded.architecture, "lean", None) is not None
                 else "transformers' layer forward", loaded.fingerprint, loaded.weights_manifest_id)

    def _thread_counts(self) -> ThreadCounts:
        """Threads for this stage's steps: --threads when given, else every usable core, shared step by
        step with the other stages of this machine (core_share.py)."""
        cfg = self.config
        cores = cfg.threads or usable_cores()
        torch.set_num_threads(cores)
        if cfg.threads:
            log.info("threads: %d (--threads), not shared with other stages", cores)
            return ThreadCounts(cores, cfg.small_step_threads)
        self.core_share = CoreShare(cores)
        log.info("threads: %d usable cores, shared step by step with %d other stage(s) on this machine",
                 cores, self.core_share.neighbours())
        return ThreadCounts(cores, cfg.small_step_threads, share=self.core_share)

    def _listen_for_local_hops(self, port: int) -> None:
        """Take same-machine upstreams on a Unix socket too (unix_listener.py), unless turned off; this
        stage's own next hops use theirs likewise."""
        if not (self.config.local_hops and unix_socket.SUPPORTED):
            return
        try:
            self.local_hops = UnixListener(port, self.service.forward_stream, self.service.results_stream,
                                           self.service.reserve_stream_slot, self.service.release_stream_slot)
        except OSError as err:  # the name is taken: hops to this stage stay on gRPC
            log.warning("no same-machine hops into this stage (%s); upstream stages use gRPC", err)

    def _install_step_helpers(self, loaded) -> None:
        """The last stage's split LM head, and row chunks for per-sequence stages."""
        if loaded.is_last:
            head_name = loaded.architecture.layout.tied_head.rpartition(".")[0]
            parts = parts_for(self.config.head_threads)
            self.split_head = install_split_head(loaded.architecture.model, head_name, parts)
            if self.split_head is not None:
                log.info("LM head split over %d threads for steps of up to 4 rows", len(self.split_head.cuts))
        if loaded.attention == "per-sequence":  # a sequence's tokens must not depend on its batch
            chunked = self.compute.run(lambda: install_row_chunks(loaded.architecture.model))
            if chunked:
                log.info("decode steps of more rows run their linear layers in chunks that keep each row's "
                         "bits: %s", ", ".join(f"{i}->{o}: {rows} rows" for (i, o), rows in sorted(chunked.items())))

    def _reap_idle_sessions(self, sessions: SessionStore) -> None:
        while not self._stopped.wait(min(10.0, self.config.session_timeout_s / 2)):
            if sessions.expire_idle():
                log.info("expired idle sessions")

    def stop(self) -> None:
        """Drain, then stop: health NOT_SERVING, Info and the registration say draining, steps that start
        a session are refused while the sessions held go on; once none is held and nothing is in flight,
        or drain_timeout_s has passed, the server stops (the coordinator replays what is left elsewhere)."""
        if self._stopped.is_set():
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.service is not None:
            self.service.draining = True
            if self.registration is not None:
                self.registration.announce()
            timeout = self.config.drain_timeout_s
            log.info("draining: %d session(s) held; waiting up to %.0fs for them to end", self.service.sessions_held(),
                     timeout)
            if self.service.wait_drained(timeout):
                log.info("drained: no session held, nothing in flight")
            else:
                log.warning("drain timed out after %.0fs with %d session(s) held; stopping", timeout,
                            self.service.sessions_held())
        self._stopped.set()
        try:
            if self.registration is not None:
                self.registration.stop()
            if self.local_hops is not None:
                self.local_hops.close()
            stop_server(self.grpc_server, grace_s=1.0)
            if self.service is not None:
                self.service.close()
            self.compute.close()
            if self.core_share is not None:
                self.core_share.close()
            if self._trace is not None:
                self._trace.close()
            if self.split_head is not None:
                self.split_head.close()
            if self.metrics is not None:
                self.metrics.close()
        finally:
            self._finished.set()

    def wait(self) -> None:
        """Block until `stop()` is done."""
        self._finished.wait()


def run_until_signalled(server: StageServer) -> None:
    """Start `server`, print a ready line, and drain + stop on SIGTERM or Ctrl-C; then end the process.
    It ends at most EXIT_DEADLINE_S after the drain whatever gRPC does, and at once on a second signal."""
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if not server.ready.is_set():  # still loading: nothing to drain
            print(f"stage-server: {signal.Signals(signum).name} while starting; exiting", file=sys.stderr, flush=True)
            exit_now(130)
        if stopping.is_set():
            log.info("received %s again: exiting now", signal.Signals(signum).name)
            exit_now(1)
        stopping.set()
        log.info("received %s: draining", signal.Signals(signum).name)
        exit_deadline(server.config.drain_timeout_s + EXIT_DEADLINE_S)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"stage-server ready on {server.config.host}:{server.port} "
          f"({server.service.name})", file=sys.stderr, flush=True)
    server.wait()
    # Everything is closed. Python's own exit would wait for threads a stuck gRPC call holds, then
    # tear the interpreter down (seconds, after a fuzz: gRPC's core waits for name lookups of
    # unreachable next hops): end the process now instead.
    exit_now(0)

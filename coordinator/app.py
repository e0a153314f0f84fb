"""Assembling a coordinator process: connect to the stages, check them, serve the public API.

Owns: the coordinator's one frozen config, waiting for the given stage servers (every replica of
every span), or with no stages given for joined ones (registry), and checking that they form at
least one complete route, and the gRPC server with health and reflection. Does not own: request
handling (service), generation (engine), the servers' states and routes once serving (stage_pool,
routes), what --chain auto resolves to (chain_policy), or whether the stages agree on model,
weights, protocol and versions (stage_agreement).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coordinator.api_keys import ApiKeyInterceptor, ApiKeys
from coordinator.chain_policy import chain_greedy_steps
from coordinator.engine import Engine
from coordinator.failover import MAX_REPLAYS
from coordinator.http_api import HttpApi
from coordinator.http_server import HttpServer, listen, serving_from
from coordinator.metrics import CoordinatorMetrics
from coordinator.pipeline_client import PipelineClient
from coordinator.planner import groups_in_flight
from coordinator.registry import JoinServer, Registry, joined_route
from coordinator.route_choice import NoRoute
from coordinator.routes import Routes
from coordinator.scheduler import BatchLimits, per_sequence_stages
from coordinator.service import CoordinatorService
from coordinator.stage_agreement import PipelineSetupError, chain_refusal
from coordinator.stage_pool import DEFAULT_STALL_TIMEOUT_S, ServerView, StagePool
from coordinator.text import Tokenization
from coordinator.validation import Limits
from protos import codec, coordinator_pb2, stage_pb2
from protos.channel_options import DEFAULT_MAX_REQUEST_MB, api_server_options, bind
from protos.metrics_endpoint import MetricsEndpoint
from protos.raw_parsing import add_servicer
from protos.reflection import enable_reflection
from protos.shutdown import stop_server
from protos.tls import TlsFiles, server_credentials

log = logging.getLogger(__name__)
COORDINATOR_SERVICE = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
CONTROL_THREADS = 16  # server threads kept for health checks and GetModelInfo beyond every generation


@dataclass(frozen=True)
class CoordinatorConfig:
    stages: tuple[str, ...]  # each span's stage servers in layer order: "host:port", replicas joined by "|"
    model_dir: str  # where the tokenizer is read from
    model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 50050
    compression: str = "none"
    micro_batches: int = 0  # groups in flight at once; 0 = one per machine (planner.groups_in_flight)
    chain: str = "auto"  # on: greedy groups' next steps go from the last stage straight to the first; off;
    # auto: on unless every stage is on this machine (coordinator/chain_policy.py)
    local_hops: bool = True  # reach stages on this machine over their Unix sockets (coordinator/stage_streams.py)
    batch_limits: BatchLimits = field(default_factory=BatchLimits)
    max_new_tokens_limit: int = 4096
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB << 20  # larger public requests: RESOURCE_EXHAUSTED (gRPC)
    stage_wait_s: float = 120.0
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S  # a server silent this long is down (stage_pool)
    max_replays: int = MAX_REPLAYS  # routes a request may restart on after losing a server (failover)
    allow_mixed_versions: bool = False  # serve stages of different torch/transformers versions (stage_agreement)
    stage_tls: TlsFiles | None = None  # --tls-*: mutual TLS towards the stages (protos/tls.py)
    api_tls: TlsFiles | None = None  # --api-tls-*: TLS on the public API (client certificates with a CA)
    join_port: int | None = None  # serve the Registry (stage-server --join) on host:join_port (0: a free one)
    metrics: MetricsEndpoint | None = None  # --metrics-port: Prometheus metrics on a port (coordinator/metrics.py)
    http_port: int | None = None  # the OpenAI-compatible HTTP API (http_server); None: off, 0: any free port


def _not_ready(addresses: tuple[str, ...], states: list) -> list[str]:
    """'ADDRESS: why' for each stage that cannot serve yet (unreachable, or loading its weights)."""
    waiting = []
    for address, state in zip(addresses, states):
        if isinstance(state, grpc.RpcError):
            waiting.append(f"{address}: {state.code().name}")
        elif not state.model_fingerprint:
            waiting.append(f"{address}: loading its weights")
    return waiting


def wait_for_stages(addresses: tuple[str, ...], timeout_s: float, tls: TlsFiles | None = None,
                    progress_every_s: float = 10.0) -> list[stage_pb2.InfoResponse]:
    """Info from every stage once all have loaded. Every `progress_every_s` it logs (WARNING, shown
    by default) which stages it still waits for and why, so a mistyped address shows at once rather
    than after the timeout; raises PipelineSetupError naming them on timeout."""
    client = PipelineClient(list(addresses), tls=tls)
    started = time.monotonic()
    next_report = started + progress_every_s
    try:
        while True:
            states = client.stage_states(timeout_s=5)
            waiting = _not_ready(addresses, states)
            if not waiting:
                return states
            now = time.monotonic()
            if now - started > timeout_s:
                raise PipelineSetupError(f"stages not ready after {timeout_s:.0f}s ({'; '.join(waiting)}): are they "
                                         "running, and reachable at these addresses?")
            if now >= next_report:
                log.warning("waiting for stages (%.0f s of %.0f): %s", now - started, timeout_s, "; ".join(waiting))
                next_report = now + progress_every_s
            time.sleep(0.5)
    finally:
        client.close()


def parse_stages(text: str) -> list[list[str]]:
    """`--stages`: spans in layer order separated by `,`, replicas of a span by `|`."""
    spans = [[address.strip() for address in span.split("|") if address.strip()] for span in text.split(",")]
    if not spans or any(not span for span in spans):
        raise ValueError(f"--stages {text!r}: give HOST:PORT of each span in layer order, separated by ',', "
                         "and replicas of a span separated by '|'")
    return spans


def stage_addresses(stages: tuple[str, ...]) -> tuple[str, ...]:
    """Every server of `stages` (spans whose replicas are joined by "|"), once each, in order."""
    return tuple(dict.fromkeys(address for span in parse_stages(",".join(stages)) for address in span))


def check_route(addresses: tuple[str, ...], infos: list[stage_pb2.InfoResponse]) -> None:
    """The stages must cover layers 0..N exactly once, in order (of one model: stage_agreement)."""
    expected = 0
    for address, info in zip(addresses, infos):
        if info.layer_start != expected:
            raise PipelineSetupError(f"stage {address} holds layers {info.layer_start}:{info.layer_end} but the "
                                     f"route needs one starting at layer {expected}; list stages in layer order")
        expected = info.layer_end
    if expected != infos[-1].num_layers:
        raise PipelineSetupError(f"the stages stop at layer {expected} of {infos[-1].num_layers}: a stage is missing")


def stage_infos_to_api(views: list[ServerView], rows: dict[str, int]) -> list[coordinator_pb2.StageInfo]:
    """Every server the pool knows, as GetModelInfo shows it: its last Info, state and load."""
    stages = []
    for view in views:
        stage = coordinator_pb2.StageInfo(address=view.address, state=view.state, rows=rows.get(view.address, 0),
                                          seen_seconds_ago=round(view.seen_seconds_ago, 3),
                                          down_reason=view.down_reason)
        i = view.info
        if i is not None:
            stage.MergeFrom(coordinator_pb2.StageInfo(
                layer_start=i.layer_start, layer_end=i.layer_end, dtype=i.dtype, device=i.device,
                active_sessions=i.active_sessions, attention=i.attention, compute_threads=i.compute_threads,
                small_step_threads=i.small_step_threads, colocated_stages=i.colocated_stages,
                versions=dict(i.versions), rss_bytes=i.rss_bytes, cache_bytes=i.cache_bytes,
                micro_batches_served=i.micro_batches_served, compute_seconds=i.compute_seconds))
        stages.append(stage)
    return stages


def server_threads(limits: BatchLimits) -> int:
    """Threads for the coordinator's gRPC server. A generation holds one while it runs or waits in
    the scheduler's queue, so the pool fits both bounds (beyond them the scheduler answers
    RESOURCE_EXHAUSTED at once), plus room for control calls (health, GetModelInfo) that must never
    wait behind generations. Threads start only as calls need them."""
    return limits.max_batch_rows + limits.max_queue + CONTROL_THREADS


def batching_state(engine: Engine, limits: BatchLimits, groups: int) -> coordinator_pb2.BatchingState:
    stats = engine.stats()
    return coordinator_pb2.BatchingState(
        queued=stats.queued, running=stats.running, prefilling=stats.prefilling,
        reserved_positions=stats.reserved_positions, max_batch_rows=limits.max_batch_rows,
        max_cache_positions=limits.max_cache_positions, max_queue=limits.max_queue, micro_batches=groups,
        decode_steps=stats.decode_steps, prefills=stats.prefills, hop_bytes=stats.hop_bytes)


class CoordinatorServer:
    """The public API of one pipeline."""

    def __init__(self, config: CoordinatorConfig, api_keys: ApiKeys | None = None) -> None:
        self.config = config
        self.api_keys = api_keys  # None: every call is let in
        wire = codec.codec_from_name(config.compression)
        addresses = stage_addresses(config.stages) if config.stages or config.join_port is None else ()
        infos = wait_for_stages(addresses, config.stage_wait_s, config.stage_tls) if addresses else []
        refusal = addresses and chain_refusal(addresses, infos, allow_mixed_versions=config.allow_mixed_versions)
        if refusal:
            raise PipelineSetupError(refusal)
        if addresses and len(addresses) == len(config.stages):  # one server a span: the order must be the layers'
            check_route(addresses, infos)
        self.tokenization = Tokenization.from_model_dir(config.model_dir)
        self.pool = StagePool(addresses, tls=config.stage_tls, stall_timeout_s=config.stall_timeout_s,
                              allow_mixed_versions=config.allow_mixed_versions)
        self.registry: JoinServer | None = None  # the Registry, with a join port
        if not addresses:  # every stage joins: serve once they form a route
            self.registry = self._start_registry(())
            addresses, infos = self._wait_for_joined()
        self.pool.seed(zip(addresses, infos))
        try:
            self.pool.choose()
            refused = self.pool.tell_deployment(raise_errors=bool(config.stages))
        except NoRoute as err:
            self._abandon()
            raise PipelineSetupError(str(err)) from None
        except grpc.RpcError as err:
            self._abandon()
            raise PipelineSetupError(f"could not tell the stages their deployment (SetDeployment): "
                                     f"{err.code().name}: {err.details()}") from None
        for address in refused:
            log.warning("stage %s refused SetDeployment (plaintext from another machine): it sends only to the "
                        "stages its --peers name", address)
        self.registry = self.registry or self._start_registry(addresses)  # stages join beside the given ones
        max_context = _max_context(config.model_dir)
        limits = Limits(max_new_tokens=min(config.max_new_tokens_limit, max_context), max_context=max_context,
                        vocab_size=infos[-1].vocab_size)
        info = coordinator_pb2.ModelInfo(
            model_name=config.model_name or config.model_dir, model_type=infos[0].model_type,
            model_fingerprint=infos[0].model_fingerprint, weights_manifest_id=infos[0].weights_manifest_id,
            num_layers=infos[0].num_layers,
            vocab_size=infos[-1].vocab_size, max_context=max_context, max_new_tokens_limit=limits.max_new_tokens,
            compression=config.compression, stages=stage_infos_to_api(self.pool.views(), {}),
            has_chat_template=self.tokenization.has_chat_template)
        groups = config.micro_batches or groups_in_flight([(i.compute_threads, i.colocated_stages) for i in infos])
        chain = chain_greedy_steps(config.chain, addresses)
        log.info("greedy chaining %s (--chain %s)", "on" if chain else "off", config.chain)
        self.routes = Routes(self.pool, wire_codec=wire, model_fingerprint=infos[0].model_fingerprint,
                             local_hops=config.local_hops, chain=chain)
        self.engine = Engine(self.routes, pad_token_id=self.tokenization.pad_token_id,
                             micro_batches=groups, limits=config.batch_limits, chain=chain,
                             prefill_alone=per_sequence_stages(infos), max_replays=config.max_replays)
        if config.stages:  # joined stages are probed from the start (_wait_for_joined)
            self.pool.start()
        self.metrics = CoordinatorMetrics(self.engine, self.pool, config.metrics)
        self.service = CoordinatorService(
            self.engine, self.tokenization, limits, info,
            refresh_stage_info=lambda: stage_infos_to_api(self.pool.views(), self.engine.route_loads()),
            batching_state=lambda: batching_state(self.engine, config.batch_limits, groups))
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=server_threads(config.batch_limits)),
                                       options=api_server_options(config.max_request_bytes),
                                       interceptors=[ApiKeyInterceptor(api_keys)] if api_keys else None)
        add_servicer(self.service, self.grpc_server, coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"])
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        enable_reflection(self.grpc_server, [COORDINATOR_SERVICE, health.SERVICE_NAME])
        self.http = None if config.http_port is None else HttpApi(
            self.service, api_keys=api_keys, serving=lambda: serving_from(self.health),
            max_body_bytes=config.max_request_bytes, max_running=server_threads(config.batch_limits))
        self.http_server: HttpServer | None = None
        self.port = 0
        self._stopping = False

    def _start_registry(self, static: tuple[str, ...]) -> JoinServer | None:
        config = self.config
        if config.join_port is None:
            return None
        registry = JoinServer(Registry(self.pool, static=static, allow_mixed_versions=config.allow_mixed_versions),
                              config.host, config.join_port, config.stage_tls)
        try:
            registry.start()
        except OSError:
            self.pool.close()
            raise
        return registry

    def _wait_for_joined(self) -> tuple[tuple[str, ...], list[stage_pb2.InfoResponse]]:
        self.pool.start()  # joined servers become serving through its probes
        try:
            return joined_route(self.pool, self.config.stage_wait_s, f"{self.config.host}:{self.registry.port}")
        except NoRoute as err:
            self._abandon()
            raise PipelineSetupError(str(err)) from None

    def _abandon(self) -> None:
        """Close what setup opened, when the stages cannot serve."""
        if self.registry is not None:
            self.registry.stop()
        self.pool.close()

    def start(self) -> int:
        api_tls = self.config.api_tls
        if self.http is not None:  # bound first: a taken HTTP port stops the start before gRPC serves
            self.http_server = HttpServer(self.http.app, listen(self.config.host, self.config.http_port), api_tls)
            self.http_server.start()
        try:
            self.port = bind(self.grpc_server, self.config.host, self.config.port,
                             server_credentials(api_tls) if api_tls else None)
            self.metrics.start(self.config.host)  # before serving: a taken metrics port fails the start
        except BaseException:
            if self.http_server is not None:
                self.http_server.stop(0.0)
            raise
        self.grpc_server.start()
        try:  # the first route, made now: with greedy chaining its last -> first check runs at start-up
            self.routes.new_route(lambda address: 0)
        except NoRoute:
            pass
        self.pool.subscribe(lambda address, state: self._report_health())
        self._report_health()
        return self.port

    def _report_health(self) -> None:
        """SERVING while the stage servers form a route, NOT_SERVING when a span has none (or stopping)."""
        try:
            serving = not self._stopping and bool(self.pool.choose())
        except NoRoute as missing:
            serving = False
            log.warning("not serving: %s", missing)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", COORDINATOR_SERVICE):
            self.health.set(service, status)

    def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        self._report_health()
        if self.http_server is not None:
            self.http.close()
            self.http_server.stop(grace_s)
        stop_server(self.grpc_server, grace_s)
        if self.registry is not None:
            self.registry.stop()
        self.metrics.close()
        self.routes.close()
        self.pool.close()


def _max_context(model_dir: str) -> int:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))

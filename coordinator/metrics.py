"""The coordinator's Prometheus metrics: one registry, its families, and what feeds them.

Owns: `REGISTRY` (a prometheus_client CollectorRegistry of this process's coordinator families,
not the library's global default, so that a scrape shows layerline's families alone; the HTTP
face serves it with `generate_latest(REGISTRY)`, `--metrics-port` on its own port), the
families measured as things happen (`RequestMeter`: one request's status, TTFT, time per output
token, duration and tokens, for either API; `decode_step` and `prefill_chunks`, called by the
engine and the prefill), and those read when scraped (`CoordinatorCollector`: the engine's queue
and rows, failovers and replays, the stage servers by state). Every family and its meaning is
listed in docs/metrics.md.

Does not own: serving the port (protos/metrics_endpoint.py), the counts it reads (engine,
scheduler, failover, stage_pool), or what a status means (service, the HTTP face).
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from protos.metrics_endpoint import (
    MetricsEndpoint,
    MetricsPort,
    add_metrics_port_argument,
)

REGISTRY = CollectorRegistry()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

REQUESTS = Counter("layerline_requests", "Generation requests finished, by API (grpc, http) and status code "
                   "(gRPC status name or HTTP status)", ["api", "code"], registry=REGISTRY)
TIME_TO_FIRST_TOKEN = Histogram("layerline_time_to_first_token_seconds",
                                "Seconds from a request's arrival to its first generated token",
                                ["api"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TIME_PER_OUTPUT_TOKEN = Histogram("layerline_time_per_output_token_seconds",
                                  "Seconds between consecutive generated tokens of one request (one observation "
                                  "per token after the first)", ["api"], buckets=_TOKEN_GAP_BUCKETS,
                                  registry=REGISTRY)
REQUEST_DURATION = Histogram("layerline_request_duration_seconds",
                             "Seconds from a request's arrival to its end, whatever its status",
                             ["api"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
PROMPT_TOKENS = Counter("layerline_prompt_tokens", "Prompt tokens of accepted requests", ["api"],
                        registry=REGISTRY)
COMPLETION_TOKENS = Counter("layerline_completion_tokens", "Tokens generated for requests, as they are produced",
                            ["api"], registry=REGISTRY)
DECODE_STEP_ROWS = Histogram("layerline_decode_step_rows", "Rows (sequences) in each decode step the engine "
                             "completed: the batch size", buckets=_ROW_BUCKETS, registry=REGISTRY)
PREFILL_CHUNKS = Counter("layerline_prefill_chunks", "Prefill chunks scheduled (a long prompt goes in chunks of "
                         "--prefill-chunk tokens)", registry=REGISTRY)

for _family in (TIME_TO_FIRST_TOKEN, TIME_PER_OUTPUT_TOKEN, REQUEST_DURATION, PROMPT_TOKENS, COMPLETION_TOKENS):
    _family.labels("grpc")  # the gRPC API always serves: its series start at 0, so rates have a start
REQUESTS.labels("grpc", "OK")


def decode_step(rows: int) -> None:
    """A decode step of `rows` rows came back."""
    DECODE_STEP_ROWS.observe(rows)


def prefill_chunks(chunks: int) -> None:
    PREFILL_CHUNKS.inc(chunks)


class RequestMeter:
    """One request's measurements: `prompt` once it is accepted, `token` for each generated token (on
    whichever thread produces it), `finish` once with its status code; a second `finish` is ignored."""

    def __init__(self, api: str) -> None:
        self.api = api
        self.started = time.perf_counter()
        self._last: float | None = None
        self._finished = False
        self._completion = COMPLETION_TOKENS.labels(api)
        self._gap = TIME_PER_OUTPUT_TOKEN.labels(api)

    def prompt(self, tokens: int) -> None:
        PROMPT_TOKENS.labels(self.api).inc(tokens)

    def token(self, _token_id: int | None = None) -> None:
        now = time.perf_counter()
        if self._last is None:
            TIME_TO_FIRST_TOKEN.labels(self.api).observe(now - self.started)
        else:
            self._gap.observe(now - self._last)
        self._last = now
        self._completion.inc()

    def finish(self, code: str) -> None:
        if self._finished:
            return
        self._finished = True
        REQUESTS.labels(self.api, code).inc()
        REQUEST_DURATION.labels(self.api).observe(time.perf_counter() - self.started)


@contextlib.contextmanager
def grpc_request(context) -> Iterator[RequestMeter]:
    """Meter a gRPC call of the public API; its code is the one the handler ended it with (OK when it
    returned), CANCELLED when the client left a stream before its end, UNKNOWN for an unexpected error."""
    meter = RequestMeter("grpc")
    failed = None
    try:
        yield meter
    except GeneratorExit:
        failed = "CANCELLED"
        raise
    except BaseException:
        failed = "UNKNOWN"
        raise
    finally:
        status = context.code()
        meter.finish(status.name if status is not None else failed or "OK")


# ---- read when scraped ---------------------------------------------------------------------

STAGE_STATES = ("serving", "draining", "down", "joining")  # coordinator/stage_pool.py's states
_TOTALS = ("decode_steps", "prefills", "hop_bytes", "failovers", "replays")


def _totals(engine) -> dict[str, int]:
    stats = engine.stats()
    return {"decode_steps": stats.decode_steps, "prefills": stats.prefills, "hop_bytes": stats.hop_bytes,
            "failovers": engine.failover.failovers, "replays": engine.failover.replayed}


class CoordinatorCollector:
    """Families read from the coordinators of this process when scraped (their sum, in the rare process
    that runs several). Totals of a coordinator that has stopped are kept, so counters never go back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[object, object]] = {}  # id → (engine, pool)
        self._retired = dict.fromkeys(_TOTALS, 0)

    def watch(self, engine, pool) -> int:
        with self._lock:
            self._watched[id(engine)] = (engine, pool)
        return id(engine)

    def forget(self, key: int) -> None:
        with self._lock:
            watched = self._watched.pop(key, None)
            if watched is not None:
                for name, value in _totals(watched[0]).items():
                    self._retired[name] += value

    def collect(self):
        with self._lock:
            watched = list(self._watched.values())
            totals = dict(self._retired)
        queued = running = prefilling = positions = 0
        states = dict.fromkeys(STAGE_STATES, 0)
        for engine, pool in watched:
            stats = engine.stats()
            queued, running = queued + stats.queued, running + stats.running
            prefilling, positions = prefilling + stats.prefilling, positions + stats.reserved_positions
            for name, value in _totals(engine).items():
                totals[name] += value
            if pool is not None:
                for view in pool.views():
                    states[view.state] = states.get(view.state, 0) + 1
        yield _gauge("layerline_queue_depth", "Requests waiting to be admitted to the running batch", queued)
        yield _gauge("layerline_running_rows", "Sequences decoding in the running batch", running)
        yield _gauge("layerline_prefilling_rows", "Sequences whose prompt is being prefilled", prefilling)
        yield _gauge("layerline_reserved_cache_positions", "KV-cache positions the running batch holds on the "
                     "stages", positions)
        yield _counter("layerline_decode_steps", "Decode steps completed", totals["decode_steps"])
        yield _counter("layerline_prefills", "Prefills started (each one session, in one or more chunks)",
                       totals["prefills"])
        yield _counter("layerline_hop_bytes", "Activation bytes the stages sent each other, as they report them",
                       totals["hop_bytes"])
        yield _counter("layerline_failovers", "Times a group or prefill lost its route (a stage server failed) "
                       "and its sequences restarted on another", totals["failovers"])
        yield _counter("layerline_replays", "Sequences restarted on another route by exact replay",
                       totals["replays"])
        servers = GaugeMetricFamily("layerline_stage_servers", "Stage servers the coordinator knows, by state",
                                    labels=["state"])
        for state, count in states.items():
            servers.add_metric([state], count)
        yield servers


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


COLLECTOR = CoordinatorCollector()
REGISTRY.register(COLLECTOR)


class CoordinatorMetrics(MetricsPort):
    """One coordinator's part in REGISTRY while it runs, and its --metrics-port when given."""

    def __init__(self, engine, pool, endpoint: MetricsEndpoint | None = None) -> None:
        super().__init__(endpoint, REGISTRY)
        self._key = COLLECTOR.watch(engine, pool)

    def close(self) -> None:
        super().close()
        COLLECTOR.forget(self._key)


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    add_metrics_port_argument(parser, "HTTPS with the public API's --api-tls-* files when given, and only "
                                      "plaintext where the API may be (loopback or --insecure)")


def metrics_endpoint(args: argparse.Namespace) -> MetricsEndpoint | None:
    """--metrics-port, served as securely as the public API (protos/metrics_endpoint.py); None: off."""
    port = getattr(args, "metrics_port", None)
    if port is None:
        return None
    cert = getattr(args, "api_tls_cert", None)
    return MetricsEndpoint(port, certfile=cert, keyfile=getattr(args, "api_tls_key", None) if cert else None,
                           client_cafile=getattr(args, "api_tls_ca", None) if cert else None)

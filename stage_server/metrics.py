"""A stage's Prometheus metrics (`stage-server --metrics-port`): its families and what feeds them.

Owns: `StageMetrics`, one stage's own CollectorRegistry (several stages may share a process, as
in tests, each with its own registry and port) with the families measured as each micro-batch
is handled (`step`, called once per micro-batch by the step runner with the stamps it takes for
the step trace: compute time by kind, hop time, bytes sent by codec, micro-batches by outcome)
and those read when scraped from the stage itself (live sessions and KV-cache bytes from the
session store, stream slots in use, whether it serves); the flag, and the endpoint made from it.
Every family and its meaning is listed in docs/metrics.md.

Does not own: serving the port (protos/metrics_endpoint.py), the stamps (step_runner, step_trace),
or the counts it reads (sessions, stream_slots, servicer).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from protos import stage_pb2
from protos.metrics_endpoint import MetricsEndpoint, MetricsPort, add_metrics_port_argument

_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HOP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# --compression's names (protos/codec.py, which loads torch: the command line imports this module first)
_CODEC_NAMES = {value: name.removeprefix("CODEC_").lower() for name, value in stage_pb2.Codec.items()}
_CODEC_NAMES[stage_pb2.CODEC_UNSPECIFIED] = "none"
_NS = 1e-9


def step_kind(request: stage_pb2.ForwardRequest) -> str:
    """"prefill" for a step that starts a session or feeds more than one token a row, else "decode"."""
    shape = request.position_ids.shape
    return "prefill" if request.start_session or (shape and shape[-1] > 1) else "decode"


class StageMetrics(MetricsPort):
    """One stage's families. `service()` returns the stage's StageService (None before it is built);
    the gauges read it at each scrape."""

    def __init__(self, service: Callable[[], object], endpoint: MetricsEndpoint) -> None:
        super().__init__(endpoint, CollectorRegistry())
        self._service = service
        self.step_seconds = Histogram(
            "layerline_stage_step_seconds", "Seconds from the compute thread taking a micro-batch to its forward "
            "pass returning (checks and decoding included), by kind (prefill, decode)", ["kind"],
            buckets=_STEP_BUCKETS, registry=self.registry)
        self.hop_seconds = Histogram(
            "layerline_stage_hop_seconds", "Seconds from a forward pass returning to its output being handed to "
            "the next hop's link (encoding included)", buckets=_HOP_BUCKETS, registry=self.registry)
        self.sent_bytes = Counter(
            "layerline_stage_sent_bytes", "Activation payload bytes sent to next hops, by wire codec", ["codec"],
            registry=self.registry)
        self.micro_batches = Counter(
            "layerline_stage_micro_batches", "Micro-batches handled, by outcome (forwarded, answered, failed)",
            ["outcome"], registry=self.registry)
        # children looked up once: a step's measurements then cost no label lookups
        self._step_by_kind = {kind: self.step_seconds.labels(kind) for kind in ("prefill", "decode")}
        self._by_outcome = {outcome: self.micro_batches.labels(outcome) for outcome in ("forwarded", "answered",
                                                                                         "failed")}
        self._bytes_by_codec = {value: self.sent_bytes.labels(name) for value, name in _CODEC_NAMES.items()}
        self.registry.register(_StageGauges(service))

    def step(self, request: stage_pb2.ForwardRequest, outcome: str, started_ns: int, computed_ns: int,
             sent_bytes: int, now_ns: int) -> None:
        """A micro-batch is done with here: `outcome` as the step trace says it, stamps in monotonic ns
        (`computed_ns` 0: its forward pass never returned), `sent_bytes` to the next hop (0: none)."""
        self._by_outcome[outcome].inc()
        if computed_ns:
            self._step_by_kind[step_kind(request)].observe((computed_ns - started_ns) * _NS)
        if outcome == "forwarded":
            self.hop_seconds.observe((now_ns - computed_ns) * _NS)
            self._bytes_by_codec[request.wire_codec].inc(sent_bytes)



class _StageGauges:
    """Gauges read from the stage at each scrape."""

    def __init__(self, service: Callable[[], object]) -> None:
        self._service = service

    def collect(self):
        service = self._service()
        steps = getattr(service, "steps", None)
        served = getattr(steps, "served", None)
        sessions, cache_bytes = served.sessions.stats() if served is not None else (0, 0)
        slots = len(service.stream_slots) if service is not None else 0
        serving = served is not None and not service.draining
        yield GaugeMetricFamily("layerline_stage_sessions", "Live KV-cache sessions on this stage", value=sessions)
        yield GaugeMetricFamily("layerline_stage_kv_cache_bytes", "KV-cache bytes the live sessions have reserved",
                                value=cache_bytes)
        yield GaugeMetricFamily("layerline_stage_stream_slots", "Forward and Results streams open (of "
                                "--max-streams)", value=slots)
        yield GaugeMetricFamily("layerline_stage_stream_slots_max", "--max-streams: stream slots this stage has",
                                value=service.max_streams if service is not None else 0)
        yield GaugeMetricFamily("layerline_stage_serving", "1 once the weights are in and while not draining",
                                value=int(serving))


class Unmetered:
    """The step runner's meter when --metrics-port is not given: measures nothing."""

    def step(self, *_args) -> None:
        pass


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    add_metrics_port_argument(parser, "HTTPS with the stage's --tls-* files and a client certificate of its CA "
                                      "required when given, and only plaintext where the gRPC port may be "
                                      "(loopback or --insecure)")


def metrics_endpoint(args: argparse.Namespace) -> MetricsEndpoint | None:
    """--metrics-port, served as securely as the stage's gRPC port (protos/metrics_endpoint.py); None: off."""
    if args.metrics_port is None:
        return None
    if args.tls_cert:
        return MetricsEndpoint(args.metrics_port, certfile=args.tls_cert, keyfile=args.tls_key,
                               client_cafile=args.tls_ca)
    return MetricsEndpoint(args.metrics_port)

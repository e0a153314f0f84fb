"""Prometheus metrics (coordinator/metrics.py, stage_server/metrics.py, protos/metrics_endpoint.py):
after a workload, the coordinator's and every stage's /metrics parse with prometheus_client's own
parser and hold every family with the values the workload implies: requests by status, one TTFT per
answered request, one time-per-output-token per token after the first, tokens in and out, decode
steps of the stages, bytes sent, no session left. A failover shows in the failover and replay
counters and in the stage servers by state; metrics over TLS need the client certificate the gRPC
port needs."""

from __future__ import annotations

import json
import re
import ssl
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from conftest import running_coordinator, running_replicas, running_stages
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import save_tiny_model, save_tiny_tokenizer
from waiting import eventually

from coordinator.certs import make_certificates
from coordinator.pipeline_client import PipelineClient
from protos import coordinator_pb2, coordinator_pb2_grpc
from protos.metrics_endpoint import MetricsEndpoint
from protos.tls import TlsFiles

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26]]
NEW_TOKENS = [6, 9, 4]
COORDINATOR_FAMILIES = {
    "layerline_requests", "layerline_time_to_first_token_seconds", "layerline_time_per_output_token_seconds",
    "layerline_request_duration_seconds", "layerline_prompt_tokens", "layerline_completion_tokens",
    "layerline_queue_depth", "layerline_running_rows", "layerline_prefilling_rows",
    "layerline_reserved_cache_positions", "layerline_decode_step_rows", "layerline_prefill_chunks",
    "layerline_decode_steps", "layerline_prefills", "layerline_hop_bytes", "layerline_failovers",
    "layerline_replays", "layerline_stage_servers"}
STAGE_FAMILIES = {
    "layerline_stage_step_seconds", "layerline_stage_hop_seconds", "layerline_stage_sent_bytes",
    "layerline_stage_micro_batches", "layerline_stage_sessions", "layerline_stage_kv_cache_bytes",
    "layerline_stage_stream_slots", "layerline_stage_stream_slots_max", "layerline_stage_serving"}


def undocumented(scraped: Scrape) -> list[str]:
    """Names on the page (a histogram's family name for its series) that docs/metrics.md does not list."""
    text = (ROOT / "docs" / "metrics.md").read_text()
    names = set()
    for sample, _ in scraped.samples:
        family = re.sub(r"_(bucket|sum|count)$", "", sample)
        names.add(family if scraped.families.get(family) == "histogram" else sample)
    return sorted(name for name in names if f"`{name}`" not in text)


class Scrape:
    """One /metrics page, parsed: its family names and every sample's value by name and labels."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        scheme = "https" if context is not None else "http"
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/metrics", timeout=10, context=context) as page:
            text = page.read().decode()
        self.families = {}
        self.samples: dict[tuple[str, frozenset], float] = {}
        for family in text_string_to_metric_families(text):
            self.families[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """The sum of `name` over every label set."""
        return sum(value for (sample, _), value in self.samples.items() if sample == name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("metrics-llama")
    save_tiny_model(directory, "llama")
    save_tiny_tokenizer(directory)
    return directory


def request(prompt: list[int], new_tokens: int) -> coordinator_pb2.GenerateRequest:
    return coordinator_pb2.GenerateRequest(token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True)


def test_a_workload_shows_in_the_coordinators_and_every_stages_metrics(model_dir):
    with running_stages(model_dir, 2, metrics=MetricsEndpoint(0), local_hops=False) as (addresses, stages), \
            running_coordinator(model_dir, addresses, metrics=MetricsEndpoint(0), chain="off") as (address, server):
        port = server.metrics.port
        before = Scrape(port)  # the coordinator's registry is the process's: compare with what it held before
        with grpc.insecure_channel(address) as channel:
            stub = coordinator_pb2_grpc.CoordinatorStub(channel)
            answers = [stub.Generate(request(PROMPTS[0], NEW_TOKENS[0]), timeout=60)]
            answers.append(list(stub.GenerateStream(request(PROMPTS[1], NEW_TOKENS[1]), timeout=60))[-1])
            answers.append(stub.Generate(request(PROMPTS[2], NEW_TOKENS[2]), timeout=60))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(coordinator_pb2.GenerateRequest(max_new_tokens=4), timeout=60)
        assert [a.completion_tokens for a in answers] == NEW_TOKENS
        after = Scrape(port)

        def grew(name: str, **labels) -> float:
            return after(name, **labels) - before(name, **labels)

        assert COORDINATOR_FAMILIES <= set(after.families)
        assert undocumented(after) == []
        assert grew("layerline_requests_total", api="grpc", code="OK") == 3
        assert grew("layerline_requests_total", api="grpc", code=refused.value.code().name) == 1
        assert grew("layerline_request_duration_seconds_count", api="grpc") == 4
        assert grew("layerline_time_to_first_token_seconds_count", api="grpc") == 3
        assert grew("layerline_time_per_output_token_seconds_count", api="grpc") == sum(NEW_TOKENS) - 3
        assert grew("layerline_time_per_output_token_seconds_sum", api="grpc") > 0
        assert grew("layerline_prompt_tokens_total", api="grpc") == sum(a.prompt_tokens for a in answers) \
            == sum(map(len, PROMPTS))
        assert grew("layerline_completion_tokens_total", api="grpc") == sum(NEW_TOKENS)
        # one request at a time: a prefill each (one chunk), then a decode step of one row per further token
        assert grew("layerline_prefills_total") == 3 and grew("layerline_prefill_chunks_total") == 3
        assert grew("layerline_decode_steps_total") == grew("layerline_decode_step_rows_count") == sum(NEW_TOKENS) - 3
        assert grew("layerline_decode_step_rows_sum") == sum(NEW_TOKENS) - 3
        assert grew("layerline_hop_bytes_total") > 0
        assert after("layerline_queue_depth") == after("layerline_running_rows") == 0
        assert after("layerline_prefilling_rows") == 0
        assert after("layerline_stage_servers", state="serving") == 2
        assert after("layerline_stage_servers", state="down") == 0

        first, last = (Scrape(stage.metrics.port) for stage in stages)
        for scraped in (first, last):
            assert set(scraped.families) == STAGE_FAMILIES and undocumented(scraped) == []
            assert scraped("layerline_stage_step_seconds_count", kind="prefill") == 3
            assert scraped("layerline_stage_step_seconds_count", kind="decode") == sum(NEW_TOKENS) - 3
            assert scraped("layerline_stage_micro_batches_total", outcome="failed") == 0
            assert scraped("layerline_stage_serving") == 1
            assert scraped("layerline_stage_stream_slots") >= 1
        assert first("layerline_stage_micro_batches_total", outcome="forwarded") == sum(NEW_TOKENS)
        assert first("layerline_stage_hop_seconds_count") == sum(NEW_TOKENS)
        assert first("layerline_stage_sent_bytes_total", codec="none") > 0
        assert last("layerline_stage_micro_batches_total", outcome="answered") == sum(NEW_TOKENS)
        assert last.total("layerline_stage_sent_bytes_total") == 0  # the last stage answers, it sends on nothing
        for stage in stages:  # every session freed, and the cache bytes with them
            assert eventually(lambda stage=stage: Scrape(stage.metrics.port)("layerline_stage_sessions"), 0) == 0
            assert Scrape(stage.metrics.port)("layerline_stage_kv_cache_bytes") == 0


def test_stage_gauges_follow_live_sessions(model_dir):
    """A session started and not ended shows in the gauges until it ends."""
    with running_stages(model_dir, 1, metrics=MetricsEndpoint(0), local_hops=False) as (addresses, stages):
        client = PipelineClient(addresses)
        try:
            ids = torch.tensor([[5, 6, 7]])
            client.submit("0" * 32, ids, torch.arange(3)[None], None, start_session=True, logits_top_k=1).result(30)
            held = Scrape(stages[0].metrics.port)
            assert held("layerline_stage_sessions") == 1 and held("layerline_stage_kv_cache_bytes") > 0
            client.end_session("0" * 32)
            assert eventually(lambda: Scrape(stages[0].metrics.port)("layerline_stage_sessions"), 0) == 0
        finally:
            client.close()


def test_a_failover_shows_in_the_failover_counters_and_the_servers_by_state(model_dir):
    with running_replicas(model_dir) as servers:
        spans = ",".join("|".join(a for a, s in servers.items() if s.config.layer_start == start) for start in (0, 2))
        with running_coordinator(model_dir, [spans], metrics=MetricsEndpoint(0), chain="off",
                                 stall_timeout_s=5.0) as (address, server):
            port = server.metrics.port
            before = Scrape(port)
            assert before("layerline_stage_servers", state="serving") == 4
            crashed = threading.Event()
            with grpc.insecure_channel(address) as channel:
                stream = coordinator_pb2_grpc.CoordinatorStub(channel).GenerateStream(request(PROMPTS[0], 60),
                                                                                      timeout=120)
                tokens = 0
                for answer in stream:
                    tokens += len(answer.token_ids)
                    if tokens == 3:  # mid-generation: take the last stage of the running route away
                        route = next(g.route for g in server.engine._state.groups if g.route is not None)
                        servers[route.addresses[-1]].grpc_server.stop(0)
                        crashed.set()
            assert crashed.is_set() and tokens == 60
            after = Scrape(port)
            assert after("layerline_failovers_total") - before("layerline_failovers_total") >= 1
            assert after("layerline_replays_total") - before("layerline_replays_total") >= 1
            assert after("layerline_requests_total", api="grpc", code="OK") - \
                before("layerline_requests_total", api="grpc", code="OK") == 1
            assert after("layerline_stage_servers", state="down") == 1
            assert after("layerline_stage_servers", state="serving") == 3


def test_metrics_over_tls_need_a_client_certificate_of_the_stages_ca(model_dir, tmp_path):
    make_certificates(tmp_path, ["localhost"])
    ca, cert, key = (str(tmp_path / name) for name in ("ca.pem", "localhost.pem", "localhost-key.pem"))
    endpoint = MetricsEndpoint(0, certfile=cert, keyfile=key, client_cafile=ca)
    tls = TlsFiles.read(ca=ca, cert=cert, key=key)
    with running_stages(model_dir, 1, metrics=endpoint, tls=tls, local_hops=False,
                        tell_deployment=False) as (_, stages):
        port = stages[0].metrics.port
        anonymous = ssl.create_default_context(cafile=ca)
        with pytest.raises(OSError):  # refused in the handshake (urllib's URLError, ssl's SSLError, a reset)
            Scrape(port, anonymous)
        with pytest.raises(OSError):
            Scrape(port)  # plaintext HTTP to a TLS port
        client = ssl.create_default_context(cafile=ca)
        client.load_cert_chain(str(tmp_path / "client.pem"), str(tmp_path / "client-key.pem"))
        assert Scrape(port, client)("layerline_stage_serving") == 1


def test_the_dashboard_and_the_scrape_config_use_the_exported_families():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "layerline.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    named = {re.sub(r"_(bucket|sum|count|total)$", "", name) for expr in exprs
             for name in re.findall(r"layerline_[a-z_]+", expr)}
    assert named == COORDINATOR_FAMILIES | STAGE_FAMILIES  # every family shown, and none that is not exported
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"layerline-coordinator", "layerline-stages"}
    assert all(job["static_configs"][0]["targets"] for job in jobs.values())


def test_a_stream_the_client_leaves_counts_as_cancelled(model_dir):
    with running_stages(model_dir, 2, local_hops=False) as (addresses, _), \
            running_coordinator(model_dir, addresses, metrics=MetricsEndpoint(0)) as (address, server):
        before = Scrape(server.metrics.port)
        with grpc.insecure_channel(address) as channel:
            stream = coordinator_pb2_grpc.CoordinatorStub(channel).GenerateStream(request(PROMPTS[0], 200), timeout=60)
            next(stream)
            stream.cancel()

        def cancelled() -> float:
            after = Scrape(server.metrics.port)
            return after("layerline_requests_total", api="grpc", code="CANCELLED") - \
                before("layerline_requests_total", api="grpc", code="CANCELLED")
        assert eventually(cancelled, 1) == 1


def test_the_metrics_port_takes_the_tls_files_of_the_port_it_stands_beside():
    from coordinator.cli import build_parser as coordinator_parser
    from coordinator.metrics import metrics_endpoint as coordinator_endpoint
    from stage_server.cli import build_parser as stage_parser
    from stage_server.metrics import metrics_endpoint as stage_endpoint

    serve = ["serve", "--stages", "127.0.0.1:1", "--model", "m"]
    assert coordinator_endpoint(coordinator_parser().parse_args(serve)) is None
    assert coordinator_endpoint(coordinator_parser().parse_args([*serve, "--metrics-port", "9100"])) == \
        MetricsEndpoint(9100)
    api_tls = ["--api-tls-cert", "c.pem", "--api-tls-key", "k.pem"]
    assert coordinator_endpoint(coordinator_parser().parse_args([*serve, "--metrics-port", "0", *api_tls])) == \
        MetricsEndpoint(0, certfile="c.pem", keyfile="k.pem")
    assert coordinator_endpoint(coordinator_parser().parse_args(
        [*serve, "--metrics-port", "0", *api_tls, "--api-tls-ca", "ca.pem"])) == \
        MetricsEndpoint(0, certfile="c.pem", keyfile="k.pem", client_cafile="ca.pem")
    stage = ["--model", "m", "--layers", "0:2", "--metrics-port", "9101"]
    assert stage_endpoint(stage_parser().parse_args(stage)) == MetricsEndpoint(9101)
    assert stage_endpoint(stage_parser().parse_args(
        [*stage, "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-ca", "ca.pem"])) == \
        MetricsEndpoint(9101, certfile="c.pem", keyfile="k.pem", client_cafile="ca.pem")
    with pytest.raises(SystemExit):
        stage_parser().parse_args([*stage[:-1], "65536"])

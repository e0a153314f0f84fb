"""SmolLM2-135M across three network-namespace hosts over shaped links, started as the container
starts it (shaped_hosts.role_command), mutual TLS on every hop and on the API: a host per stage
and one for the coordinator, in 10.63.1.0/24, every link with 1 ms each way (relays) and 200 Mbit/s
(tbf). The pipeline's greedy tokens are the unsplit Hugging Face model's, with greedy chaining on;
and with the last stage's packets to the first stage dropped (a firewall that answers nothing), the
route's chain check fails, the route stays unchained and every request still gets those tokens.
Skips where namespaces cannot be made (not root, no `ip netns`)."""

from __future__ import annotations

import time

import pytest
from netns_hosts import netns_available
from shaped_hosts import shaped_deployment
from tiny_models import chat_reference

from coordinator.client import CoordinatorClient
from protos.model_files.fetch import ensure_model

pytestmark = [pytest.mark.skipif(bool(netns_available()), reason=netns_available() or "available"),
              pytest.mark.real_model]

SUBNET = "10.63.1"
SPANS = ["0:10", "10:20", "20:30"]
CHATS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 16
CHECK_FAILED = "its last stage did not reach its first"  # the route's chain check, logged by the coordinator
CHECK_PASSED = "greedy chaining is on for route"  # likewise, at INFO
ROUTE_LOST = " lost ("  # a failover: a step failed on the route and its sequences were replayed


@pytest.fixture(scope="module")
def unsplit():
    """The model's directory, the chat prompts and the unsplit model's greedy tokens for them."""
    model_dir = ensure_model("smollm2-135m", progress=False)
    _, prompts, expected = chat_reference(model_dir, CHATS, NEW_TOKENS)
    return model_dir, prompts, expected


@pytest.fixture(scope="module")
def deployment(unsplit, tmp_path_factory):
    with shaped_deployment("mht", SUBNET, unsplit[0], SPANS, tmp_path_factory.mktemp("hosts")) as hosts:
        hosts.shape("200mbit")
        yield hosts


def _generate(address: str, tls, prompts: list[list[int]]) -> list[list[int]]:
    with CoordinatorClient(address, tls=tls, timeout_s=60) as client:
        return [list(client.generate(token_ids=ids, max_new_tokens=NEW_TOKENS).token_ids) for ids in prompts]


def _wait_for_line(process, text: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(text in line for line in process.lines):
            return True
        time.sleep(0.1)
    return False


def test_three_hosts_generate_the_unsplit_models_tokens(unsplit, deployment):
    _, prompts, expected = unsplit
    with deployment.coordinator(deployment.through_relays(1.0), "--chain", "on", "--log-level", "INFO") as (
            address, coordinator):
        # the first route is made, and its chaining hop checked, at start-up: before any request
        assert _wait_for_line(coordinator, CHECK_PASSED, 10), "".join(coordinator.lines[-10:])
        assert _generate(address, deployment.client_tls(), prompts) == expected  # chained
        assert _generate(address, deployment.client_tls(), prompts) == expected
        log = "".join(coordinator.lines)
        assert CHECK_FAILED not in log and ROUTE_LOST not in log, log[-3000:]


def test_with_the_last_to_first_hop_dropped_requests_fall_back_unchained(unsplit, deployment):
    _, prompts, expected = unsplit
    # relays of their own: a connection the last stage already holds to the first would not be
    # dialled anew, and a firewall stops new connections
    stages = deployment.through_relays(2.0)
    deployment.block(deployment.stage_hosts[-1], stages[0])
    try:
        with deployment.coordinator(stages, "--chain", "on") as (address, coordinator):
            started = time.monotonic()
            assert _generate(address, deployment.client_tls(), prompts) == expected  # while the route checks
            assert _wait_for_line(coordinator, CHECK_FAILED, 10), "".join(coordinator.lines[-10:])
            assert _generate(address, deployment.client_tls(), prompts) == expected  # unchained
            assert time.monotonic() - started < 30
            log = "".join(coordinator.lines)
            assert ROUTE_LOST not in log, log[-3000:]  # no step waited for the dropped connection and failed
    finally:
        deployment.shape("200mbit")

"""--chain auto|on|off: no greedy chaining by default when every stage shares this machine (chain_policy.py)."""

from __future__ import annotations

import pytest
from conftest import running_coordinator

from coordinator.chain_policy import chain_greedy_steps
from coordinator.cli import build_parser
from protos.addresses import is_loopback, loopback_port


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "127.3.4.5:1", "localhost:50051", "[::1]:50051",
                                     "unix:/tmp/stage.sock"])
def test_loopback_addresses(address):
    assert is_loopback(address)


@pytest.mark.parametrize("address", ["10.0.0.2:50051", "192.168.1.7:1", "stage-b.example:50051",
                                     "[2001:db8::1]:50051", "dns:///stage-b:50051"])
def test_other_machines(address):
    assert not is_loopback(address)


@pytest.mark.parametrize(("address", "port"), [("127.0.0.1:50051", 50051), ("localhost:7", 7), ("[::1]:8080", 8080),
                                             ("10.0.0.2:50051", None), ("unix:/tmp/stage.sock", None),
                                             ("127.0.0.1", None), ("127.0.0.1:x", None), ("127.0.0.1:70000", None)])
def test_loopback_port(address, port):
    assert loopback_port(address) == port


def test_auto_chains_only_when_a_stage_is_elsewhere():
    assert not chain_greedy_steps("auto", ["127.0.0.1:1", "localhost:2"])
    assert chain_greedy_steps("auto", ["127.0.0.1:1", "10.0.0.2:2"])
    assert chain_greedy_steps("on", ["127.0.0.1:1", "127.0.0.1:2"])
    assert not chain_greedy_steps("off", ["10.0.0.1:1", "10.0.0.2:2"])
    with pytest.raises(ValueError, match="auto, on, off"):
        chain_greedy_steps("yes", ["10.0.0.1:1"])


def test_the_cli_options():
    base = ["serve", "--stages", "a:1", "--model", "m"]
    assert build_parser().parse_args(base).chain == "auto"
    assert build_parser().parse_args([*base, "--chain", "on"]).chain == "on"
    assert build_parser().parse_args([*base, "--chain", "off"]).chain == "off"


@pytest.mark.parametrize(("setting", "chained"), [("auto", False), ("on", True), ("off", False)])
def test_the_coordinator_applies_it(tiny_model, stages, setting, chained):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, _), \
            running_coordinator(model_dir, addresses, chain=setting) as (_, server):
        assert server.engine.chain is chained

"""The TCP path layerline's processes pick for gRPC (protos/grpc_transport.py): when it is set,
when it is left alone, and that both command lines set it before anything loads gRPC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protos.grpc_transport import (
    OLDER_TCP_PATH,
    TRANSPORT_MEASURED_ON,
    _grpcio_release,
    applies_to,
    choose_tcp_transport,
)

ROOT = Path(__file__).resolve().parent.parent


def test_set_for_a_measured_release_when_unset():
    environ: dict[str, str] = {}
    assert choose_tcp_transport(environ, release=TRANSPORT_MEASURED_ON[0]) == OLDER_TCP_PATH
    assert environ == {"GRPC_EXPERIMENTS": OLDER_TCP_PATH}


@pytest.mark.parametrize("users", ["", "-event_engine_client", "some_other_experiment"])
def test_a_value_the_user_set_is_kept(users):
    environ = {"GRPC_EXPERIMENTS": users}
    assert choose_tcp_transport(environ, release=TRANSPORT_MEASURED_ON[0]) == users
    assert environ == {"GRPC_EXPERIMENTS": users}


@pytest.mark.parametrize("release", [(1, 84), (1, TRANSPORT_MEASURED_ON[1][1] + 1), (2, 0)])
def test_left_unset_for_a_release_it_was_not_measured_on(release):
    environ: dict[str, str] = {}
    assert choose_tcp_transport(environ, release=release) is None
    assert environ == {}


def _skip_unless_the_installed_grpcio_gets_the_switch() -> None:
    if not applies_to(_grpcio_release()):
        pytest.skip("the installed grpcio is not a release the switch applies to")


# Records GRPC_EXPERIMENTS as it is when `grpc` is first imported, then imports a command line.
_PROBE = """
import importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "grpc" and not seen:
            seen.append(os.environ.get("GRPC_EXPERIMENTS"))
        return None
sys.meta_path.insert(0, Watch())
import {module}
print(repr(seen[0] if seen else "grpc not imported"))
"""


@pytest.mark.parametrize(("imports", "expected"), [
    ("coordinator.cli", OLDER_TCP_PATH),
    ("stage_server.cli; import stage_server.server", OLDER_TCP_PATH),  # the order of the stage's main()
    ("grpc; import coordinator.cli", None),  # the probe sees a wrong order
])
def test_command_lines_choose_before_grpc_loads(imports, expected):
    _skip_unless_the_installed_grpcio_gets_the_switch()
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    result = subprocess.run([sys.executable, "-c", _PROBE.replace("{module}", imports)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == repr(expected)


def test_hop_latency_bench_compares_both_paths(tmp_path):
    """bench/hop_latency.py runs, and its two kinds of pair really ran on different TCP paths."""
    _skip_unless_the_installed_grpcio_gets_the_switch()
    out = tmp_path / "hop.json"
    env = {key: value for key, value in os.environ.items() if key != "GRPC_EXPERIMENTS"}
    subprocess.run([sys.executable, str(ROOT / "bench" / "hop_latency.py"), "--rounds", "2", "--trips", "20",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["grpc_experiments"] == {"gRPC default": "", "layerline": OLDER_TCP_PATH}
    assert len(result["payloads"]) == 2
    for figures in result["payloads"].values():
        for variant in ("gRPC default", "layerline"):
            assert len(figures["samples_us"][variant]) == 2 and all(us > 0 for us in figures["samples_us"][variant])
        assert figures["ratio"] == pytest.approx(figures["layerline_us"] / figures["grpc_default_us"])

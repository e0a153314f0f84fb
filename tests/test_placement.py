"""Placement by measured speed and memory: the plan from plain numbers, the plan command on probe
files, and the probe itself on a tiny model."""

from __future__ import annotations

import json

import pytest

from coordinator.cli import main as coordinator_main
from coordinator.placement import HostProbe, place, stage_memory
from coordinator.planner import PlanError
from stage_server import probe
from stage_server.cli import main as stage_server_main

MIB = 1 << 20


def host(name: str, seconds: float = 1.0, *, free: int = 10_000, layers: int = 30, head: float = 0.0,
         embedding: int = 0) -> HostProbe:
    return HostProbe(name, decode_layer_s=seconds, layer_bytes=1, free_bytes=free, num_layers=layers,
                     head_cost_layers=head, embedding_bytes=embedding, prefill_token_layer_s=seconds / 10)


def spans(plan) -> list[tuple[int, int]]:
    return [(s.start, s.end) for s in plan]


def test_a_host_twice_as_slow_gets_about_half_the_layers():
    assert spans(place([host("a", 1.0), host("b", 2.0)])) == [(0, 20), (20, 30)]
    assert spans(place([host("a", 2.0), host("b", 1.0)])) == [(0, 10), (10, 30)]


def test_equal_hosts_split_evenly():
    assert spans(place([host("a"), host("b"), host("c")])) == [(0, 10), (10, 20), (20, 30)]


def test_the_lm_head_counts_on_the_last_stage():
    # Head worth 8 layers: equal hosts give the last 19 - 8 = 11 layers (as plan_partition's head_cost does).
    plan = place([host("a", head=8.0), host("b", head=8.0)])
    assert spans(plan) == [(0, 19), (19, 30)]
    assert plan[1].seconds == pytest.approx(19.0)
    # A slow last host: 1 s/layer and 2 s/layer with the head: 25 vs (5 + 8) x 2 = 26 or 26 vs 24.
    plan = place([host("a", 1.0, head=8.0), host("b", 2.0, head=8.0)])
    assert max(s.seconds for s in plan) == pytest.approx(26.0)
    assert spans(plan) == [(0, 26), (26, 30)]  # of the two with 26 s, the one whose stages add up to less


def test_a_small_host_gets_only_what_fits():
    # b is faster but holds at most 6 layers (plus its cache and reserve).
    hosts = [host("a", 1.0), host("b", 0.25, free=6 + 100)]
    plan = place(hosts, cache_bytes=60, reserve_bytes=40)
    assert spans(plan) == [(0, 24), (24, 30)]
    assert plan[1].memory_bytes == 106 and plan[1].memory_bytes <= hosts[1].free_bytes


def test_memory_counts_embedding_head_cache_and_reserve():
    big = host("a", embedding=50)
    assert stage_memory(big, 0, 10, 7, 3) == 10 + 50 + 7 + 3  # first: embedding
    assert stage_memory(big, 10, 30, 7, 3) == 20 + 50 + 7 + 3  # last: the head
    assert stage_memory(big, 0, 30, 0, 0) == 30 + 100  # both, untied
    tied = HostProbe("t", decode_layer_s=1, layer_bytes=1, free_bytes=1, num_layers=30, embedding_bytes=50,
                     tied_head=True)
    assert stage_memory(tied, 0, 30, 0, 0) == 30 + 50  # a tied head shares the embedding


def test_a_host_too_small_for_a_layer_gets_none():
    plan = place([host("a"), host("tiny", 0.1, free=50), host("c")], cache_bytes=60)
    assert spans(plan) == [(0, 15), (15, 15), (15, 30)]


def test_hosts_that_cannot_hold_the_model_are_refused():
    with pytest.raises(PlanError, match="cannot hold the model"):
        place([host("a", free=12), host("b", free=12)])  # 24 bytes free for 30 layers


def test_probes_of_different_models_are_refused():
    other = HostProbe("b", decode_layer_s=1, layer_bytes=1, free_bytes=100, num_layers=30, fingerprint="x")
    with pytest.raises(PlanError, match="fingerprint"):
        place([host("a"), other])
    with pytest.raises(PlanError, match="same host"):
        place([host("a"), host("a")])


def test_prefill_speed_balances_prefill_times():
    a = HostProbe("a", decode_layer_s=1.0, prefill_token_layer_s=1.0, layer_bytes=1, free_bytes=99, num_layers=30)
    b = HostProbe("b", decode_layer_s=1.0, prefill_token_layer_s=2.0, layer_bytes=1, free_bytes=99, num_layers=30)
    assert spans(place([a, b], speed="decode")) == [(0, 15), (15, 30)]
    assert spans(place([a, b], speed="prefill")) == [(0, 20), (20, 30)]


@pytest.mark.parametrize("field, value", [("decode_layer_s", None), ("free_bytes", -1), ("layer_bytes", "1"),
                                          ("decode_layer_s", float("nan")), ("num_layers", 0)])
def test_a_bad_probe_is_refused_naming_the_field(field, value):
    data = {"decode_layer_s": 0.001, "prefill_token_layer_s": 0.0001, "head_cost_layers": 8, "layer_bytes": 10,
            "embedding_bytes": 100, "kv_bytes_per_token_layer": 4, "free_bytes": 10**9, "num_layers": 30}
    HostProbe.from_json(data, "ok")
    with pytest.raises(PlanError, match=field if value != 0 else "above zero"):
        HostProbe.from_json({**data, field: value}, "h")
    with pytest.raises(PlanError, match="format 2"):
        HostProbe.from_json({**data, "probe": 2}, "h")


def _probe_file(tmp_path, name: str, **changes) -> str:
    data = {"probe": 1, "host": name, "model": "m", "fingerprint": "f", "num_layers": 30, "dtype": "float32",
            "decode_layer_s": 0.001, "prefill_token_layer_s": 0.0001, "head_cost_layers": 8.0, "layer_bytes": MIB,
            "embedding_bytes": 4 * MIB, "kv_bytes_per_token_layer": 1536, "free_bytes": 4 << 30, **changes}
    path = tmp_path / f"{name}.json"
    path.write_text("loading...\n" + json.dumps(data) + "\n")  # the probe's line is the last one
    return str(path)


def test_plan_command_prints_json_with_commands(tmp_path, capsys):
    fast, slow = _probe_file(tmp_path, "a"), _probe_file(tmp_path, "b", decode_layer_s=0.002)
    assert coordinator_main(["plan", "--probe", f"node1={fast}", slow, "--format", "json", "--cache-mb", "64"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in plan["stages"]] == ["0:26", "26:30"]
    assert plan["stages"][0]["host"] == "node1" and plan["unused_hosts"] == []
    assert plan["stages"][1]["command"][:5] == ["stage-server", "--model", "m", "--layers", "26:30"]
    assert "--max-cache-mb" in plan["stages"][1]["command"] and "certs/b.pem" in plan["stages"][1]["command"]
    assert plan["coordinator"][:4] == ["coordinator", "serve", "--stages", "node1:50051,b:50051"]
    assert plan["slowest_stage_s"] < plan["even_split_slowest_stage_s"]
    assert plan["stages"][1]["memory_request_mib"] == 4 + 4 + 64 + 768


def test_plan_command_text_and_errors(tmp_path, capsys):
    fast, small = _probe_file(tmp_path, "a"), _probe_file(tmp_path, "b", free_bytes=100 * MIB)
    assert coordinator_main(["plan", "--probe", fast, small, "--insecure"]) == 0
    out = capsys.readouterr().out
    assert "b: no layers (too small" in out and "--insecure" in out and "stage-server --model m --layers 0:30" in out
    assert coordinator_main(["plan", "--probe", small]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coordinator: error: the hosts together cannot hold the model") and err.count("\n") == 1
    assert coordinator_main(["plan", "--probe", str(tmp_path / "missing.json")]) == 2
    assert "cannot read probe" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text("not json")
    assert coordinator_main(["plan", "--probe", str(tmp_path / "junk.json")]) == 2
    assert "no probe line" in capsys.readouterr().err


def test_cgroup_memory_allowance(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "box").mkdir(parents=True)
    (v2 / "box" / "memory.max").write_text("1000\n")
    (v2 / "box" / "memory.current").write_text("300\n")
    assert probe.cgroup_memory_free("0::/box\n", v2) == 700
    (v2 / "box" / "memory.max").write_text("max\n")
    assert probe.cgroup_memory_free("0::/box\n", v2) is None
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)  # a container sees its cgroup at the root
    (v1 / "memory.limit_in_bytes").write_text("5000")
    (v1 / "memory.usage_in_bytes").write_text("1000")
    assert probe.cgroup_memory_free("4:memory:/docker/abc\n1:cpu:/\n", tmp_path / "v1") == 4000
    assert probe.cgroup_memory_free("1:cpu:/\n", tmp_path / "v1") is None


def test_seconds_per_call_count_quota_stalls(monkeypatch):
    # A quota-throttled host: each call takes 1 s, and every fourth one waits 9 s more for the next period.
    clock = {"now": 0.0, "calls": 0}

    def step():
        clock["calls"] += 1
        clock["now"] += 10.0 if clock["calls"] % 4 == 0 else 1.0

    monkeypatch.setattr(probe.time, "perf_counter", lambda: clock["now"])
    seconds = probe.median_seconds(step, rounds=5, round_s=20.0, max_calls=100)
    assert 2.5 < seconds < 4.0  # the stalls are counted (a median single call would say 1 s)


def test_probe_of_a_tiny_model(tiny_model, monkeypatch, capsys):
    monkeypatch.setattr(probe, "ROUND_S", 0.01)
    model_dir = tiny_model("llama")
    assert stage_server_main(["--probe", "--model", str(model_dir), "--quiet", "--threads", "1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["model"] == str(model_dir)  # as given: the plan's commands name it so
    assert line["probe"] == probe.PROBE_FORMAT and line["num_layers"] == 4 and line["probed_layers"] == [1, 3]
    assert line["decode_layer_s"] > 0 and line["prefill_token_layer_s"] > 0 and line["free_bytes"] > 0
    assert line["layer_bytes"] > 0 and line["kv_bytes_per_token_layer"] == 2 * 2 * 16 * 4
    assert line["head_cost_layers"] == pytest.approx(128 * 64 * 4 / line["layer_bytes"])
    HostProbe.from_json(line)  # the plan reads what the probe prints


def test_probe_needs_no_layers_but_a_stage_does(capsys):
    with pytest.raises(SystemExit) as exit_info:
        stage_server_main(["--model", "x"])
    assert exit_info.value.code == 2 and "--layers" in capsys.readouterr().err
    assert stage_server_main(["--probe", "--model", "/nonexistent/model", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("stage-server: error:")

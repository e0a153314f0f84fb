"""Losing a stage loses no request: real processes, two spans of two replicas each, under load.

A cluster of stage-server processes (tests/failover_cluster.py) serves a model as 2 spans × 2
replicas behind one `coordinator serve` process; 16 clients stream greedy requests of 32 tokens
through the public API while a replica is killed (SIGKILL), frozen (SIGSTOP), drained (SIGTERM) or
every server of a span is lost. Every request that can succeed does, token for token as the same
requests on the same cluster without a failure (the reference run made when the cluster starts);
a span with no server left fails requests UNAVAILABLE with the span named, quickly; and
after each scenario no surviving stage holds a session or KV cache (Info). The kill points are drawn
from a fixed seed, so a failing run can be replayed.
"""

from __future__ import annotations

import random
import time

import grpc
import pytest
from failover_cluster import Cluster
from streaming_clients import LoopingClients, Streams, failures, stream_all, stream_one

from coordinator.planner import plan_partition

CLIENTS = 16
NEW_TOKENS = 32
REPLICAS = 2
SEED = 2025
FROZEN_NOTICED_S = 6.0  # a frozen stage is marked down within ~5 s (the coordinator's stall timeout)
SPAN_LOST_S = 10.0  # a request needing a span with no live server fails within this
BACK_S = 10.0  # a span's server started again takes new requests within this
LOST_FOR_S = 12.0  # how long a span stays without servers: longer than the pool's longest probe backoff
RESTARTED_S = 30.0  # a drained stage started again serves within this (its probe backoff, on a loaded machine)
LEFTOVER_S = 5.0  # how long the stages get to free what a finished or failed-over request held

# Three kills: (span whose busiest replica is killed, how far into the run in tokens over all
# streams), both spans included, drawn once.
_draw = random.Random(SEED)
KILLS = [(span, _draw.uniform(0.1, 0.8)) for span in (0, 1, _draw.randrange(2))]


def _prompts(count: int, vocab: tuple[int, int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(*vocab) for _ in range(rng.randrange(4, 14))] for _ in range(count)]


def _reference(cluster: Cluster, prompts: list[list[int]]) -> list[list[int]]:
    """The tokens of the same requests on the same cluster without a failure."""
    results = stream_all(cluster.address, prompts, NEW_TOKENS)
    assert failures(results) == []
    assert all(len(r.tokens) == NEW_TOKENS for r in results)
    return [r.tokens for r in results]


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model, tmp_path_factory):
    """(cluster, prompts, reference tokens) over the tiny Llama (4 layers)."""
    prompts = _prompts(CLIENTS, (3, 128), SEED)
    with Cluster(tiny_model("llama"), plan_partition(4, 2), REPLICAS, tmp_path_factory.mktemp("failover-tiny")) \
            as cluster:
        yield cluster, prompts, _reference(cluster, prompts)


@pytest.fixture(scope="module")
def smollm2_cluster(tmp_path_factory):
    """(cluster, prompts, reference tokens) over SmolLM2-135M-Instruct, chat prompts."""
    from transformers import AutoConfig

    from coordinator.text import Tokenization
    from protos.model_files.fetch import ensure_model

    model_dir = ensure_model("smollm2-135m", progress=False)
    tokenization = Tokenization.from_model_dir(model_dir)
    topics = ["the sea", "a CPU", "Paris", "spiders", "rainbows", "bread", "winter", "trains", "the moon", "chess",
              "volcanoes", "bees", "clocks", "rivers", "libraries", "music"]
    prompts = [tokenization.encode_chat([{"role": "user", "content": f"Tell me about {t}."}])
               for t in topics[:CLIENTS]]
    layers = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    with Cluster(model_dir, plan_partition(layers, 2), REPLICAS, tmp_path_factory.mktemp("failover-smollm2")) \
            as cluster:
        yield cluster, prompts, _reference(cluster, prompts)


def _assert_nothing_left(cluster: Cluster, skip=()) -> None:
    """Done-when 7: no session or KV cache on any running stage once the requests have ended."""
    assert cluster.leftovers(LEFTOVER_S, skip=skip) == {}, "sessions or caches left (address: sessions, bytes)"


def _span_name(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


def _kill_mid_run(cluster: Cluster, prompts, reference, kill: int) -> None:
    span, fraction = KILLS[kill]
    cluster.make_whole()
    streams = Streams(cluster.address, prompts, NEW_TOKENS).start()
    assert streams.wait_tokens(int(fraction * CLIENTS * NEW_TOKENS)), failures(streams.join())
    cluster.busiest(span).kill()
    results = streams.join()
    assert failures(results) == []
    assert [r.tokens for r in results] == reference
    _assert_nothing_left(cluster)


@pytest.mark.parametrize("kill", range(len(KILLS)), ids=[f"span{s}-at{f:.2f}" for s, f in KILLS])
def test_killing_a_replica_mid_run_loses_no_token(tiny_cluster, kill):
    """Done-when 1 (tiny model): SIGKILL of the replica carrying a span's sequences mid-run under 16
    streams: 16/16 succeed, with the reference tokens."""
    _kill_mid_run(*tiny_cluster, kill)


@pytest.mark.real_model
@pytest.mark.parametrize("kill", range(len(KILLS)), ids=[f"span{s}-at{f:.2f}" for s, f in KILLS])
def test_killing_a_smollm2_replica_mid_run_loses_no_token(smollm2_cluster, kill):
    """Done-when 1 (SmolLM2-135M): as for the tiny model."""
    _kill_mid_run(*smollm2_cluster, kill)


def test_a_frozen_replica_is_routed_around_and_returns_after_resuming(tiny_cluster):
    """Done-when 2: SIGSTOP of a replica mid-run, never resumed during it: it shows down within ~5 s,
    every request succeeds with the reference tokens; after SIGCONT it serves again and takes requests."""
    cluster, prompts, reference = tiny_cluster
    cluster.make_whole()
    streams = Streams(cluster.address, prompts, NEW_TOKENS).start()
    assert streams.wait_tokens(CLIENTS * NEW_TOKENS // 4), failures(streams.join())
    victim = cluster.busiest(1)
    victim.freeze()
    try:
        noticed_s = cluster.wait_state(victim, "down", FROZEN_NOTICED_S + 4.0)
        results = streams.join()
        assert failures(results) == []
        assert [r.tokens for r in results] == reference
        assert noticed_s <= FROZEN_NOTICED_S, f"frozen stage marked down after {noticed_s:.1f}s"
        _assert_nothing_left(cluster, skip=(victim,))
    finally:
        victim.resume()
    cluster.wait_state(victim, "serving", BACK_S)
    assert [r.tokens for r in stream_all(cluster.address, prompts, NEW_TOKENS)] == reference
    _assert_nothing_left(cluster)


def test_a_span_without_servers_fails_fast_and_serves_again_when_one_returns(tiny_cluster):
    """Done-when 3: both replicas of a span killed mid-run: requests fail UNAVAILABLE naming the span
    within 10 s; one restarted on its port after a while (same coordinator process): new requests
    succeed within 10 s of it being ready."""
    cluster, prompts, reference = tiny_cluster
    cluster.make_whole()
    coordinator_pid = cluster.coordinator.pid
    span = cluster.spans[1]
    streams = Streams(cluster.address, prompts, NEW_TOKENS).start()
    assert streams.wait_tokens(CLIENTS * NEW_TOKENS // 4), failures(streams.join())
    killed_at = time.monotonic()
    for stage in cluster.stages[1]:
        stage.kill()
    in_flight = streams.join()
    for result in in_flight:
        assert result.ok or (result.code == grpc.StatusCode.UNAVAILABLE and _span_name(span) in result.message
                             and result.ended - killed_at <= SPAN_LOST_S), failures([result])
    for prompt in prompts[:4]:
        result = stream_one(cluster.address, prompt, NEW_TOKENS, timeout_s=SPAN_LOST_S + 20.0)
        assert result.code == grpc.StatusCode.UNAVAILABLE and _span_name(span) in result.message, failures([result])
        assert result.ended - result.started <= SPAN_LOST_S
    _assert_nothing_left(cluster)
    time.sleep(max(0.0, LOST_FOR_S - (time.monotonic() - killed_at)))

    cluster.stages[1][0].restart()
    back_at, answered = time.monotonic(), None
    while time.monotonic() - back_at <= BACK_S and not (answered and answered.ok):
        answered = stream_one(cluster.address, prompts[0], NEW_TOKENS, timeout_s=BACK_S)
        time.sleep(0.2 if not answered.ok else 0)
    assert answered is not None and answered.ok, \
        f"no request succeeded within {BACK_S:.0f}s of the span's server being ready again: {failures([answered])}"
    assert answered.tokens == reference[0]
    assert cluster.coordinator.pid == coordinator_pid and cluster.coordinator_alive()
    assert [r.tokens for r in stream_all(cluster.address, prompts, NEW_TOKENS)] == reference
    _assert_nothing_left(cluster)


def test_a_rolling_restart_under_load_fails_no_request(tiny_cluster):
    """Done-when 4: every stage in turn gets SIGTERM, exits, starts again on its port and serves,
    while 16 clients keep streaming new requests: none fails, each gives its reference tokens."""
    cluster, prompts, reference = tiny_cluster
    cluster.make_whole()
    clients = LoopingClients(cluster.address, prompts, NEW_TOKENS).start()
    exits = []
    try:
        for stage in cluster.all_stages:
            stage.terminate()
            exits.append(stage.wait_exit())
            stage.start()
            stage.wait_ready()
            cluster.wait_state(stage, "serving", RESTARTED_S)
    finally:
        results = clients.stop()
    assert exits == [0] * len(cluster.all_stages), "a draining stage exits cleanly"
    done = [r for per_client in results for r in per_client]
    assert failures(done) == []
    assert len(done) >= 2 * CLIENTS
    mismatched = [i for i, per_client in enumerate(results) for r in per_client if r.tokens != reference[i]]
    assert mismatched == []
    _assert_nothing_left(cluster)

"""The quick fuzz profile: every RPC of both services, from mutated valid requests and raw bytes.

One tiny pipeline of real processes (2 stages with a 3 s session timeout, and a coordinator) takes
2,000 mutated messages (1,200 to the stages, 800 to the coordinator, shared evenly over each
service's RPCs), then 20,000 unparseable calls to the coordinator, 5,000 to each stage and 12
unparseable Forward streams to each stage (bench/fuzz_pipeline.py runs it; `make fuzz` runs the
long profile). Every assertion message names the seed, so a failure can be sent again.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fuzz_mutations import mutate_fields, mutate_wire, split_fields  # noqa: E402
from fuzz_pipeline import EXIT_LIMIT_S, run_profile  # noqa: E402
from fuzz_rpcs import COORDINATOR, STAGE  # noqa: E402

from protos import stage_pb2  # noqa: E402

SEED = 24
MESSAGES = 2_000
MESSAGES_PER_RPC = 150  # the smallest share an RPC gets (1,200 / 5 stage RPCs, 800 / 3 coordinator RPCs)
# How far a process's RSS may move. Over the flood: 20 MB, where grpcio parsing requests itself kept
# ~16 KB for each of the 5,000 (stage) or 20,000 (coordinator) unparseable calls, 80 MB or more.
# From the end of the warm-up to the end (every session freed): 32 MB, room for what glibc and
# torch keep of freed memory for reuse; the tiny model's caches of all 64 sessions a stage may hold
# are a few MB, so a leak per message of anything like a session would pass it.
FLOOD_RSS_MB = 20.0
FUZZ_RSS_MB = 32.0


@pytest.fixture(scope="module")
def report():
    return run_profile(messages=MESSAGES, stage_share=0.6, flood=20_000, stage_flood=5_000, seed=SEED, workers=2,
                       session_timeout_s=3.0, rss_limit_mb=FLOOD_RSS_MB, fuzz_rss_limit_mb=FUZZ_RSS_MB)


def _named(report) -> str:
    return f"(seed {report['seed']}; bench/fuzz_rpcs.py --seed {report['seed']} reproduces the run)"


def test_every_rpc_of_both_services_is_fuzzed(report):
    rpcs = {f"{service.name}.{method.name}" for service in (STAGE, COORDINATOR) for method in service.methods}
    assert set(report["rpcs"]) == rpcs
    assert all(report["rpcs"][rpc]["calls"] >= MESSAGES_PER_RPC for rpc in rpcs), report["rpcs"]
    assert report["mutated_calls"] == MESSAGES and report["messages"] >= MESSAGES


def test_no_internal_or_unknown_status(report):
    assert report["failures"] == 0, f"{_named(report)}: {report['problems']}"
    for tally in (report["rpcs"], report["flood"]):
        for rpc, counts in tally.items():
            assert not {"INTERNAL", "UNKNOWN"} & {code.split()[0] for code in counts["codes"]}, (rpc, counts)


def test_unparseable_requests_get_invalid_argument(report):
    for rpc, counts in report["flood"].items():
        assert counts["codes"] == {"INVALID_ARGUMENT": counts["calls"]}, (rpc, counts)


def test_valid_seeds_are_answered(report):
    """The fuzz starts from requests the services take, so mutations reach past the parser."""
    assert not [p for p in report["problems"] if "a valid request" in p], _named(report)
    assert all(counts["calls"] for counts in report["valid_seeds"].values())


def test_processes_live_and_serve_after_the_fuzz(report):
    assert all(report["alive"].values()), report["alive"]
    assert all(report["serving"].values()), report["serving"]
    assert not any(report["tracebacks_logged"].values()), report["tracebacks_logged"]


def test_every_session_is_freed(report):
    assert report["sessions_left"] == [0, 0], _named(report)


def test_memory_stays_flat(report):
    for name, rss in report["rss_mb"].items():
        assert rss["after_flood"] - rss["after_fuzz"] <= FLOOD_RSS_MB, (name, rss)
        assert rss["end"] - rss["after_warm_up"] <= FUZZ_RSS_MB, (name, rss)


def test_sigterm_ends_every_fuzzed_process_within_10_s(report):
    """Each stage took 12 unparseable Forward streams; grpcio's stop never finished after ten."""
    for name, seconds in report["exit_s"].items():
        assert seconds is not None and seconds <= EXIT_LIMIT_S, (name, report["exit_s"])


def test_mutations_are_reproducible_from_their_seed():
    request = stage_pb2.ForwardRequest(session_id="s", micro_batch_id=3, route=["127.0.0.1:1"], chain_steps=2)
    request.activations.data = b"\x01" * 16
    for mutate in (mutate_wire, lambda message, rng: mutate_fields(request, rng)):
        runs = [[mutate(request.SerializeToString() if mutate is mutate_wire else request, random.Random(f"7:{i}"))
                 for i in range(50)] for _ in range(2)]
        assert runs[0] == runs[1]
        assert len({data for data, _ in runs[0]}) > 25, "the mutations vary"
    assert split_fields(request.SerializeToString())[0] == (1, 2, b"s")

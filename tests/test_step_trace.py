"""Stages started with a step trace record every micro-batch's stamps, and the timeline bench
turns them into a per-token breakdown."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from protos import codec, stage_pb2
from stage_server.step_trace import StepRecord, StepTrace, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from step_timeline import stage_order, token_breakdown  # noqa: E402
from test_bad_input import forward_once  # noqa: E402


def record(stage: str, micro_batch: int, received: int, started: int, computed: int, sent: int,
           session: str = "s", outcome: str = "forwarded") -> StepRecord:
    return StepRecord(stage=stage, session_id=session, micro_batch_id=micro_batch, outcome=outcome,
                      received=received, started=started, computed=computed, sent=sent)


def test_records_round_trip_and_a_cut_line_is_skipped(tmp_path):
    path = tmp_path / "steps.jsonl"
    written = [record("layers 0:2 @ a", 1, 10, 20, 30, 40), record("layers 2:4 @ b", 1, 50, 60, 70, 80)]
    trace = StepTrace(path)
    for one in written:
        trace.write(one)
    trace.close()
    trace.write(record("layers 0:2 @ a", 2, 1, 2, 3, 4))  # after close: dropped, no error
    with open(path, "a") as file:
        file.write('{"stage": "layers 0:2 @ a", "session_id"')  # a stage killed mid-write
    assert read_records(path) == written


def test_an_unwritable_trace_path_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="give --trace-steps a file in a writable directory"):
        StepTrace(tmp_path / "missing-dir" / "steps.jsonl")


def test_stages_trace_every_micro_batch_in_order(tiny_model, stages, tmp_path):
    path = tmp_path / "steps.jsonl"
    with stages(tiny_model("llama"), 2, trace_steps=str(path)) as (addresses, _):
        pipeline = PipelineClient(addresses)
        try:
            result = Engine(pipeline).generate([SequenceRequest([5, 6, 7], 5)])[0]
        finally:
            pipeline.close()
        assert len(result.token_ids) == 5
        # A step the first stage refuses is traced as failed.
        bad = stage_pb2.ForwardRequest(session_id="no-such-session", micro_batch_id=7, route=[addresses[1]],
                                       activations=codec.encode(torch.tensor([[5]])),
                                       position_ids=codec.encode(torch.tensor([[0]])))
        assert forward_once(addresses[0], bad).status_code != 0
    records = read_records(path)
    first, last = stage_order(records)
    assert first.startswith("layers 0:") and last != first
    ok = [r for r in records if r.outcome != "failed"]
    # The prefill plus one step per token after the first, at each of the two stages.
    assert len([r for r in ok if r.stage == first]) == len([r for r in ok if r.stage == last]) == 5
    assert {r.outcome for r in ok if r.stage == first} == {"forwarded"}
    assert {r.outcome for r in ok if r.stage == last} == {"answered"}
    for one in ok:
        assert one.received <= one.started <= one.computed <= one.sent
    sent_on = {(r.session_id, r.micro_batch_id): r.sent for r in ok if r.stage == first}
    for one in (r for r in ok if r.stage == last):
        assert sent_on[(one.session_id, one.micro_batch_id)] <= one.received
    failed = [r for r in records if r.outcome == "failed"]
    assert [(r.stage, r.micro_batch_id) for r in failed] == [(first, 7)]


def test_breakdown_of_a_known_timeline():
    """Two stages; token k starts at stage 0 at 10_000 k µs; the parts are fixed except stage 0's
    compute, which varies, so a median (not a mean or the first token) must come out."""
    records = []
    computes = [3000, 3100, 2900, 3000, 9000, 3000]  # µs; one slow token
    for k, compute in enumerate(computes):
        base = k * 10_000_000  # ns
        received0, started0 = base, base + 100_000
        computed0 = started0 + compute * 1000
        sent0 = computed0 + 200_000
        received1 = sent0 + 500_000
        started1, computed1 = received1 + 50_000, received1 + 50_000 + 4_000_000
        records += [record("layers 0:5 @ a", k, received0, started0, computed0, sent0),
                    record("layers 5:10 @ b", k, received1, started1, computed1, computed1 + 300_000,
                           outcome="answered")]
    records.append(record("layers 5:10 @ b", 99, 0, 0, 0, 0, outcome="failed"))  # ignored
    result = token_breakdown(records, skip=1)
    assert result["tokens"] == 5
    assert [row["stage"] for row in result["stages"]] == ["layers 0:5 @ a", "layers 5:10 @ b"]
    first, second = result["stages"]
    assert (first["wait"], first["compute"], first["send"], first["hop"]) == (100, 3000, 200, 500)
    assert (second["wait"], second["compute"], second["send"]) == (50, 4000, 300)
    assert "hop" not in second
    assert result["period_us"] == 10_000
    # turn: next token's stage-0 arrival minus this token's last send; it shrinks as stage 0's
    # compute grows, so the median over tokens 1..4 (computes 3100, 2900, 3000, 9000) is exact.
    turns = sorted(10_000 - (100 + c + 200 + 500 + 50 + 4000 + 300) for c in computes[1:5])
    assert result["turn_us"] == (turns[1] + turns[2]) / 2


def test_breakdown_needs_micro_batches_every_stage_handled():
    with pytest.raises(ValueError, match="every stage"):
        token_breakdown([record("layers 0:5 @ a", 1, 0, 1, 2, 3), record("layers 5:10 @ b", 2, 4, 5, 6, 7)])

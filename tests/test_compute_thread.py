"""Every torch call of a stage runs on its one compute thread (stage_server/compute_thread.py).

GNU OpenMP gives each thread that starts parallel work a team of its own, and a process with more
OpenMP threads than CPUs stops spinning between parallel regions, which slows every step. So the
slice must load, calibrate and compute on one thread, whichever stream a step arrives on (the
coordinator's, or the greedy chain's from the last stage), and the stage process must set its
OpenMP spin before torch loads.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from stalling import stalled_forward
from tiny_models import reference_greedy
from waiting import eventually

import stage_server.server
from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient
from stage_server.compute_thread import SPIN_COUNT, ComputeThread, set_openmp_spin


def test_the_spin_default_leaves_a_spin_the_environment_sets():
    environ: dict[str, str] = {}
    assert set_openmp_spin(environ) == SPIN_COUNT and environ == {"GOMP_SPINCOUNT": SPIN_COUNT}
    mine = {"GOMP_SPINCOUNT": "1234"}
    assert set_openmp_spin(mine) == "1234" and mine == {"GOMP_SPINCOUNT": "1234"}


def test_the_stage_cli_sets_the_spin_before_torch_is_imported():
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: the CLI module must not import torch
    probe = ("import sys, stage_server.cli; "
             "print('torch' in sys.modules, callable(stage_server.cli.set_openmp_spin))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_compute_thread_runs_work_in_order_on_one_thread_and_passes_errors_back():
    compute = ComputeThread()
    try:
        names = [compute.run(lambda: threading.current_thread().name) for _ in range(3)]
        assert len(set(names)) == 1 and names[0].startswith("compute") and names[0] != threading.current_thread().name
        try:
            compute.run(lambda: 1 / 0)
        except ZeroDivisionError:
            pass
        else:
            raise AssertionError("the error of the work was swallowed")
        assert compute.run(lambda: 42) == 42  # still serving after an error
    finally:
        compute.close()


def test_a_stage_loads_and_computes_every_step_on_its_compute_thread(tiny_model, stages, monkeypatch):
    model_dir = tiny_model("llama")
    loaded_on: list[str] = []
    original_load = stage_server.server.load_slice

    def recording_load(*args, **kwargs):
        loaded_on.append(threading.current_thread().name)
        return original_load(*args, **kwargs)

    monkeypatch.setattr(stage_server.server, "load_slice", recording_load)
    prompts, new_tokens = [[5, 6, 7, 8, 9], [3, 4], [9, 8, 7]], 6
    with stages(model_dir, 2) as (addresses, servers):
        ran_on: list[set[str]] = [set() for _ in servers]
        for index, server in enumerate(servers):
            model, service = server.service.model, server.service
            forward, step = model.forward, service.steps.run

            def recording_forward(*args, _forward=forward, _seen=ran_on[index], **kwargs):
                _seen.add(threading.current_thread().name)
                return _forward(*args, **kwargs)

            def recording_step(*args, _step=step, _seen=ran_on[index], **kwargs):
                _seen.add(threading.current_thread().name)
                return _step(*args, **kwargs)

            monkeypatch.setattr(model, "forward", recording_forward)
            monkeypatch.setattr(service.steps, "run", recording_step)
        client = PipelineClient(addresses)
        try:
            chained = Engine(client, chain=True).generate([SequenceRequest(prompts[0], new_tokens)])[0]
            unchained = Engine(client, chain=False, micro_batches=2)
            batched = unchained.generate([SequenceRequest(p, new_tokens) for p in prompts])
        finally:
            client.close()
    # the prompt came on the coordinator's stream, the chained steps on the last stage's stream
    assert chained.token_ids == reference_greedy(model_dir, [prompts[0]], new_tokens)[0]
    assert [r.token_ids for r in batched] == [reference_greedy(model_dir, [p], new_tokens)[0] for p in prompts]
    assert len(loaded_on) == 2 and all(name.startswith("compute") for name in loaded_on)
    for seen in ran_on:
        assert len(seen) == 1 and next(iter(seen)).startswith("compute"), seen


def test_the_reader_queues_steps_without_waiting_and_a_closed_stream_still_answers_them(tiny_model, stages):
    """A stream's reader hands each step to the compute thread and goes back to reading (so it is
    not woken when a step ends), at most QUEUED_PER_STREAM at a time; when the upstream closes,
    the steps it queued still run and answer before the stream ends."""
    import grpc
    import torch

    from protos import codec, stage_pb2, stage_pb2_grpc
    from stage_server.forward_stream import QUEUED_PER_STREAM

    model_dir = tiny_model("llama")
    with stages(model_dir, 1) as (addresses, servers):
        service = servers[0].service
        requests = [stage_pb2.ForwardRequest(
            session_id=f"s{i}", micro_batch_id=i, start_session=True, end_session=True, logits_top_k=1,
            activations=codec.encode(torch.tensor([[5, 6, 7]])), position_ids=codec.encode(torch.arange(3)[None]))
            for i in range(QUEUED_PER_STREAM + 2)]
        with grpc.insecure_channel(addresses[0]) as channel:
            answers = stage_pb2_grpc.StageStub(channel).Forward(iter(requests), timeout=60)
            with stalled_forward(service) as (computing, _):
                assert computing.wait(30)
                # the first step computes; the reader went on, read and queued the rest up to the bound
                read = eventually(lambda: service._inflight, QUEUED_PER_STREAM + 1)
                assert read == QUEUED_PER_STREAM + 1, f"{read} steps read while the first computes"
            got = sorted(answer.micro_batch_id for answer in answers)  # the upstream closed after its last
    assert got == list(range(QUEUED_PER_STREAM + 2))

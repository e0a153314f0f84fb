"""Greedy chaining: the last stage sends a greedy group's next decode step to stage 0 itself.

Exactness against the unsplit model, that the coordinator really is off the token loop
(it submits only the prefill and the first decode step), that the chain stops where it
must (stop tokens, StopChain when a stop string ends a row or a request waits to join,
the credit the coordinator granted), that nothing leaks, and that bad chaining fields
are refused with INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from tiny_models import reference_greedy
from waiting import eventually

from coordinator.engine import Engine, SequenceRequest
from coordinator.pipeline_client import PipelineClient, StageCallError, StepFuture, logits_of
from protos import codec, stage_pb2, stage_pb2_grpc

PROMPT, NEW_TOKENS = [5, 6, 7, 8], 8


def counting(client: PipelineClient) -> tuple[list[int], list[str]]:
    """Count the client's submits and StopChain calls."""
    submits, stops = [], []
    submit, stop_chain = client.submit, client.stop_chain
    client.submit = lambda *a, **k: (submits.append(k.get("chain_steps", 0)), submit(*a, **k))[1]
    client.stop_chain = lambda session_id, **k: (stops.append(session_id), stop_chain(session_id, **k))[1]
    return submits, stops


def prefill(client: PipelineClient, session_id: str) -> int:
    """Start a session holding PROMPT on every stage; returns its first greedy token."""
    positions = torch.arange(len(PROMPT)).view(1, -1)
    first = client.submit(session_id, torch.tensor([PROMPT]), positions, None, start_session=True, logits_top_k=1)
    return logits_of(first.result(timeout=30)).best(0)


@pytest.mark.parametrize("chain", [True, False])
def test_a_chained_decode_is_exact_and_leaves_the_coordinator_out(tiny_model, stages, chain):
    model_dir = tiny_model("llama")
    want = reference_greedy(model_dir, [PROMPT], NEW_TOKENS)[0]
    with stages(model_dir, 3) as (addresses, servers):
        client = PipelineClient(addresses)
        submits, _ = counting(client)
        try:
            result = Engine(client, chain=chain).generate([SequenceRequest(PROMPT, NEW_TOKENS)])[0]
            sessions = eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0, 0, 0])
            served = [i.micro_batches_served for i in client.stage_infos()]
        finally:
            client.close()
    assert result.token_ids == want and result.finish_reason == "length"
    if chain:  # the prefill, then one decode step granted NEW_TOKENS - 2 more steps the last stage sends
        assert submits == [0, NEW_TOKENS - 2]
    else:  # the coordinator sends every step
        assert submits == [0] * NEW_TOKENS
    assert served == [NEW_TOKENS] * 3, "every stage computed the prefill and NEW_TOKENS - 1 decode steps"
    assert sessions == [0, 0, 0]


def test_groups_that_share_the_stages_are_not_chained(tiny_model, stages):
    """Two requests in two groups: the coordinator sends every step of both (its turn for one
    group overlaps the other's compute, so a chain would gain nothing); a lone request on the
    same engine afterwards chains again. Every answer stays exact."""
    model_dir = tiny_model("llama")
    prompts = [PROMPT, [9, 10, 11]]
    want = [reference_greedy(model_dir, [p], NEW_TOKENS)[0] for p in prompts]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        submits, stops = counting(client)
        try:
            engine = Engine(client, micro_batches=2)
            both = engine.generate([SequenceRequest(p, NEW_TOKENS) for p in prompts])
            shared = list(submits)
            alone = engine.generate([SequenceRequest(PROMPT, NEW_TOKENS)])[0]
        finally:
            client.close()
    assert [r.token_ids for r in both] == want and alone.token_ids == want[0]
    assert len(shared) == 2 * NEW_TOKENS and not any(shared), "each group's steps came from the coordinator"
    assert submits[len(shared):] == [0, NEW_TOKENS - 2], "a lone request chains"
    assert not stops


def test_a_stop_token_ends_the_chain_on_the_last_stage(tiny_model, stages):
    model_dir = tiny_model("llama")
    want = reference_greedy(model_dir, [PROMPT], NEW_TOKENS)[0]
    # a token first produced at step 3 or later ends the sequence
    eos = next(t for i, t in enumerate(want) if i >= 2 and t not in want[:i])
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        submits, stops = counting(client)
        try:
            result = Engine(client).generate([SequenceRequest(PROMPT, NEW_TOKENS, eos_token_ids=frozenset({eos}))])[0]
            sessions = eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0, 0])
            served = [i.micro_batches_served for i in client.stage_infos()]
        finally:
            client.close()
    cut = want.index(eos) + 1
    assert result.token_ids == want[:cut] and result.finish_reason == "eos"
    assert cut >= 3 and len(submits) == 2 and not stops, "the last stage saw the stop token itself"
    assert served == [cut] * 2, "no step was computed after the stop token"
    assert sessions == [0, 0]


def test_stop_strings_and_joiners_take_control_back(tiny_model, stages):
    """A row that a stop string ends, and a request that arrives mid-chain, both make the
    coordinator stop the chain; every sequence stays exact and no session is left."""
    model_dir = tiny_model("qwen2")
    others = [[9, 10], [20, 21, 22, 23, 24, 25]]
    want = [reference_greedy(model_dir, [p], NEW_TOKENS)[0] for p in [PROMPT, *others]]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        submits, stops = counting(client)
        engine = Engine(client)
        joined = []

        def stop_at_third(_token: int) -> bool:
            seen.append(_token)
            if len(seen) == 2:  # a newcomer arrives while the pair's chain runs
                joined.append(engine.submit_all([SequenceRequest(others[1], NEW_TOKENS)])[0])
            return len(seen) == 3
        seen: list[int] = []
        try:
            pair = engine.generate([SequenceRequest(PROMPT, NEW_TOKENS, on_token=stop_at_third),
                                    SequenceRequest(others[0], NEW_TOKENS)])
            late = joined[0].result(timeout=60)
            sessions = eventually(lambda: [i.active_sessions for i in client.stage_infos()], [0, 0])
        finally:
            client.close()
    assert pair[0].token_ids == want[0][:3] and pair[0].finish_reason == "stop"
    assert pair[1].token_ids == want[1]
    assert late.token_ids == want[2]
    assert stops, "the coordinator asked the last stage to stop chaining"
    assert len(submits) < 3 * NEW_TOKENS, "most steps were still chained"
    assert sessions == [0, 0]


def test_a_chain_runs_exactly_its_credit(tiny_model, stages):
    """Driven by hand: a decode step granted 3 chained steps yields 4 answers, the first
    three marked chained, with the greedy tokens of the unsplit model."""
    model_dir = tiny_model("gpt2")
    want = reference_greedy(model_dir, [PROMPT], 5)[0]
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            token = prefill(client, "s")
            future = client.submit("s", torch.tensor([[token]]), torch.tensor([[len(PROMPT)]]), None,
                                   logits_top_k=1, chain_steps=3)
            tokens, chained, ids = [token], [], []
            while future is not None:
                response = future.result(timeout=30)
                tokens.append(logits_of(response).best(0))
                chained.append(response.chained)
                ids.append(response.micro_batch_id)
                future = future.next_in_chain
            after = client.submit("s", torch.tensor([[tokens[-1]]]), torch.tensor([[len(PROMPT) + 4]]), None,
                                  logits_top_k=1).result(timeout=30).micro_batch_id
            client.end_session("s")
        finally:
            client.close()
    assert tokens == want
    assert chained == [True, True, True, False]
    assert ids == list(range(ids[0], ids[0] + 4)) and after > ids[-1], "chained steps' ids were reserved"


def test_stop_chain_ends_a_long_chain_at_the_next_step(tiny_model, stages):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, _):
        client = PipelineClient(addresses)
        try:
            prefill(client, "s")
            future = client.submit("s", torch.tensor([[1]]), torch.tensor([[len(PROMPT)]]), None,
                                   logits_top_k=1, chain_steps=40)
            answers = 0
            while future is not None and answers < 50:
                future.result(timeout=30)
                answers += 1
                if answers == 2:
                    client.stop_chain("s")
                future = future.next_in_chain
            client.end_session("s")
        finally:
            client.close()
    assert 2 <= answers <= 4, f"the chain went on for {answers} answers after StopChain"


def _raw_request(**fields) -> stage_pb2.ForwardRequest:
    return stage_pb2.ForwardRequest(
        session_id="bad", micro_batch_id=1, activations=codec.encode(torch.tensor([[1, 2]])),
        position_ids=codec.encode(torch.tensor([[0, 1]])), start_session=True, **fields)


@pytest.mark.parametrize("fields, words", [
    ({"chain_steps": 3, "logits_top_k": 0, "chain_route": ["x:1"]}, "logits_top_k = 1"),
    ({"chain_steps": 3, "logits_top_k": 1}, "chain_route"),
    ({"chain_steps": 1 << 20, "logits_top_k": 1, "chain_route": ["x:1"]}, "at most"),
])
def test_bad_chaining_fields_are_refused(tiny_model, stages, fields, words):
    model_dir = tiny_model("llama")
    with stages(model_dir, 1) as (addresses, servers):
        with grpc.insecure_channel(addresses[0]) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            answer = next(iter(stub.Forward(iter([_raw_request(**fields)]), timeout=30)))
            with pytest.raises(grpc.RpcError) as stop_error:
                stub.StopChain(stage_pb2.StopChainRequest(), timeout=10)
            sessions = stub.Info(stage_pb2.InfoRequest(), timeout=10).active_sessions
    assert answer.status_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert words in answer.error_message
    assert stop_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sessions == 0, "a refused first step leaves no session behind"


def test_a_chained_step_that_cannot_reach_its_first_stage_fails_instead_of_hanging(tiny_model, stages):
    model_dir = tiny_model("llama")
    with stages(model_dir, 2) as (addresses, servers):
        client = PipelineClient(addresses)
        try:
            prefill(client, "s")
            servers[0].stop()  # stage 0 goes away
            with grpc.insecure_channel(addresses[1]) as channel:
                last = stage_pb2_grpc.StageStub(channel)
                hidden = last.Info(stage_pb2.InfoRequest(), timeout=10).hidden_size
                # a decode step for the last stage alone, chaining on to the stage that is gone
                request = stage_pb2.ForwardRequest(
                    session_id="s", micro_batch_id=99, activations=codec.encode(torch.ones(1, 1, hidden)),
                    position_ids=codec.encode(torch.tensor([[len(PROMPT)]])), logits_top_k=1,
                    reply_to=client._collector_id(), chain_steps=2, chain_route=addresses)
                future = StepFuture()
                client._pending.add(("s", 99), future, None, True)
                list(last.Forward(iter([request]), timeout=30))
            response = future.result(timeout=30)
            following = future.next_in_chain.result(timeout=30) if response.chained else None
        finally:
            client.close()
    # Either the link to stage 0 had already failed when the last stage went to send (it answers
    # unchained, and the coordinator sends the next step itself), or the chained step was queued
    # on it and comes back as UNAVAILABLE naming stage 0. Never a step the coordinator waits for forever.
    assert logits_of(response).best(0) >= 0
    if response.chained:
        with pytest.raises(StageCallError) as failure:
            logits_of(following)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE and addresses[0] in str(failure.value)


def test_an_answer_that_overtakes_the_one_announcing_it_is_kept():
    """The last stage sends a chained step before answering the step that chained it, so the
    chained step's answer (an instant error, or a tiny model's) can reach the coordinator first."""
    from coordinator.pipeline_client import _Pending

    pending = _Pending()
    first = StepFuture()
    pending.add(("s", 7), first, None, True)
    failed = stage_pb2.ForwardResponse(session_id="s", micro_batch_id=9, status_code=14,
                                       error_message="stage 0 is gone")
    second_answer = stage_pb2.ForwardResponse(session_id="s", micro_batch_id=8, chained=True)
    pending.resolve(failed)  # step 9's error comes first, then step 8's answer (chained), then step 7's
    pending.resolve(second_answer)
    assert not first.done()
    pending.resolve(stage_pb2.ForwardResponse(session_id="s", micro_batch_id=7, chained=True))
    second = first.next_in_chain
    assert first.done() and second.done() and second.result() is second_answer
    assert second.next_in_chain.result() is failed
    pending.resolve(stage_pb2.ForwardResponse(session_id="other", micro_batch_id=1))  # nobody's: kept, bounded
    for i in range(_Pending.EARLY_KEPT + 10):
        pending.resolve(stage_pb2.ForwardResponse(session_id="gone", micro_batch_id=i))
    assert len(pending._early) == _Pending.EARLY_KEPT


def test_a_greedy_answer_holds_each_rows_first_maximum_and_its_logit():
    """The last stage picks greedy tokens in numpy: the same ids as torch's argmax on all logits
    (the first of equal maxima), with their logits, for every row."""
    from stage_server.answers import greedy_ids, logits_response

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1.0  # a tie: the first one wins
    ids = greedy_ids(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist() and ids[1] == 7
    request = stage_pb2.ForwardRequest(session_id="s", micro_batch_id=4, logits_top_k=1)
    answer = logits_response(request, logits)
    assert codec.decode(answer.top_token_ids).tolist() == [[i] for i in ids.tolist()]
    assert torch.equal(codec.decode(answer.logits), logits.gather(-1, torch.from_numpy(ids).view(-1, 1)))
    assert (answer.session_id, answer.micro_batch_id) == ("s", 4)
    halves = logits.to(torch.bfloat16)  # not float32: the torch path, same choice
    assert greedy_ids(halves).tolist() == halves.argmax(dim=-1).tolist()
    assert codec.decode(logits_response(request, halves).logits).dtype == torch.bfloat16

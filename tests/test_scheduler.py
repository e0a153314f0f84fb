"""The scheduler's decisions, fed batching states by hand: admission, grouping, prefill rounds,
greedy chaining and stopping a chain. No stages, no gRPC, no threads."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from coordinator import scheduler
from coordinator.running_batch import Group, Prefill
from coordinator.sampling import Sampler, SamplingParams
from coordinator.scheduler import MAX_PREFILLS_PER_ROUND, BatchLimits, BatchState
from coordinator.sequence import FINISH_EOS, LiveSequence


def sequence(prompt_length: int, new_tokens: int = 4, *, greedy: bool = True,
             eos: frozenset[int] = frozenset()) -> LiveSequence:
    sampler = Sampler(SamplingParams(temperature=0.0 if greedy else 1.0, seed=0))
    return LiveSequence(list(range(1, prompt_length + 1)), new_tokens, eos, sampler, None, lambda: True, Future())


def running(*rows: LiveSequence) -> Group:
    """A group decoding `rows`, each of which has produced one token."""
    group = Group()
    for row in rows:
        row.output.append(7)
    group.adopt(Prefill(list(rows), 0, 0, group))
    return group


def state(*groups: Group, waiting=(), prefills=()) -> BatchState:
    return BatchState(list(groups) or [Group()], deque(waiting), list(prefills))


# ---- queueing and admission --------------------------------------------------------------

def test_a_request_is_refused_when_it_alone_exceeds_the_cache_bound_or_the_queue_is_full():
    limits = BatchLimits(max_cache_positions=20, max_queue=2)
    assert scheduler.refusal(state(), limits, [sequence(10, 10)]) is None
    assert "needs 21 cache positions" in scheduler.refusal(state(), limits, [sequence(10, 11)])
    full = state(waiting=[sequence(1)])
    assert scheduler.refusal(full, limits, [sequence(1)]) is None
    assert scheduler.refusal(full, limits, [sequence(1), sequence(1)]) == \
        "1 requests are already queued (limit 2); retry later"


def test_admission_takes_the_queue_in_order_up_to_the_row_bound():
    waiting = [sequence(3) for _ in range(5)]
    admission = scheduler.admit(state(waiting=waiting), BatchLimits(max_batch_rows=3), prefill_alone=False)
    assert admission.admitted == waiting[:3]
    assert admission.requeued == []
    assert admission.prefills == [(waiting[:3], 0)]


def test_a_request_that_does_not_fit_holds_back_the_ones_behind_it():
    small, large, tiny = sequence(5, 4), sequence(10, 4), sequence(1, 1)  # 9, 14 and 2 positions
    admission = scheduler.admit(state(waiting=[small, large, tiny]), BatchLimits(max_cache_positions=20),
                                prefill_alone=False)
    assert admission.admitted == [small]


def test_live_rows_count_against_the_bounds_and_finished_ones_do_not():
    done, live = sequence(3), sequence(3)
    group = running(done, live)
    done.finish = FINISH_EOS
    assert scheduler.reserved(state(group)) == (1, live.cache_positions)
    limits = BatchLimits(max_batch_rows=2)
    admission = scheduler.admit(state(group, waiting=[sequence(2), sequence(2)]), limits, prefill_alone=False)
    assert len(admission.admitted) == 1
    assert scheduler.admit(state(running(sequence(2), sequence(2)), waiting=[sequence(2)]), limits,
                           prefill_alone=False) is None


def test_no_admission_round_while_a_prefill_is_on_its_way():
    target = Group()
    on_its_way = Prefill([sequence(3)], 0, 0, target)
    assert scheduler.admit(state(target, waiting=[sequence(2)], prefills=[on_its_way]), BatchLimits(),
                           prefill_alone=False) is None


def test_newcomers_go_to_the_least_loaded_group():
    busy = running(sequence(3), sequence(3))
    filling = Group()
    filling.incoming = 1  # one row being prefilled for it
    newcomers = [sequence(2) for _ in range(4)]
    shares = scheduler.spread(newcomers, [busy, filling, Group()])
    assert shares == {2: [newcomers[0], newcomers[2]], 1: [newcomers[1]], 0: [newcomers[3]]}


def test_a_round_opens_a_bounded_number_of_prefills_and_requeues_the_rest_in_order():
    waiting = [sequence(3 + i % 2) for i in range(12)]
    admission = scheduler.admit(state(Group(), Group(), waiting=waiting), BatchLimits(), prefill_alone=True)
    assert admission.admitted == waiting
    assert len(admission.prefills) == MAX_PREFILLS_PER_ROUND == 8
    assert [target for _, target in admission.prefills] == [0, 1] * 4, "every group's first prefill first"
    assert all(len(batch) == 1 for batch, _ in admission.prefills)
    started = {id(s) for batch, _ in admission.prefills for s in batch}
    assert [id(s) for s in admission.requeued] == [id(s) for s in waiting if id(s) not in started]
    assert [waiting.index(s) for s in admission.requeued] == [8, 9, 10, 11]


def test_prompts_share_a_prefill_within_the_token_budget():
    waiting = [sequence(3) for _ in range(5)]
    admission = scheduler.admit(state(waiting=waiting), BatchLimits(prefill_chunk_tokens=6), prefill_alone=False)
    assert [len(batch) for batch, _ in admission.prefills] == [2, 2, 1]


def test_stages_in_per_sequence_mode_get_one_prompt_per_prefill():
    assert scheduler.per_sequence_stages([SimpleNamespace(attention="batched"),
                                          SimpleNamespace(attention="per-sequence")])
    assert not scheduler.per_sequence_stages([SimpleNamespace(attention="batched")])


# ---- decode steps and greedy chaining ----------------------------------------------------

def test_a_lone_greedy_group_chains_the_steps_its_shortest_row_has_left():
    group = running(sequence(3, 5), sequence(4, 8))  # 4 and 7 tokens to go
    assert scheduler.chain_steps(state(group), group, chain=True) == 3
    assert scheduler.chain_steps(state(group), group, chain=False) == 0


@pytest.mark.parametrize("company", ["queue", "prefill", "other group"])
def test_a_group_that_shares_the_stages_does_not_chain(company):
    group = running(sequence(3, 5))
    other = Group()
    shared = {"queue": lambda: state(group, waiting=[sequence(2)]),
              "prefill": lambda: state(group, prefills=[Prefill([sequence(2)], 0, 0, group)]),
              "other group": lambda: state(group, other)}[company]()
    if company == "other group":
        other.in_flight = Future()
    assert not scheduler.has_the_stages_to_itself(shared, group)
    assert scheduler.chain_steps(shared, group, chain=True) == 0
    assert scheduler.has_the_stages_to_itself(state(group, Group()), group)


def test_after_an_answer_the_loop_wakes_unless_the_group_runs_alone():
    group = running(sequence(3, 8))
    assert scheduler.runs_alone(state(group), group)
    assert not scheduler.runs_alone(state(group, waiting=[sequence(2)]), group)
    group.joining.append(Prefill([sequence(2)], 0, 0, group))
    assert not scheduler.runs_alone(state(group), group), "prefilled rows wait to join: the loop merges them"


def test_a_group_with_a_sampled_or_finished_row_does_not_chain():
    sampled = running(sequence(3, 5), sequence(3, 5, greedy=False))
    assert scheduler.chain_steps(state(sampled), sampled, chain=True) == 0
    finished = running(sequence(3, 5), sequence(3, 5))
    finished.rows[0].finish = FINISH_EOS
    assert scheduler.chain_steps(state(finished), finished, chain=True) == 0


def test_the_last_stage_stops_a_chain_on_any_rows_end_token():
    group = running(sequence(3, eos=frozenset({1, 2})), sequence(3, eos=frozenset({2, 9})))
    assert scheduler.chain_stop_ids(group, 3) == {1, 2, 9}
    assert scheduler.chain_stop_ids(group, 0) == frozenset()


def test_only_all_greedy_live_rows_get_argmax_answers():
    greedy, sampled = sequence(3), sequence(3, greedy=False)
    assert scheduler.top_k_needed([greedy]) == 1
    assert scheduler.top_k_needed([greedy, sampled]) == 0
    sampled.finish = FINISH_EOS
    assert scheduler.top_k_needed([greedy, sampled]) == 1


def test_a_chain_is_stopped_once_when_a_row_leaves_or_rows_wait_to_join():
    group = running(sequence(3, 8), sequence(3, 8))
    assert not scheduler.wants_control(group)
    group.rows[1].finish = FINISH_EOS
    assert scheduler.wants_control(group)
    joining = running(sequence(3, 8))
    joining.joining.append(Prefill([sequence(2)], 0, 0, joining))
    assert scheduler.wants_control(joining)

    group.chaining, group.in_flight = True, Future()
    assert scheduler.chain_to_stop(group)
    group.stop_asked = True
    assert not scheduler.chain_to_stop(group), "StopChain is sent once a chain"
    group.stop_asked, group.in_flight = False, None
    assert not scheduler.chain_to_stop(group), "no step in flight: nothing to stop"


def test_a_group_is_drained_and_the_loop_idle_only_when_nothing_is_left():
    group = running(sequence(3), sequence(3))
    group.rows[0].finish = FINISH_EOS
    assert not scheduler.drained(group) and not scheduler.idle(state(group))
    group.rows[1].finish = FINISH_EOS
    assert scheduler.drained(group)
    group.in_flight = Future()
    assert not scheduler.drained(group)
    assert scheduler.idle(state(Group(), Group()))
    assert not scheduler.idle(state(waiting=[sequence(2)]))


def test_the_counts_of_a_state():
    live, done = sequence(3), sequence(4)
    group = running(live, done)
    done.finish = FINISH_EOS
    filling = Group()
    on_its_way = Prefill([sequence(2), sequence(5)], 0, 0, filling)
    stats = scheduler.batching_stats(state(group, filling, waiting=[sequence(1)], prefills=[on_its_way]),
                                     decode_steps=5, prefills=3, hop_bytes=99)
    assert stats == scheduler.BatchingStats(queued=1, running=1, prefilling=2,
                                            reserved_positions=live.cache_positions + 6 + 9, sessions=2,
                                            decode_steps=5, prefills=3, hop_bytes=99)

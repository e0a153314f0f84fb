"""The batching decisions, as pure functions over the batching state.

Owns: `BatchState` (the queue of sequences waiting for admission, the prefills on their way, the
running groups), its bounds (`BatchLimits`, batch_limits) and counts (`batching_stats`), and every decision the
engine's loop takes from it: whether a request may queue (`refusal`), whom to admit (`admit`: in
queue order, within the row and cache-position bounds, one admission round at a time), which
group each newcomer joins (`spread`: the least loaded), how they are cut into prefills and how
many prefills a round opens (`plan_prefills`), whether a group's next step may be chained
(`chain_steps`: a greedy group alone on the stages), and when a chain must be stopped
(`wants_control`, `chain_to_stop`). Nothing here sends, waits, locks or starts a thread: the
functions read the state and return what to do, and tests feed them states.

Does not own: applying the decisions, the loop, its lock or answers from the stages (engine), a
group's cache mirror (running_batch), or the wire (pipeline_client).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.batch_limits import BatchLimits
from coordinator.running_batch import Group, Prefill, prefill_batches
from coordinator.sequence import LiveSequence

# Prefills (stage sessions) one admission round may open; a stage's --max-sessions (default 64)
# must leave room for these beside the running groups' sessions.
MAX_PREFILLS_PER_ROUND = 8


@dataclass
class BatchState:
    """Every sequence the engine holds, wherever it sits."""

    groups: list[Group]
    waiting: deque[LiveSequence] = field(default_factory=deque)  # submitted, not yet admitted
    prefills: list[Prefill] = field(default_factory=list)  # prefills on their way through the stages


@dataclass(frozen=True)
class BatchingStats:
    queued: int
    running: int
    prefilling: int
    reserved_positions: int
    sessions: int
    decode_steps: int
    prefills: int
    hop_bytes: int


@dataclass(frozen=True)
class Admission:
    """One admission round: take `admitted` off the head of the queue, put `requeued` back at its
    head (in order), and start `prefills`, each a batch of sequences and the index of its group."""

    admitted: list[LiveSequence]
    requeued: list[LiveSequence]
    prefills: list[tuple[list[LiveSequence], int]]


# ---- what the state holds ----------------------------------------------------------------

def decoding(state: BatchState) -> list[LiveSequence]:
    """Rows of the running groups (finished ones included until the next edit drops them)."""
    return [s for g in state.groups for s in g.rows]


def prefilling(state: BatchState) -> list[LiveSequence]:
    """Admitted sequences being prefilled, or prefilled and waiting to join their group."""
    return [s for p in state.prefills for s in p.sequences] + \
        [s for g in state.groups for p in g.joining for s in p.sequences]


def reserved(state: BatchState) -> tuple[int, int]:
    """(sequences admitted and not finished, the cache positions they reserve)."""
    live = [s for s in decoding(state) if s.finish is None] + prefilling(state)
    return len(live), sum(s.cache_positions for s in live)


def sessions(state: BatchState) -> int:
    """Stage sessions open: one per running group and per prefill on its way."""
    return sum(not g.empty for g in state.groups) + len(state.prefills)


def batching_stats(state: BatchState, *, decode_steps: int, prefills: int, hop_bytes: int) -> BatchingStats:
    """The state's counts, with the engine's running totals."""
    _, positions = reserved(state)
    return BatchingStats(
        queued=len(state.waiting), running=sum(s.finish is None for s in decoding(state)),
        prefilling=len(prefilling(state)), reserved_positions=positions, sessions=sessions(state),
        decode_steps=decode_steps, prefills=prefills, hop_bytes=hop_bytes)


def route_loads(state: BatchState) -> dict[str, int]:
    """Rows each stage server runs for these groups now (their rows, joining and incoming)."""
    loads: dict[str, int] = {}
    for group in state.groups:
        if group.route is not None:
            for address in group.route.addresses:
                loads[address] = loads.get(address, 0) + group.load + group.incoming
    return loads


def abandoned(state: BatchState) -> list[Prefill]:
    """Prefills on their way whose every sequence has ended (cancelled): nobody waits for them."""
    return [p for p in state.prefills if all(s.finish is not None for s in p.sequences)]


def idle(state: BatchState) -> bool:
    """Nothing queued, on its way or running: the loop may end."""
    return not state.waiting and not state.prefills and all(
        g.empty and not g.joining and g.in_flight is None for g in state.groups)


# ---- admission and grouping --------------------------------------------------------------

def per_sequence_stages(infos) -> bool:
    """Whether any stage (by its InfoResponse) computes each sequence of a batch as alone
    (per-sequence attention mode): then each prompt gets a prefill of its own (prefill_alone),
    since such stages promise answers independent of the batch."""
    return any(info.attention == "per-sequence" for info in infos)


def refusal(state: BatchState, limits: BatchLimits, sequences: list[LiveSequence]) -> str | None:
    """Why `sequences` cannot be queued, or None: one needs more cache positions than the bound
    allows in total, or the queue has no room for them all."""
    for sequence in sequences:
        if sequence.cache_positions > limits.max_cache_positions:
            return (f"the request needs {sequence.cache_positions} cache positions (prompt + max_new_tokens), "
                    f"more than this coordinator's {limits.max_cache_positions} in total; "
                    "lower max_new_tokens or shorten the prompt")
    if len(state.waiting) + len(sequences) > limits.max_queue:
        return f"{len(state.waiting)} requests are already queued (limit {limits.max_queue}); retry later"
    return None


def admit(state: BatchState, limits: BatchLimits, *, prefill_alone: bool,
          accepts: Callable[[Group], bool] = lambda group: True) -> Admission | None:
    """The next admission round, or None when nobody can be admitted now.

    One admission round at a time: requests that arrive while a prefill is on its way wait for it
    and are then prefilled together. Clients of a burst arrive one by one, and a 1-row prefill
    costs a stage about as much as a decode step of 32 rows."""
    if state.prefills:
        return None
    rows, positions = reserved(state)
    admitted: list[LiveSequence] = []
    for sequence in state.waiting:  # in queue order: a request that does not fit holds back the rest
        if rows >= limits.max_batch_rows or positions + sequence.cache_positions > limits.max_cache_positions:
            break
        admitted.append(sequence)
        rows += 1
        positions += sequence.cache_positions
    if not admitted:
        return None
    now, later = plan_prefills(spread(admitted, state.groups, accepts), limits.prefill_chunk_tokens,
                               alone=prefill_alone)
    waits = {id(s) for batch, _ in later for s in batch}
    return Admission(admitted=admitted, requeued=[s for s in admitted if id(s) in waits], prefills=now)


def spread(admitted: list[LiveSequence], groups: list[Group],
           accepts: Callable[[Group], bool] = lambda group: True) -> dict[int, list[LiveSequence]]:
    """Newcomers by the index of the group each joins: the least loaded of those that `accepts` at
    each turn, so every group ends up with about as many rows (groups in flight at once only keep
    every stage busy if each takes about as long). A group whose route lost a server or has one
    draining takes nobody (the engine keeps one that accepts)."""
    shares: dict[int, list[LiveSequence]] = {}
    open_groups = [i for i, g in enumerate(groups) if accepts(g)]
    loads = [g.load + g.incoming for g in groups]
    for sequence in admitted:
        target = min(open_groups, key=lambda i: loads[i])
        loads[target] += 1
        shares.setdefault(target, []).append(sequence)
    return shares


def plan_prefills(shares: dict[int, list[LiveSequence]], chunk_tokens: int, *, alone: bool,
                  ) -> tuple[list[tuple[list[LiveSequence], int]], list[tuple[list[LiveSequence], int]]]:
    """(prefills to start now, prefills left for the next round), each a batch and its group's index.

    Each prefill is a session on every stage: a round opens at most MAX_PREFILLS_PER_ROUND (long
    prompts each take their own), taking every group's first prefill before any group's second;
    the sequences of the rest go back to the head of the queue."""
    plans = sorted(((index, target, batch) for target, sequences in shares.items()
                    for index, batch in enumerate(prefill_batches(sequences, chunk_tokens, alone=alone))),
                   key=lambda plan: (plan[0], plan[1]))
    planned = [(batch, target) for _, target, batch in plans]
    return planned[:MAX_PREFILLS_PER_ROUND], planned[MAX_PREFILLS_PER_ROUND:]


# ---- decode steps and greedy chaining ----------------------------------------------------

def all_finished(group: Group) -> bool:
    """Every row of the group has finished (true of a group with no rows)."""
    return all(s.finish is not None for s in group.rows)


def has_finished_rows(group: Group) -> bool:
    return any(s.finish is not None for s in group.rows)


def drained(group: Group) -> bool:
    """The group's session has nothing left to do: no live row, nobody joining, no step in flight."""
    return all(s.finish is not None for s in group.rows) and not group.joining and group.in_flight is None


def top_k_needed(sequences: list[LiveSequence]) -> int:
    """1 when every live row decodes greedily or re-feeds known tokens (the stage sends only argmaxes),
    else 0 (all logits)."""
    return 1 if all(s.greedy or s.replaying for s in sequences if s.finish is None) else 0


def has_the_stages_to_itself(state: BatchState, group: Group) -> bool:
    """Whether no other work shares the stages with `group` (no other group, prefill or queue).

    Only then does chaining pay: the stages idle while the coordinator turns a lone group's
    answer into its next step. With other work in flight that turn overlaps their compute
    anyway, and chained groups measure slower (2 pinned stages, 64 sequences in 2 groups:
    107 tok/s chained against 115 unchained)."""
    return not state.prefills and not state.waiting and all(
        other is group or (other.empty and other.in_flight is None and not other.joining)
        for other in state.groups)


def runs_alone(state: BatchState, group: Group) -> bool:
    """After an answer of `group`: whether nothing else may now move (the loop need not wake)."""
    return has_the_stages_to_itself(state, group) and not group.joining


def chain_credit(group: Group) -> int:
    """How many steps the last stage may chain after the step about to be sent: until the
    first row reaches max_new_tokens (0 unless every row decodes greedily; a row re-feeding known
    tokens after a failover is the engine's to feed)."""
    if not group.rows or any(not s.greedy or s.finish is not None or s.replaying for s in group.rows):
        return 0
    return max(0, min(s.max_new_tokens - len(s.output) for s in group.rows) - 1)


def chain_steps(state: BatchState, group: Group, *, chain: bool) -> int:
    """The credit of the group's next step: chained only where chaining is on and the group has
    the stages to itself."""
    return chain_credit(group) if chain and has_the_stages_to_itself(state, group) else 0


def chain_stop_ids(group: Group, credit: int) -> frozenset[int]:
    """Tokens on which the last stage ends a chain by itself: any row's end-of-sequence tokens."""
    return frozenset().union(*(s.eos_token_ids for s in group.rows)) if credit else frozenset()


def wants_control(group: Group) -> bool:
    """Whether the group's next step must be the engine's to shape: a row has finished and should
    leave, or prefilled rows wait to join."""
    return bool(group.joining) or has_finished_rows(group)


def chain_to_stop(group: Group) -> bool:
    """Whether a StopChain is due: the step in flight may be chained and none was asked yet."""
    return group.chaining and not group.stop_asked and group.in_flight is not None

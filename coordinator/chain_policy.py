"""Whether a coordinator lets its last stage send greedy decode steps straight to the first stage.

Owns: resolving `--chain auto|on|off` against the stages' addresses. Does not own the chaining
itself (scheduler and stage_server/greedy_chain.py) or when a group may chain (the scheduler: only
a greedy group that has the stages to itself).

Why "auto" turns it off when every stage is on this machine: a chained step skips the hop back
through the coordinator, but the last stage's answer still reaches the coordinator and the client
at once, and their work then runs while the first stage computes its next step on the same cores,
stalling its thread team. On 2 shared cores (SmolLM2-135M, one request decoding, rounds alternated
with the unsplit model) float32 decode was faster unchained in every comparison: 2 stages 0.919
against 0.885, 0.886 against 0.865 and 0.895 against 0.866 in three full bench runs, 4 stages 0.818
against 0.793; bfloat16 went either way (0.865 against 0.837, 0.878 against 0.894). Where a stage is
on another machine the coordinator's work overlaps no stage's compute there, and the chain saves a
network hop, so it stays on.
"""

from __future__ import annotations

from protos.addresses import is_loopback

CHAIN_SETTINGS = ("auto", "on", "off")


def chain_greedy_steps(setting: str, stage_addresses: tuple[str, ...] | list[str]) -> bool:
    """Resolve a --chain setting: on, off, or auto (off when every stage is on a loopback address)."""
    if setting not in CHAIN_SETTINGS:
        raise ValueError(f"chain must be one of {', '.join(CHAIN_SETTINGS)}, got {setting!r}")
    if setting == "auto":
        return not all(is_loopback(address) for address in stage_addresses)
    return setting == "on"
